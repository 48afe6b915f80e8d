"""Named tensors from safetensors checkpoints (one file, or a sharded index), read on demand.

`Reader.get` / `Reader.stack` check that a tensor exists with the expected shape at once, and
return a `Lazy`: reading happens when the loader builds that parameter, straight into its final
dtype (one layer at a time for stacks), so loading holds one parameter in flight, not the model.

Every failure is a CheckpointError that names the file or tensor and what to do about it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, or disagrees with its config."""


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_FLOAT = ("F64", "F32", "F16", "BF16")  # the storage dtypes a parameter may have

# 16-bit floats: a value is NaN or inf exactly when its exponent bits are all ones, i.e. when its
# bits without the sign reach this threshold
_INF_BITS = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80}
_CHUNK = 1 << 22  # elements per step of the finiteness scan: bounds its temporary to a few MB


def all_finite(a) -> bool:
    """Whether the numpy array `a` holds no NaN or inf: one pass, no full-size temporary. float32 /
    float64 by a chunked self dot product (NaN and inf propagate; a finite array whose sum of squares
    overflowed is then rescanned exactly), 16-bit floats by their exponent bits; ints are finite."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.inexact) and a.dtype not in _INF_BITS:
        return True
    flat = a.reshape(-1)
    lim = _INF_BITS.get(a.dtype)
    if lim is not None:
        u = flat.view(np.uint16)
        tmp = np.empty(min(_CHUNK, u.size), np.uint16)
        for i in range(0, u.size, _CHUNK):
            t = tmp[: len(u[i : i + _CHUNK])]
            np.bitwise_and(u[i : i + _CHUNK], 0x7FFF, out=t)
            if t.size and int(t.max()) >= lim:
                return False
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(0, flat.size, _CHUNK):
            part = flat[i : i + _CHUNK]
            if not np.isfinite(np.dot(part, part)) and not np.isfinite(part).all():
                return False
    return True


def nonfinite_summary(a) -> str:
    """'3 NaN and 1 inf values, the first at index (1, 0, 7)' for an array that is not all finite."""
    a = np.asarray(a)
    bad = ~np.isfinite(a.astype(np.float32) if a.dtype in _INF_BITS else a)
    n_nan = int(np.isnan(a.astype(np.float32) if a.dtype in _INF_BITS else a).sum())
    n_inf = int(bad.sum()) - n_nan
    first = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else ()
    what = " and ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "inf")) if n)
    return f"{what} value{'s' if int(bad.sum()) > 1 else ''}, the first at index {first}"


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array on a 64-byte boundary: jax.device_put then adopts it on CPU without a copy."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off : off + n].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Lazy:
    """A parameter read on demand: build(dtype) -> a 64-byte-aligned numpy array in that dtype.
    name: the checkpoint tensor it comes from ("{}" for the layer index of a stacked one), for errors."""

    build: Callable[[np.dtype], np.ndarray]
    name: str = ""


def zeros(shape) -> Lazy:
    """A parameter of zeros (a bias the checkpoint does not have)."""

    def build(dtype):
        out = aligned_empty(shape, dtype)
        out[...] = 0
        return out

    return Lazy(build)


class Reader:
    """Named tensors of the checkpoint in `directory`, read lazily as numpy.

    prefixes: candidate name prefixes of the model body ("transformer.", "model.", ...); the first
    that any tensor carries is prepended to every name asked for, so families use bare names.
    """

    def __init__(self, directory: str | os.PathLike, prefixes=("",)):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"corrupted checkpoint index {index}: {e}. Re-download the checkpoint.") from e
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [single.name]
            weight_map = None
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not found:
                bins = sorted(p.name for p in self.dir.glob("*.bin"))
                hint = (
                    f" It has {bins}: convert them to safetensors (transformers: model.save_pretrained(dir))."
                    if bins
                    else ""
                )
                raise CheckpointError(f"no safetensors weights in {self.dir}.{hint}")
            files = found
            weight_map = None
        self._handles = {}
        self._headers = {}
        self._where: dict[str, str] = {}
        for f in files:
            path = self.dir / f
            if not path.exists():
                raise CheckpointError(f"checkpoint shard {path} is listed in the index but missing. Re-download it.")
            try:
                h = safe_open(str(path), framework="numpy")
                names = list(h.keys())
            except Exception as e:  # safetensors raises its own error types for truncated / garbled files
                raise CheckpointError(
                    f"corrupted checkpoint file {path}: {e}. Re-download or re-save the checkpoint."
                ) from e
            self._handles[f] = h
            with open(path, "rb") as fh:  # safe_open validated it; keep its header for plain reads
                n = int.from_bytes(fh.read(8), "little")
                self._headers[f] = (json.loads(fh.read(n)), 8 + n)
            for n in names:
                self._where[n] = f
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._where]
            if missing:
                raise CheckpointError(f"tensor {missing[0]!r} is in the index but not in its shard. Re-download the checkpoint.")
        self.prefix = next((p for p in prefixes if any(n.startswith(p) for n in self._where)), "")
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return list(self._where)

    def _full(self, name):
        """The checkpoint's name for `name`: with the model prefix, unless only the bare name exists (lm_head)."""
        if self.prefix + name not in self._where and name in self._where:
            return name
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self._full(name) in self._where

    def _check(self, name: str, shape: tuple | None) -> str:
        """The checkpoint name of `name`, checked to exist with `shape`; marks it used."""
        full = self._full(name)
        if full not in self._where:
            raise CheckpointError(
                f"checkpoint in {self.dir} is missing tensor {full!r}"
                + (f" (expected shape {list(shape)})" if shape else "")
                + ". Is it the right model type, and complete?"
            )
        f = self._where[full]
        stored = self._headers[f][0][full]["dtype"]
        if stored not in _FLOAT:
            raise CheckpointError(
                f"tensor {full!r} in {f} is stored as {stored}, not as floats; jinterp reads float weights "
                "(F32, F16, BF16, F64) only. A quantized checkpoint? Load the unquantized weights."
            )
        h = self._handles[f]
        got = tuple(h.get_slice(full).get_shape())
        if shape is not None and got != tuple(shape):
            raise CheckpointError(
                f"tensor {full!r} has shape {list(got)} but the config implies {list(shape)}. "
                "The checkpoint and config.json disagree."
            )
        self.used.add(full)
        return full

    def read(self, name: str, shape: tuple | None = None, rows: tuple | None = None) -> np.ndarray:
        """Tensor `name` now, as stored (checked against shape); rows (i, j): only rows i..j-1 of its
        first axis. Read with readinto rather than through a memory map, so the file's pages do not
        stay mapped into this process (resident) afterwards."""
        full = self._check(name, shape)
        f = self._where[full]
        try:
            header, start = self._headers[f]
            info = header[full]
            lo, hi = info["data_offsets"]
            shape = list(info["shape"])
            if rows is not None:
                row = (hi - lo) // max(1, shape[0])
                lo, hi, shape[0] = lo + rows[0] * row, lo + rows[1] * row, rows[1] - rows[0]
            buf = np.empty(hi - lo, np.uint8)
            with open(self.dir / f, "rb", buffering=0) as fh:
                fh.seek(start + lo)
                if fh.readinto(memoryview(buf)) != hi - lo:
                    raise ValueError("file ends early")
            return buf.view(_DTYPES[info["dtype"]]).reshape(shape)
        except Exception as e:
            raise CheckpointError(f"could not read tensor {full!r} from {f}: {e}. The file may be corrupted.") from e

    def get(self, name: str, shape: tuple | None = None, fn: Callable | None = None, transpose: bool = False) -> Lazy:
        """Tensor `name` (checked now against shape), mapped by fn (or transposed) when built. Without
        fn it is read and cast a block of rows at a time, so a cast never holds the tensor twice."""
        full = self._check(name, shape)

        def build(dtype):
            if fn is not None:
                a = fn(self.read(name))
                out = aligned_empty(a.shape, dtype)
                out[...] = a
                return out
            stored = tuple(self._headers[self._where[full]][0][full]["shape"])
            out = aligned_empty(stored[::-1] if transpose else stored, dtype)
            n = stored[0] if stored else 0
            step = max(1, n // 16)
            for i in range(0, n, step):
                block = self.read(name, rows=(i, min(n, i + step)))
                if transpose:
                    out[..., i : i + len(block)] = block.T
                else:
                    out[i : i + len(block)] = block
            if not stored:
                out[...] = self.read(name)
            return out

        return Lazy(build, full)

    def stack(self, fmt: str, n_layers: int, shape: tuple | None = None, fn: Callable | None = None) -> Lazy:
        """fmt.format(l) for every layer (each checked now against shape), mapped by fn and stacked on a
        leading layer axis when built, one layer in memory at a time besides the result."""
        for l in range(n_layers):
            self._check(fmt.format(l), shape)

        def build(dtype):
            out = None
            for l in range(n_layers):
                a = self.read(fmt.format(l))
                a = fn(a) if fn else a
                if out is None:
                    out = aligned_empty((n_layers,) + a.shape, dtype)
                out[l] = a
            return out

        return Lazy(build, (self.prefix if self.prefix + fmt.format(0) in self._where else "") + fmt)

    def unused(self) -> list[str]:
        return [n for n in self._where if n not in self.used]
