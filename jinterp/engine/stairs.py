"""Planning a staircase sweep: cells grouped by first changed position, then run in one pass per
chunk whose batch grows layer by layer (arch.resume_cells).

Positions: a cell whose edits start at position p re-runs positions >= its bucket's start. The
bucket starts are chosen per sweep from the cells' first positions: the fewest buckets (each is
one compiled program) whose re-run rows stay within `slack` of the exact minimum.

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


def bucket_starts(first_pos, P: int, slack: float = 0.1, max_buckets: int = 8) -> list[int]:
    """Fewest bucket starts (at most max_buckets) such that the rows re-run, sum over cells of
    P - start, are within (1 + slack) of the minimum sum of P - first_pos; the best found otherwise.
    Exact dynamic programme over the distinct first positions."""
    fp = np.asarray(first_pos, np.int64)
    if fp.size == 0:
        return [0]
    minimum = float((P - fp).sum())
    q = -(-P // 128)  # long prompts: candidate starts on a grid of P / 128 (starting earlier stays exact)
    fp = fp // q * q
    vals, cnt = np.unique(fp, return_counts=True)
    n = len(vals)
    # cost[i, j]: rows when distinct positions i..j-1 share the start vals[i]
    csum = np.concatenate([[0], np.cumsum(cnt)])
    cost = lambda i, j: (csum[j] - csum[i]) * (P - vals[i])
    best_prev = None
    inf = float("inf")
    dp = np.full(n + 1, inf)
    dp[0] = 0.0
    arg = np.zeros((max_buckets + 1, n + 1), np.int64)
    for k in range(1, min(max_buckets, n) + 1):
        new = np.full(n + 1, inf)
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = dp[i] + cost(i, j)
                if c < new[j]:
                    new[j], arg[k, j] = c, i
        dp = new
        best_prev = k
        if dp[n] <= (1 + slack) * max(minimum, 1.0):
            break
    starts, j = [], n
    for k in range(best_prev, 0, -1):
        i = arg[k, j]
        starts.append(int(vals[i]))
        j = i
    return sorted(starts)


def stair_plan(first_layer, first_pos, todo, *, P: int, n_layers: int, cap: int, n_devices: int = 1,
               buckets: bool = True, unchanged_prefix: int = 0, slack: float = 0.1) -> list[StairChunk]:
    """Chunks covering cells `todo` (at most `cap` real cells each), given each cell's first changed
    layer and position."""
    todo = np.asarray(todo)
    fc = np.maximum(np.asarray(first_pos), int(unchanged_prefix))
    fl = np.asarray(first_layer)
    starts = bucket_starts(fc[todo], P, slack) if buckets and len(todo) else [0]
    s0 = np.array([max([s for s in starts if s <= c] or [0]) for c in fc], np.int64)
    out = []
    for s in sorted(set(s0[todo].tolist())):
        idx = todo[s0[todo] == s]
        idx = idx[np.argsort(fl[idx], kind="stable")]
        cap_d = max(n_devices, cap - cap % n_devices)
        for i in range(0, len(idx), cap_d):
            out.append(_chunk(idx[i : i + cap_d], fl, int(s), n_layers, n_devices))
    return out


def _chunk(idx, fl, s0, n_layers, n_dev):
    first = int(fl[idx].min())
    by_layer = [idx[fl[idx] == l] for l in range(first, n_layers)]
    counts = tuple(-(-len(c) // n_dev) for c in by_layer)
    order, real = [], []
    for d in range(n_dev):
        for c, k in zip(by_layer, counts):
            mine = c[d::n_dev]
            pad = k - len(mine)
            order.extend(mine.tolist() + ([int(c[0])] * pad if pad else []))
            real.extend([True] * len(mine) + [False] * pad)
    return StairChunk(s0, first, counts, np.asarray(order, np.int64), np.asarray(real, bool))


def small_groups(first_layer, first_pos, todo, *, P: int, batch: int, buckets: bool = True, unchanged_prefix: int = 0,
                 min_rows: int = 256) -> bool:
    """Whether grouping the cells by (bucket, first layer), one program call per group, would leave
    matrix products of fewer than `min_rows` rows on average (weighted by cells): then a staircase
    pays for its larger program (it compiles one block per layer instead of a scanned block)."""
    todo = np.asarray(todo)
    if len(todo) == 0:
        return False
    fc = np.maximum(np.asarray(first_pos), int(unchanged_prefix))[todo]
    starts = bucket_starts(fc, P) if buckets else [0]
    s0 = np.array([max([s for s in starts if s <= c] or [0]) for c in fc])
    key = s0 * 1_000_003 + np.asarray(first_layer)[todo]
    _, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    rows = cnt[inv] * batch * (P - s0)
    return float(rows.mean()) < min_rows
