"""orbax-checkpoint behind one small module: converted-weight caches and saved models.

    model.save(path)           # params with orbax, config as JSON, tokenizer files
    jinterp.load(path)         # restores it, no HF conversion
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_FILE = "jinterp.json"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def save_tree(path, tree) -> None:
    """Save a pytree of arrays to `path` (must not exist yet)."""
    ocp = _ocp()
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as ck:
        ck.save(path, tree)
        ck.wait_until_finished()


def restore_tree(path, like):
    """Restore a pytree saved by save_tree; `like` gives structure, shapes and dtypes (arrays or ShapeDtypeStructs)."""
    ocp = _ocp()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
    with ocp.StandardCheckpointer() as ck:
        return ck.restore(Path(path).absolute(), abstract)


def _config_to_json(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _config_from_json(d: dict):
    from jinterp.config import Config

    d = dict(d)
    d["rope_scaling"] = tuple(tuple(kv) for kv in d.get("rope_scaling", ()))
    d["windows"] = tuple(d.get("windows", ()))
    return Config(**d)


def save_model(model, path) -> None:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new directory")
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": _config_to_json(model.config),
        "name": model.name,
        "dtype": str(model.dtype),
        "shapes": jax.tree.map(lambda a: list(a.shape), model.params),
        "dtypes": jax.tree.map(lambda a: str(a.dtype), model.params),
    }
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    save_tree(path / "params", model.params)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path / "tokenizer"))


def is_saved_model(path) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def load_model(path, dtype=None):
    from jinterp.model import Model

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    cfg = _config_from_json(meta["config"])
    like = jax.tree.map(
        lambda s, d: jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d)), meta["shapes"], meta["dtypes"],
        is_leaf=lambda x: isinstance(x, list),
    )
    params = restore_tree(path / "params", like)
    if dtype is not None:
        from jinterp.loading import cast

        params = cast(params, dtype)
    tok = None
    if (path / "tokenizer").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return Model(cfg, params, tok, meta.get("name"))


class SweepStore:
    """Finished cells of a long sweep, saved with orbax so an interrupted sweep resumes.

    The directory holds one orbax checkpoint per save (the newest kept) of {"results", "done"} and
    the sweep's signature; a store whose signature differs (other model, cells or inputs) is refused
    rather than silently mixed.
    """

    def __init__(self, directory, signature: str):
        self.dir = Path(directory).absolute()
        self.signature = signature
        self.dir.mkdir(parents=True, exist_ok=True)
        sig_file = self.dir / "signature.txt"
        if sig_file.exists() and sig_file.read_text().strip() != signature:
            raise ValueError(
                f"{self.dir} holds a checkpoint of a different sweep (signature {sig_file.read_text().strip()} != {signature}); "
                "use a new checkpoint_dir or delete it"
            )
        sig_file.write_text(signature)
        ocp = _ocp()
        self.mngr = ocp.CheckpointManager(self.dir / "steps", options=ocp.CheckpointManagerOptions(max_to_keep=1))
        self._step = self.mngr.latest_step() or 0

    def load(self, like):
        """(results, done) from the newest save, or None."""
        step = self.mngr.latest_step()
        if step is None:
            return None
        ocp = _ocp()
        target = {"results": like, "done": jax.ShapeDtypeStruct((len(jax.tree.leaves(like)[0]),), bool)}
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
        got = self.mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        return jax.tree.map(lambda a: np.array(a), got["results"]), np.array(got["done"])

    def save(self, results, done) -> None:
        ocp = _ocp()
        self._step += 1
        self.mngr.save(self._step, args=ocp.args.StandardSave({"results": results, "done": done}))
        self.mngr.wait_until_finished()
