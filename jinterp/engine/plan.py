"""Planning a sweep: which cells share a compiled program, and how many run at once.

A cell whose edits start at layer l and position p only needs layers >= l and positions >= p
re-run. Positions are grouped into a few static *buckets* (each compiles once; a cell runs in the
narrowest bucket that still holds its first changed position), cells within a bucket are grouped
by first layer (a traced start index), and each group is split into chunks sized to a memory
budget.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

# a sweep's chunks may take this fraction of a device's free memory (the rest: parameters already
# counted as in use on GPU, the base run, XLA's scratch, and the host's other work on CPU)
MEMORY_FRACTION = 0.5


def device_memory(device=None) -> int:
    """Bytes free on one device: an accelerator's own figure (bytes_limit - bytes_in_use); on CPU
    the host's available memory shared among the local CPU devices."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(avail // max(1, len([d for d in jax.local_devices() if d.platform == "cpu"])))


def chunk_budget(memory: float | None = None) -> float:
    """Bytes a sweep's chunk may use: MEMORY_FRACTION of `memory` (default: device_memory())."""
    return MEMORY_FRACTION * (device_memory() if memory is None else memory)


def position_buckets(P: int, min_width: int = 4) -> list[int]:
    """Static bucket starts: 0, then the last P//2, P//4, ... positions. Finer buckets were tried:
    they split cells into chunks too small for efficient matrix products."""
    out, w = [0], P
    while w // 2 >= min_width:
        w //= 2
        out.append(P - w)
    return out


def bytes_per_cell(cfg, B, S, P, n_pos, n_vocab, itemsize) -> int:
    """A rough peak of one cell's live activations: the widest layer intermediates plus its logits."""
    mlp = cfg.d_mlp * cfg.n_experts + cfg.d_shared if cfg.mlp == "moe" else cfg.d_mlp  # MoE: every expert runs
    per_row = 6 * cfg.d_model + 3 * mlp + 2 * cfg.n_heads * P
    return 2 * itemsize * B * (S * per_row + n_pos * n_vocab)


@dataclasses.dataclass(frozen=True)
class Chunk:
    s0: int  # first re-run position (a bucket start)
    layer: int  # first re-run layer
    size: int  # padded chunk size (compiled shape)
    cells: np.ndarray  # indices of the cells it runs


def plan(first_layer, first_pos, todo, *, cfg, batch, P, positions, vocab, itemsize, buckets=True,
         unchanged_prefix=0, chunk_size=None, memory_budget=None, n_devices=1) -> list[Chunk]:
    """Chunks covering the cells `todo`, given each cell's first changed layer and position.
    memory_budget: bytes a chunk may take (None: chunk_budget())."""
    budget = chunk_budget() if memory_budget is None else memory_budget
    fc = np.maximum(first_pos, int(unchanged_prefix))
    starts = position_buckets(P) if buckets else [0]
    if buckets and 0 < unchanged_prefix < P:
        starts = sorted(set(starts) | {int(unchanged_prefix)})
    s0 = np.array([max(s for s in starts if s <= c) for c in fc], np.int32)
    out = []
    for s in sorted(set(s0[todo].tolist())):
        in_bucket = todo[s0[todo] == s]
        layers = sorted(set(first_layer[in_bucket].tolist()))
        biggest = max(int((first_layer[in_bucket] == l).sum()) for l in layers)
        S = P - s
        n_pos = len(positions or range(S))
        n_voc = len(vocab or range(cfg.d_vocab))
        cap = chunk_size or max(1, int(budget // bytes_per_cell(cfg, batch, S, P, n_pos, n_voc, itemsize)))
        C = max(1, min(cap, biggest))
        C = n_devices * math.ceil(C / n_devices)
        for l in layers:
            idx = in_bucket[first_layer[in_bucket] == l]
            for i in range(0, len(idx), C):
                out.append(Chunk(int(s), int(l), C, idx[i : i + C]))
    return out
