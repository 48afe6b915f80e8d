"""The resumable store: finished cells of a long sweep, saved with orbax so an interrupted sweep
resumes, keyed by a signature of everything that decides the results."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def _fingerprint(obj, h) -> None:
    """Feed a stable description of obj into hash h: array values, dataclass fields, function code."""
    if isinstance(obj, (np.ndarray, jax.Array)) or hasattr(obj, "__array__") and not callable(obj):
        a = np.asarray(obj)
        h.update(str(a.shape).encode() + str(a.dtype).encode() + np.ascontiguousarray(a).tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(type(obj).__qualname__.encode())
        for f in dataclasses.fields(obj):
            _fingerprint(getattr(obj, f.name), h)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _fingerprint(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _fingerprint(x, h)
    elif hasattr(obj, "__code__"):
        code = obj.__code__
        h.update(f"{obj.__module__}.{obj.__qualname__}".encode() + code.co_code + repr(code.co_consts).encode())
    else:
        h.update(repr(obj).encode())


def signature(*parts) -> str:
    """A short stable hash of the parts (arrays by value, dataclasses by field, functions by code)."""
    h = hashlib.sha256()
    for p in parts:
        _fingerprint(p, h)
    return h.hexdigest()[:16]


class SweepStore:
    """Finished cells of a long sweep, saved with orbax so an interrupted sweep resumes.

    The directory holds one orbax checkpoint per save (the newest kept) of {"results", "done"} and
    the sweep's signature; a store whose signature differs (other model, cells or inputs) is refused
    rather than silently mixed. With several processes (`jinterp.distributed`), process 0 alone reads
    and writes the store (every process holds the whole result), and `load` hands its copy to all.
    """

    def __init__(self, directory, signature: str):
        self.dir = Path(directory).absolute()
        self.signature = signature
        self.main = jax.process_index() == 0
        if not self.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        sig_file = self.dir / "signature.txt"
        if sig_file.exists() and sig_file.read_text().strip() != signature:
            raise ValueError(
                f"{self.dir} holds a checkpoint of a different sweep (signature {sig_file.read_text().strip()} != {signature}); "
                "use a new checkpoint_dir or delete it"
            )
        sig_file.write_text(signature)
        options = ocp.CheckpointManagerOptions(max_to_keep=1)
        if jax.process_count() > 1:  # a manager of process 0 alone: no barriers with the others
            (self.dir / "steps").mkdir(exist_ok=True)  # orbax does not create it for a subset of processes
            options = ocp.CheckpointManagerOptions(
                max_to_keep=1, create=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0}))
        self.mngr = ocp.CheckpointManager(self.dir / "steps", options=options)
        self._step = self.mngr.latest_step() or 0

    def _load(self, like):
        step = self.mngr.latest_step()
        if step is None:
            return None
        target = {"results": like, "done": jax.ShapeDtypeStruct((len(jax.tree.leaves(like)[0]),), bool)}
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
        got = self.mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        return jax.tree.map(lambda a: np.array(a), got["results"]), np.array(got["done"])

    def load(self, like):
        """(results, done) from the newest save, or None (in every process: process 0's copy)."""
        got = self._load(like) if self.main else None
        if jax.process_count() == 1:
            return got
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(got is not None))):
            return None
        results, done = got if self.main else (like, np.zeros(len(jax.tree.leaves(like)[0]), bool))
        results, done = multihost_utils.broadcast_one_to_all((results, done.astype(np.int32)))
        return jax.tree.map(lambda a: np.array(a), results), np.asarray(done) != 0

    def save(self, results, done) -> None:
        if not self.main:
            return
        self._step += 1
        self.mngr.save(self._step, args=ocp.args.StandardSave({"results": results, "done": done}))
        self.mngr.wait_until_finished()
