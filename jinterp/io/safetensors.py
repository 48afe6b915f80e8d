"""Named tensors from safetensors checkpoints (one file, or a sharded index), read lazily as numpy.

Every failure is a CheckpointError that names the file or tensor and what to do about it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, or disagrees with its config."""


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
