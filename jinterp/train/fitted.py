"""Saving what was fitted to activations (DAS rotations, masks, probes, tuned-lens translators).

Every fitted object is a dict of arrays plus a record of what it was fitted on, so a file found
months later says which model, site and data produced it::

    fitted.save(path, "das", {"basis": B}, provenance(model, site="hook_resid_post", tokens=base))
    arrays, meta = fitted.load(path, "das")

On disk: `path/fitted.json` ({"kind", "meta", "shapes", "dtypes", "jinterp"}) and `path/arrays`
(orbax). `save` refuses a path that exists and is not empty, so nothing saved is overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jinterp.io import orbax

META_FILE = "fitted.json"


class FittedError(ValueError):
    """A fitted-object file that is missing, of another kind, or would overwrite something."""


def fingerprint(*arrays) -> str:
    """A short hash of the arrays' shapes and contents: which data a fit saw."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def provenance(model, **fields) -> dict:
    """{"model", "family", "n_layers", "d_model", ...fields}; array fields (e.g. tokens=) are
    recorded as {"shape", "sha256"} rather than copied."""
    c = model.config
    out = {"model": model.name, "family": c.family, "n_layers": c.n_layers, "d_model": c.d_model}
    for k, v in fields.items():
        if isinstance(v, (np.ndarray, jax.Array)):
            out[k] = {"shape": list(np.shape(v)), "sha256": fingerprint(v)}
        else:
            out[k] = v
    return out


def save(path, kind: str, arrays: dict, meta: dict) -> Path:
    """Write `arrays` (a flat dict name -> array) and `meta` (JSON-able) to the new directory `path`."""
    from jinterp import __version__

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FittedError(f"{path} exists and is not empty; choose a new directory (nothing was overwritten)")
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    bad = [k for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.floating) and not bool(jnp.isfinite(v).all())]
    if bad:
        raise FittedError(f"refusing to save non-finite values in {', '.join(bad)}")
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": kind,
        "jinterp": __version__,
        "meta": meta,
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "dtypes": {k: str(v.dtype) for k, v in arrays.items()},
    }
    (path / META_FILE).write_text(json.dumps(record, indent=1, default=_json_default))
    orbax.save_tree(path / "arrays", arrays)
    return path


def load(path, kind: str | None = None) -> tuple[dict, dict]:
    """(arrays, meta) saved by `save`; with `kind`, check the file holds that kind of object."""
    path = Path(path)
    if not (path / META_FILE).exists():
        raise FittedError(f"{path} holds no fitted object ({META_FILE} missing); was it written by jinterp's save()?")
    record = json.loads((path / META_FILE).read_text())
    if kind is not None and record["kind"] != kind:
        raise FittedError(f"{path} holds a {record['kind']!r}, not a {kind!r}; load it with the matching loader")
    like = {k: jax.ShapeDtypeStruct(tuple(s), jnp.dtype(record["dtypes"][k])) for k, s in record["shapes"].items()}
    return dict(orbax.restore_tree(path / "arrays", like)), record["meta"]


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"meta holds a {type(o).__name__}, which JSON cannot store")
