"""Family registry: each module maps an HF config and checkpoint onto the generic decoder.

A family module defines MODEL_TYPES (HF `model_type` strings), `config(hf_config) -> Config`
and `params(reader, cfg, hf_config) -> nested dict of numpy arrays` (see jinterp/arch/decoder.py for names
and shapes). Checkpoint tensors are read through `Reader`, which names any missing or
mis-shaped tensor.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

_MODULES = ("gpt2", "neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


class UnsupportedArchitecture(ValueError):
    pass


class CheckpointError(ValueError):
    pass


def registry() -> dict[str, object]:
    out = {}
    for m in _MODULES:
        mod = importlib.import_module(f"jinterp.arch.families.{m}")
        for t in mod.MODEL_TYPES:
            out[t] = mod
    return out


def supported() -> list[str]:
    return sorted(registry())


def family_for(hf_config):
    mt = getattr(hf_config, "model_type", None)
    reg = registry()
    if mt not in reg:
        arch = (getattr(hf_config, "architectures", None) or [mt])[0]
        raise UnsupportedArchitecture(
            f"unsupported architecture {arch!r} (model_type {mt!r}). jinterp supports model types: "
            f"{', '.join(supported())}."
        )
    return reg[mt]


def hf_attr(hf, *names, default=None):
    """First attribute of the HF config that is present and not None."""
    for n in names:
        v = getattr(hf, n, None)
        if v is not None:
            return v
    return default


def rope_settings(hf, head_dim: int) -> dict:
    """Rotary settings from an HF config, wherever this transformers version keeps them.

    transformers 5 keeps them in `rope_parameters`; older configs use rope_theta / rope_scaling /
    rotary_pct / rotary_emb_base.
    """
    rp = dict(getattr(hf, "rope_parameters", None) or {})
    if rp and all(isinstance(v, dict) for v in rp.values()):
        raise UnsupportedArchitecture("per-layer-type rotary settings (rope_parameters by layer type) are not supported")
    legacy = dict(getattr(hf, "rope_scaling", None) or {})
    theta = rp.get("rope_theta", hf_attr(hf, "rope_theta", "rotary_emb_base", default=10000.0))
    partial = rp.get("partial_rotary_factor", hf_attr(hf, "partial_rotary_factor", "rotary_pct", default=1.0))
    scaling = {**legacy, **{k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    keep = {"rope_type": kind}
    if kind == "linear":
        keep["factor"] = float(scaling["factor"])
    elif kind == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            keep[k] = float(scaling[k])
        keep["original_max_position_embeddings"] = int(
            scaling.get("original_max_position_embeddings") or hf.max_position_embeddings
        )
    elif kind != "default":
        raise UnsupportedArchitecture(
            f"rotary scaling {kind!r} is not supported (supported: default, linear, llama3)"
        )
    return dict(
        positional="rotary",
        rope_theta=float(theta),
        rotary_dim=int(head_dim * float(partial)),
        rope_scaling=tuple(sorted(keep.items())),
    )


def layer_windows(hf, n_layers: int, all_layers: bool = False) -> tuple:
    """Per-layer sliding windows from `layer_types` (or every layer when all_layers and sliding_window is set)."""
    w = getattr(hf, "sliding_window", None)
    if not w:
        return ()
    types = getattr(hf, "layer_types", None)
    if types:
        out = tuple(int(w) if t == "sliding_attention" else 0 for t in types)
    elif all_layers:
        out = (int(w),) * n_layers
    else:
        return ()
    return out if any(out) else ()


class Reader:
    """Named tensors from safetensors files (one file, or a sharded index), read lazily as numpy."""

    def __init__(self, directory: str | os.PathLike, prefixes=("",)):
        from safetensors import safe_open

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

    def get(self, name: str, shape: tuple | None = None) -> np.ndarray:
        full = self._full(name)
        if full not in self._where:
            raise CheckpointError(
                f"checkpoint in {self.dir} is missing tensor {full!r}"
                + (f" (expected shape {list(shape)})" if shape else "")
                + ". Is it the right model type, and complete?"
            )
        h = self._handles[self._where[full]]
        got = tuple(h.get_slice(full).get_shape())
        if shape is not None and got != tuple(shape):
            raise CheckpointError(
                f"tensor {full!r} has shape {list(got)} but the config implies {list(shape)}. "
                "The checkpoint and config.json disagree."
            )
        try:
            a = h.get_tensor(full)
        except Exception as e:
            raise CheckpointError(f"could not read tensor {full!r} from {self._where[full]}: {e}. The file may be corrupted.") from e
        self.used.add(full)
        return a

    def stack(self, fmt: str, n_layers: int, shape: tuple | None = None, fn: Callable | None = None) -> np.ndarray:
        """np.stack of fmt.format(l) for every layer, each checked against shape and mapped by fn."""
        out = []
        for l in range(n_layers):
            a = self.get(fmt.format(l), shape)
            out.append(fn(a) if fn else a)
        return np.stack(out)

    def unused(self) -> list[str]:
        return [n for n in self._where if n not in self.used]


def zeros(shape, like):
    return np.zeros(shape, dtype=like.dtype)
