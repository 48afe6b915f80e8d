"""Traced programs kept on disk, so a later process skips tracing and lowering a sweep's programs too.

The persistent compilation cache (jinterp.compile_cache) spares a second process XLA's compile,
but not JAX's tracing and lowering, which for a staircase sweep (every layer written out) take
seconds. `call` keeps a sweep program as a serialized `jax.export.Exported` next to the compile
cache (`<cache>/jinterp-traced/`); a later process with the same key deserializes it and runs it
through jit (whose compile the compile cache then serves).

A traced program is only as good as its key. The key holds: the source of every jinterp module,
the jax/jaxlib versions and the config flags that change tracing, the backend and its devices, the
program's name, its static arguments (pickled whole) and its arguments' tree, shapes, dtypes and
placement. Static arguments may only refer to code jinterp ships (or numpy/builtins): a cell
function or metric defined elsewhere may change without the key seeing it, so such sweeps are
traced as usual (not cached). Arrays placed on more than one device are not cached either.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import types
from pathlib import Path

import jax
import jaxlib
import numpy as np
from jax import export

from jinterp import compile_cache

SUBDIR = "jinterp-traced"
MAX_BYTES = 512 << 20  # beyond this, the least recently written entries go
_SAFE_MODULES = ("jinterp", "numpy", "builtins", "jax", "flax", "ml_dtypes", "collections", "functools", "operator")
_loaded: dict[str, object] = {}
stats = {"loaded": 0, "saved": 0, "uncached": 0}  # since the process started (tests read it)


class _Foreign(Exception):
    pass


class _KeyPickler(pickle.Pickler):
    """Pickles static arguments; refuses references to code outside jinterp (see module docstring)."""

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, type, types.BuiltinFunctionType, types.MethodType)):
            mod = getattr(obj, "__module__", None) or ""
            if mod.split(".")[0] not in _SAFE_MODULES or "<lambda>" in getattr(obj, "__qualname__", "<lambda>") \
                    or "<locals>" in getattr(obj, "__qualname__", ""):
                raise _Foreign(obj)
        return NotImplemented


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _spec(a):
    if isinstance(a, jax.Array):
        if len(a.sharding.device_set) != 1:
            raise _Foreign(a)
        return (a.shape, str(a.dtype), a.aval.weak_type)
    a = np.asarray(a)
    return (a.shape, str(a.dtype))


def key(name: str, args: tuple, static: dict) -> str | None:
    """The cache key of program `name` on these arguments, or None when it must not be cached."""
    try:
        leaves, tree = jax.tree.flatten(args)
        buf = io.BytesIO()
        _KeyPickler(buf, protocol=5).dump(sorted(static.items()))
        dev = jax.devices()[0]
        parts = (_source_hash(), jax.__version__, jaxlib.__version__,
                 jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision), dev.platform,
                 getattr(dev, "device_kind", ""), jax.device_count(), name, buf.getvalue(), str(tree),
                 [_spec(a) for a in leaves])
    except Exception:  # _Foreign, or anything that does not pickle: not cached
        return None
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def call(fn, args: tuple, static: dict):
    """fn(*args, **static) for a jitted fn, its traced program kept on disk when the compile cache is
    on and the key allows (module docstring)."""
    root = compile_cache.path()
    k = None if root is None else key(f"{fn.__module__}.{fn.__name__}", args, static)
    if k is None:
        stats["uncached"] += 1
        return fn(*args, **static)
    leaves, tree = jax.tree.flatten(args)
    run = _loaded.get(k)
    if run is None:
        path = root / SUBDIR / f"{k}.exported"
        exp = None
        if path.exists():
            try:
                exp = export.deserialize(bytearray(path.read_bytes()))
                stats["loaded"] += 1
            except Exception:  # a damaged or incompatible entry: trace again and replace it
                exp = None
        if exp is None:
            # the arguments go in flat (their tree is in the key), so their types need no registering
            flat = jax.jit(lambda *leaves: fn(*jax.tree.unflatten(tree, leaves), **static))
            try:
                exp = export.export(flat)(*leaves)
                blob = exp.serialize()
            except Exception:  # something export does not take: run it the usual way
                stats["uncached"] += 1
                return fn(*args, **static)
            _save(path, blob)
        run = _loaded[k] = jax.jit(exp.call)
    return run(*leaves)


def _save(path: Path, blob) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if jax.process_index() != 0:
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(bytes(blob))
        os.replace(tmp, path)
        stats["saved"] += 1
        entries = sorted(path.parent.glob("*.exported"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for e in entries:
            total += e.stat().st_size
            if total > MAX_BYTES:
                e.unlink(missing_ok=True)
    except OSError:
        pass
