"""Figures (PNG via matplotlib's Agg backend): heatmaps with labelled axes, attention patterns."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def heatmap(ax, values, row_labels, col_labels, title="", cmap="RdBu_r", center=True, annotate=None, cbar=True):
    """Draw a 2-D array with labelled rows/columns on ax (NaN cells blank)."""
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    lim = np.abs(finite).max() if finite.size else 1.0
    kw = dict(vmin=-lim, vmax=lim) if center else dict(vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, aspect="auto", **kw)
    ax.set_title(title, fontsize=10)
    step_r = max(1, len(row_labels) // 24)
    step_c = max(1, len(col_labels) // 32)
    ax.set_yticks(range(0, len(row_labels), step_r), [str(r) for r in row_labels][::step_r], fontsize=7)
    ax.set_xticks(range(0, len(col_labels), step_c), [str(c) for c in col_labels][::step_c], fontsize=7, rotation=90)
    if annotate is None:
        annotate = v.size <= 64 and v.shape[-1] <= 12
    if annotate:
        for (i, j), x in np.ndenumerate(v):
            if np.isfinite(x):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7)
    if cbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return im


def save_heatmaps(path, panels, ncols=None, panel_size=(4.2, 3.4), suptitle=None):
    """panels: list of dicts with keys values, row_labels, col_labels and optional title/cmap/center/xlabel/ylabel."""
    plt = _plt()
    n = len(panels)
    ncols = ncols or min(n, 3)
    nrows = -(-n // ncols)
    widest = max(len(p["col_labels"]) for p in panels)
    tallest = max(len(p["row_labels"]) for p in panels)
    w = max(panel_size[0], 1.5 + 0.25 * widest)
    h = max(panel_size[1], 1.5 + 0.25 * min(tallest, 40))
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        heatmap(ax, p["values"], p["row_labels"], p["col_labels"], p.get("title", ""), p.get("cmap", "RdBu_r"), p.get("center", True), p.get("annotate"))
        ax.set_xlabel(p.get("xlabel", ""), fontsize=8)
        ax.set_ylabel(p.get("ylabel", ""), fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
