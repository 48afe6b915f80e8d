"""NaN in a sweep's results: the error that names the first bad cell."""

from __future__ import annotations

import jax
import numpy as np


class SweepError(ValueError):
    """A sweep whose results hold NaN. `results` holds them as computed (NaN kept), `cell` the index
    of the first bad cell."""

    def __init__(self, msg, results=None, cell=None):
        super().__init__(msg)
        self.results, self.cell = results, cell


def describe_cell(cells: dict, i: int, cell_labels: dict | None) -> str:
    """'layer=L3, pos=5 ("Mary")': cell i by its keys, through cell_labels where given."""
    parts = []
    for k, v in cells.items():
        x = np.asarray(v)[i]
        if x.ndim == 0 and cell_labels and k in cell_labels:
            parts.append(f"{k}={cell_labels[k][int(x)]} (index {int(x)})")
        elif x.ndim == 0:
            parts.append(f"{k}={x.item()}")
        else:
            parts.append(f"{k}={np.array2string(x, threshold=8)}")
    return ", ".join(parts) or f"cell {i}"


def check_nan(results, cells: dict, cell_labels, desc: str):
    """Raise SweepError naming the first cell whose output holds NaN (the metric's or the cell function's)."""
    N = len(next(iter(cells.values()), ()))
    if N == 0:
        return
    bad = np.zeros(N, bool)
    for r in jax.tree.leaves(results):
        r = np.asarray(r)
        if np.issubdtype(r.dtype, np.floating) and r.size:
            bad |= np.isnan(r.reshape(N, -1)).any(axis=1)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    raise SweepError(
        f"{desc}: the result is NaN at {int(bad.sum())} of {N} cells, the first at {describe_cell(cells, i, cell_labels)}. "
        "The metric divides by zero or takes log(0) there (e.g. metrics.normalized where clean and corrupted "
        "score alike), or an edit value built inside the sweep holds NaN (values made in a compiled sweep are "
        "not checked when built: check the data it reads, e.g. a cache, for NaN). Pass allow_nan=True to get "
        "the results with NaN kept.",
        results, i,
    )
