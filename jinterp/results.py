"""Labelled results: arrays with named axes and a label per index, and a dict of them.

Every recipe returns a `Labelled` (or a `Results` of them): `to_dataframe()`, `top(k)`,
`heatmap(path)`, `save(stem)` (.npz + .csv), and a one-line repr. `label_grid` is the one path
by which recipes label a grid of cells: cell axes from the model (layer, pos, head, kv_head),
then the metric's own output axes (a metric declares them with an `axes` attribute, e.g.
("example",) for per-example metrics; undeclared ones are named out0, out1, ...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jinterp import plots


@dataclasses.dataclass
class Labelled:
    """An array with named axes and a label per index (TransformerLens-style `L3H5` heads, token strings...)."""

    values: np.ndarray
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    name: str = "value"

    def __post_init__(self):
        self.values = np.asarray(self.values)
        assert self.values.ndim == len(self.axes) == len(self.labels), (self.values.shape, self.axes)
        for n, lab in zip(self.values.shape, self.labels):
            assert n == len(lab), (self.values.shape, [len(l) for l in self.labels])

    @property
    def shape(self):
        return self.values.shape

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __getitem__(self, idx):
        return self.values[idx]

    def __repr__(self):
        v = self.values
        stats = ""
        if v.size and np.issubdtype(v.dtype, np.number):
            fin = v[np.isfinite(v)] if np.issubdtype(v.dtype, np.floating) else v
            if fin.size:
                (lab, val), = self.top(1)
                stats = f", range [{fin.min():.4g}, {fin.max():.4g}], max at {'/'.join(lab)} = {val:.4g}"
        return f"Labelled({self.name}: {dict(zip(self.axes, self.shape))}{stats})"

    def to_dataframe(self):
        """Long format: one column per axis (its labels) plus `<axis>_index` columns, and the value."""
        import pandas as pd

        idx = np.indices(self.shape).reshape(len(self.shape), -1)
        cols = {}
        for a, lab, i in zip(self.axes, self.labels, idx):
            cols[a] = np.asarray(lab, dtype=object)[i]
            cols[f"{a}_index"] = i
        cols[self.name] = self.values.reshape(-1)
        return pd.DataFrame(cols)

    def top(self, k: int = 10, largest: bool = True):
        """The k cells with the largest (or smallest) values: [(label tuple, value)]."""
        flat = np.nan_to_num(self.values.reshape(-1), nan=-np.inf if largest else np.inf)
        order = np.argsort(flat)[::-1] if largest else np.argsort(flat)
        out = []
        for f in order[:k]:
            ix = np.unravel_index(f, self.shape)
            out.append((tuple(self.labels[d][i] for d, i in enumerate(ix)), float(self.values[ix])))
        return out

    def heatmap(self, path, title: str | None = None, **kw):
        """Write a PNG: a 2-D result as one heatmap; higher-rank results as one panel per leading index."""
        v = self.values
        if v.ndim == 1:
            v, rows, cols, ra = v[None], ("",), self.labels[0], ""
            panels = [dict(values=v, row_labels=rows, col_labels=cols, title=title or self.name, xlabel=self.axes[0], ylabel=ra, **kw)]
        elif v.ndim == 2:
            panels = [dict(values=v, row_labels=self.labels[0], col_labels=self.labels[1], title=title or self.name,
                           ylabel=self.axes[0], xlabel=self.axes[1], **kw)]
        else:
            lead = v.reshape((-1,) + v.shape[-2:])
            lead_labels = [
                ", ".join(self.labels[d][i] for d, i in enumerate(ix)) for ix in np.ndindex(*v.shape[:-2])
            ]
            panels = [
                dict(values=lead[i], row_labels=self.labels[-2], col_labels=self.labels[-1], title=f"{title or self.name}: {lead_labels[i]}",
                     ylabel=self.axes[-2], xlabel=self.axes[-1], **kw)
                for i in range(lead.shape[0])
            ]
        return plots.save_heatmaps(path, panels)

    def save(self, path_stem) -> tuple[Path, Path]:
        """Raw array (.npz with axes and labels) and a table (.csv) next to each other."""
        stem = Path(path_stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        npz = stem.with_suffix(".npz")
        np.savez(npz, values=self.values, axes=np.asarray(self.axes), **{f"labels_{a}": np.asarray(l) for a, l in zip(self.axes, self.labels)})
        csv = stem.with_suffix(".csv")
        self.to_dataframe().to_csv(csv, index=False)
        return npz, csv


class Results(dict):
    """A dict of Labelled results (or other values) with a one-screen repr."""

    def __init__(self, *args, name: str = "results", **kw):
        super().__init__(*args, **kw)
        self.name = name

    def __repr__(self):
        lines = [f"Results({self.name}):"]
        for k, v in self.items():
            r = repr(v) if isinstance(v, Labelled) or np.ndim(v) == 0 else f"array{list(np.shape(v))}"
            lines.append(f"  {k}: {r if len(r) < 160 else r[:157] + '...'}")
        return "\n".join(lines)

    def stack(self, axis: str = "component") -> Labelled:
        """The Labelled results stacked on a new leading axis (they must share axes and shape)."""
        vals = list(self.values())
        first = vals[0]
        for k, v in self.items():
            if v.axes != first.axes or v.shape != first.shape:
                raise ValueError(
                    f"cannot stack {k!r} {dict(zip(v.axes, v.shape))} with {dict(zip(first.axes, first.shape))}; "
                    "on grouped-query models keys and values have a kv_head axis: use the entries separately"
                )
        return Labelled(np.stack([v.values for v in vals]), (axis,) + first.axes, (tuple(self),) + first.labels, name=self.name)


def axis_labels(model, axis: str, tokens=None) -> tuple[str, ...]:
    """Labels of a model axis: layer "0".., head "H0".., kv_head "KV0".., pos "3:word" (or "3")."""
    c = model.config
    if axis == "layer":
        return tuple(str(l) for l in range(c.n_layers))
    if axis == "head":
        return tuple(f"H{h}" for h in range(c.n_heads))
    if axis == "kv_head":
        return tuple(f"KV{h}" for h in range(c.n_kv_heads))
    if axis == "pos":
        P = np.shape(tokens)[-1]
        if model.tokenizer is not None and np.ndim(tokens) == 2:
            strs = model.to_str_tokens(np.asarray(tokens)[0])
            return tuple(f"{p}:{t}" for p, t in enumerate(strs))
        return tuple(str(p) for p in range(P))
    raise ValueError(f"no labels for axis {axis!r}")


def metric_axes(metric, n: int) -> tuple[str, ...]:
    """Names of the n trailing axes a metric's output adds (declared by metric.axes, else out0..)."""
    declared = tuple(getattr(metric, "axes", ()) or ())
    if len(declared) == n:
        return declared
    return tuple(f"out{i}" for i in range(n))


def label_grid(values, cell_axes: dict, metric=None, name: str = "value") -> Labelled:
    """Label values [*cell grid, *metric output] : cell_axes maps each grid axis to its labels."""
    values = np.asarray(values)
    n_cell = len(cell_axes)
    extra = values.shape[n_cell:]
    axes = tuple(cell_axes) + metric_axes(metric, len(extra))
    labels = tuple(tuple(l) for l in cell_axes.values()) + tuple(tuple(map(str, range(n))) for n in extra)
    return Labelled(values, axes, labels, name=name)
