"""What every dictionary reader shares: the error class, the dtype names, and a checked view of
one file's named tensors (safetensors or npz)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np


class DictionaryError(ValueError):
    """A dictionary file that is missing, malformed, unsupported, or does not fit the model."""


DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


class Tensors:
    """The named tensors of one file (safetensors or npz), read as numpy, checked on access."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DictionaryError(f"dictionary file {self.path} does not exist")
        try:
            if self.path.suffix == ".npz":
                with np.load(self.path) as z:
                    self._t = {k: np.asarray(z[k]) for k in z.files}
            else:
                from safetensors.numpy import load_file

                self._t = load_file(str(self.path))
        except Exception as e:  # garbled / truncated files raise library-specific errors
            raise DictionaryError(f"could not read {self.path}: {e}. Is the file complete?") from e

    def keys(self):
        return list(self._t)

    def __contains__(self, name):
        return name in self._t

    def get(self, name: str, shape: tuple | None = None, optional: bool = False):
        if name not in self._t:
            if optional:
                return None
            raise DictionaryError(
                f"{self.path} is missing tensor {name!r}" + (f" (expected shape {list(shape)})" if shape else "")
                + f"; it has {sorted(self._t)}. Is it the right format, and complete?"
            )
        a = self._t[name]
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise DictionaryError(f"tensor {name!r} in {self.path} has shape {list(a.shape)}, expected {list(shape)}")
        if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16:
            bad = ~np.isfinite(a.astype(np.float32))
            if bad.any():
                raise DictionaryError(
                    f"tensor {name!r} in {self.path} has {int(bad.sum())} non-finite (NaN/inf) values "
                    f"(first at index {tuple(int(i) for i in np.argwhere(bad)[0])}); the file is corrupt or was saved mid-divergence"
                )
        return a


def as_array(a, dtype):
    return None if a is None else jnp.asarray(np.asarray(a).astype(dtype))
