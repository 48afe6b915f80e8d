"""jinterp's own saved models, and pytree checkpoints, with orbax.

    model.save(path)        # params with orbax, the config as JSON, tokenizer files
    jinterp.load(path)      # restores them, no HF conversion

A saved model is a directory holding jinterp.json ({"config", "name", "dtype", "shapes",
"dtypes"}), params/ (orbax) and, when the model had one, tokenizer/ (save_pretrained).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jinterp.config import Config

CONFIG_FILE = "jinterp.json"


def _ocp():
    import orbax.checkpoint as ocp  # heavy; only saving and restoring need it

    return ocp


def save_tree(path, tree) -> None:
    """Save a pytree of arrays to `path` (must not exist yet)."""
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ck:
        ck.save(Path(path).absolute(), tree)
        ck.wait_until_finished()


def restore_tree(path, like):
    """Restore a pytree saved by save_tree; `like` gives structure, shapes and dtypes (arrays or ShapeDtypeStructs)."""
    ocp = _ocp()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
    with ocp.StandardCheckpointer() as ck:
        return ck.restore(Path(path).absolute(), abstract)


def config_to_json(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_json(d: dict) -> Config:
    """The Config saved by config_to_json, including ones saved before `mlp` replaced `gated_mlp`."""
    d = dict(d)
    if "gated_mlp" in d:
        d["mlp"] = "gated" if d.pop("gated_mlp") else "dense"
    return Config(**d)


class SavedModel(NamedTuple):
    config: Config
    params: Any
    tokenizer: Any
    name: str | None


def is_saved_model(path) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def save_model(path, config: Config, params, tokenizer=None, name: str | None = None) -> None:
    """Write a saved model to `path` (a new or empty directory)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new directory")
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": config_to_json(config),
        "name": name,
        "dtype": str(params["embed"]["W_E"].dtype),  # for people reading the file
        "shapes": jax.tree.map(lambda a: list(a.shape), params),
        "dtypes": jax.tree.map(lambda a: str(a.dtype), params),
    }
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    save_tree(path / "params", params)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path / "tokenizer"))


def load_model(path, tokenizer: bool = True) -> SavedModel:
    """Read back what save_model wrote, parameters in their saved dtypes."""
    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    like = jax.tree.map(
        lambda s, d: jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d)), meta["shapes"], meta["dtypes"],
        is_leaf=lambda x: isinstance(x, list),
    )
    params = restore_tree(path / "params", like)
    tok = None
    if tokenizer and (path / "tokenizer").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return SavedModel(config_from_json(meta["config"]), params, tok, meta.get("name"))
