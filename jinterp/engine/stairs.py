"""Planning a staircase sweep: cells grouped by first changed position, then run in one pass per
chunk whose batch grows layer by layer (arch.resume_cells).

Positions: a cell whose edits start at position p re-runs positions >= its bucket's start. The
bucket starts are chosen per sweep from the cells' first positions, trading rows re-run in vain
against the fixed cost of another bucket (one more compiled program, weights read once more,
small products while its batch grows): `bucket_starts`.

Layers: within a bucket, cells are sorted by first changed layer; a chunk runs block l once for
every cell already started, so each cell computes exactly the layers >= its own start while the
matrix products span every started cell, and each layer's weights are read once per chunk.

Devices: with n devices, each device gets the same number of cells per start layer (its slice
must have the program's static shape); short layers are padded with repeats of one of their
cells, whose outputs are dropped.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class StairChunk:
    s0: int  # first re-run position (the bucket start)
    first: int  # first layer any of its cells starts at
    counts: tuple  # per device: cells starting at layers first, first + 1, ..., n_layers - 1
    order: np.ndarray  # cell indices, device-major, with pads
    real: np.ndarray  # False where order holds a pad

    @property
    def cells(self) -> np.ndarray:
        return self.order[self.real]


# A bucket (one compiled program) costs about this many re-run rows on top of its own: each program
# reads every layer's weights once (on CPU as long as ~64 rows of products take), its first layers
# run products too small to reach the machine's rate (~32 rows lost, twice over as a staircase's
# batch grows from nothing), and it compiles once (seconds). 192 was fastest warm on the llama-1b
# and GPT-2-small benchmark shapes but compiled 8 programs for GPT-2; 384 compiles 5 there and keeps
# 2 buckets for llama-1b (512 merged those into 1: 12% slower warm). See BUILD_NOTES.
BUCKET_ROWS = 384


def bucket_starts(first_pos, P: int, batch: int = 1, bucket_rows: int | None = None, max_buckets: int = 16,
                  waste: float = 1.0) -> list[int]:
    """Bucket starts minimising the rows re-run (sum over cells of batch x (P - start)) plus
    `bucket_rows` (default BUCKET_ROWS) per bucket: exact dynamic programme over the distinct first
    positions. waste: what a row before a cell's own first position costs, as a share of a row (1: it is
    re-run whole; packed cells, arch.resume_cells, run only its attention)."""
    bucket_rows = BUCKET_ROWS if bucket_rows is None else bucket_rows
    fp = np.asarray(first_pos, np.int64)
    if fp.size == 0:
        return [0]
    q = -(-P // 128)  # long prompts: candidate starts on a grid of P / 128 (starting earlier stays exact)
    vals, cnt = np.unique(fp // q * q, return_counts=True)
    n = len(vals)
    csum = np.concatenate([[0], np.cumsum(cnt)])
    need = np.concatenate([[0], np.cumsum(cnt * (P - vals))])  # rows from each cell's own first position
    cost = lambda i, j: (need[j] - need[i] + waste * ((csum[j] - csum[i]) * (P - vals[i]) - need[j] + need[i])) * batch + bucket_rows
    best, arg = [0.0] + [np.inf] * n, [[]] + [None] * n
    # best[j]: cheapest cover of the first j distinct positions; arg[j]: its starts (at most max_buckets)
    for j in range(1, n + 1):
        for i in range(j):
            if arg[i] is not None and len(arg[i]) < max_buckets and best[i] + cost(i, j) < best[j]:
                best[j], arg[j] = best[i] + cost(i, j), arg[i] + [int(vals[i])]
    return arg[n]


def stair_plan(first_layer, first_pos, todo, *, P: int, n_layers: int, cap: int, n_devices: int = 1,
               batch: int = 1, buckets: bool = True, unchanged_prefix: int = 0, waste: float = 1.0) -> list[StairChunk]:
    """Chunks covering cells `todo` (at most `cap` real cells each), given each cell's first changed
    layer and position (waste: see bucket_starts)."""
    todo = np.asarray(todo)
    fc = np.maximum(np.asarray(first_pos), int(unchanged_prefix))
    fl = np.asarray(first_layer)
    starts = bucket_starts(fc[todo], P, batch, waste=waste) if buckets and len(todo) else [0]
    s0 = np.array([max([s for s in starts if s <= c] or [0]) for c in fc], np.int64)
    out = []
    for s in sorted(set(s0[todo].tolist())):
        idx = todo[s0[todo] == s]
        idx = idx[np.argsort(fl[idx], kind="stable")]
        cap_d = max(n_devices, cap - cap % n_devices)
        for i in range(0, len(idx), cap_d):
            out.append(_chunk(idx[i : i + cap_d], fl, fc, int(s), n_layers, n_devices))
    return out


def _chunk(idx, fl, fc, s0, n_layers, n_dev):
    """A start layer's cells are dealt to the devices in order of first position, back and forth (0..n-1,
    then n-1..0, continuing over the layers), so every device gets about as many rows to re-run at every
    layer (a packed program on a mesh sizes its products for the busiest device); pads repeat the
    layer's last cell."""
    first = int(fl[idx].min())
    by_layer = [c[np.argsort(fc[c], kind="stable")] for c in (idx[fl[idx] == l] for l in range(first, n_layers))]
    counts = tuple(-(-len(c) // n_dev) for c in by_layer)
    dealt, n = [], 0  # per layer: [k, devices] cell indices and whether each is real (not a pad); n: slots so far
    for c, k in zip(by_layer, counts):
        cell, real = np.full(k * n_dev, c[-1] if len(c) else 0, np.int64), np.arange(k * n_dev) < len(c)
        cell[: len(c)] = c
        cell, real = cell.reshape(k, n_dev), real.reshape(k, n_dev)
        back = (n + np.arange(k)) % 2 == 1  # the direction alternates over the chunk's slots, layers included
        cell[back], real[back] = cell[back, ::-1], real[back, ::-1]
        dealt.append((cell, real))
        n += k
    order = [cell[:, d] for d in range(n_dev) for cell, _ in dealt]
    real = [r[:, d] for d in range(n_dev) for _, r in dealt]
    return StairChunk(s0, first, counts, np.concatenate(order).astype(np.int64), np.concatenate(real))


def small_groups(first_layer, first_pos, todo, *, P: int, batch: int, buckets: bool = True, unchanged_prefix: int = 0,
                 min_rows: int = 256) -> bool:
    """Whether grouping the cells by (bucket, first layer), one program call per group, would leave
    matrix products of fewer than `min_rows` rows on average (weighted by cells): then a staircase
    pays for its larger program (it compiles one block per layer instead of a scanned block)."""
    todo = np.asarray(todo)
    if len(todo) == 0:
        return False
    fc = np.maximum(np.asarray(first_pos), int(unchanged_prefix))[todo]
    starts = bucket_starts(fc, P, batch) if buckets else [0]
    s0 = np.array([max([s for s in starts if s <= c] or [0]) for c in fc])
    key = s0 * 1_000_003 + np.asarray(first_layer)[todo]
    _, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    rows = cnt[inv] * batch * (P - s0)
    return float(rows.mean()) < min_rows

