"""The one sweep driver: every recipe (patching, path patching, back-patching, ablation scans) builds
cells and a cell function, then calls `sweep`.

A *cell* is one point of the sweep (say layer 3, position 5); `cells` is a dict of arrays with a
leading axis over all N cells. A *cell function* is a frozen (hashable) dataclass called as
`cell_fn(cell, data, runner)`: it builds edits from its cell and from `data` (arrays shared by all
cells, e.g. a clean cache) and asks the runner for a score. Because the cell function is static
and hashable by value and everything else is an array, the whole sweep is one compiled program:
repeated sweeps with the same shapes reuse it.

The driver:
- vmaps the cell function over chunks of cells, sized to a memory budget;
- computes only what changes (DESIGN.md principle 6): a cell whose edits start at layer l and
  position p re-runs layers >= l (from the base run's cached residual) and positions >= p (reading
  the base run's keys and values before p), and the last block and unembedding run only at the
  positions the metric reads;
- shows progress, shards the cell axis over a device mesh, checkpoints finished cells so an
  interrupted sweep resumes, and returns results that recipes label (`Labelled`).

Results equal the naive computation (one full forward per cell) up to float rounding; the tests
check this against per-cell loops.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jinterp import sites as S
from jinterp.arch import decoder as D

PRE_BLOCK_SITES = ("hook_embed", "hook_pos_embed")
# block sites from which a block can resume with the base run's attention mixes
AFTER_ATTENTION = S.BLOCK_ORDER[S.BLOCK_ORDER.index("attn.hook_z"):]


# ----------------------------------------------------------------------------------------
# labelled results


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
        return f"Labelled({self.name}: {dict(zip(self.axes, self.shape))})"

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
        from jinterp import plots

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


def head_labels(n_layers: int, n_heads: int) -> tuple[str, ...]:
    return tuple(f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads))


# ----------------------------------------------------------------------------------------
# the base run


@struct.dataclass
class Base:
    """What a partial re-run reads from the unedited run: residuals entering each block, every
    block's keys/values, the final residual, and the sequence geometry."""

    tokens: jax.Array  # [B, P]
    mask: jax.Array  # [B, P] bool
    pos_ids: jax.Array  # [B, P]
    resid_pre: jax.Array  # [L, B, P, D]
    z: jax.Array  # [L, B, P, H, dh] attention mixes (to resume a block after its attention)
    kv: tuple  # (K, V) each [L, B, P, Hkv, dh]
    resid_final: jax.Array  # [B, P, D] output of the last block


@functools.partial(jax.jit, static_argnames=("cfg",))
def _base_run(params, tokens, mask, *, cfg):
    B, P = tokens.shape
    pos = D.position_ids(mask)
    every = tuple(range(cfg.n_layers))
    ctx = D.Ctx(cfg, (), {"hook_resid_pre": every, "attn.hook_z": every}, n_prompt=P, n_keys=P, pos_ids=pos, key_valid=mask)
    cols = jnp.arange(P)
    x = D.embed(ctx, params, tokens, cols, {})
    dt = x.dtype
    shape = (cfg.n_layers, B, P, cfg.n_kv_heads, cfg.d_head)
    kv0 = (jnp.zeros(shape, dt), jnp.zeros(shape, dt))
    xf, kv, acts = D.run_stack(ctx, params["blocks"], x, cols, kv=kv0, want_kv=True)
    return Base(tokens, mask, pos, acts["hook_resid_pre"], acts["attn.hook_z"], kv, xf)


def base_run(model, tokens, attention_mask=None) -> Base:
    tokens, mask = model._inputs(tokens, attention_mask)
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    return _base_run(model.params, tokens, mask, cfg=model.config)


# ----------------------------------------------------------------------------------------
# the runner handed to cell functions


class Runner:
    """Partial forward passes from a base run, inside one compiled chunk.

    start: traced layer index where this chunk's edits begin; s0: static first position that can
    change; positions / vocab: static tuples of the positions and token ids the metric reads
    (None = all).
    """

    def __init__(self, params, cfg, base: Base, start, s0: int, positions, metric, vocab=None):
        self.params, self.cfg, self.base = params, cfg, base
        self.start, self.s0, self.positions, self.metric, self.vocab = start, s0, positions, metric, vocab
        self.P = base.tokens.shape[1]

    def _ctx(self, edits, record=None):
        b = self.base
        return D.Ctx(self.cfg, edits, record, n_prompt=self.P, n_keys=self.P, pos_ids=b.pos_ids, key_valid=b.mask)

    def _x0(self, ctx, edits, start, s0):
        cols = jnp.arange(s0, self.P)
        if any(e.site in PRE_BLOCK_SITES for e in edits):  # embedding edits: run from the tokens
            return D.embed(ctx, self.params, self.base.tokens[:, s0:], cols, {}), 0
        x0 = lax.dynamic_index_in_dim(self.base.resid_pre, start, 0, keepdims=False)[:, s0:]
        return x0, start

    def logits(self, edits, start=None):
        """Edited logits as a [B, P, V] view; only the positions and token ids the metric reads hold real
        values. When no edit targets a block site before attn.hook_z, the start block resumes from the
        base run's attention mixes instead of recomputing attention."""
        edits = tuple(edits)
        start = self.start if start is None else start
        s0, P = self.s0, self.P
        ctx = self._ctx(edits)
        x0, start = self._x0(ctx, edits, start, s0)
        cols = jnp.arange(s0, P)
        kv = self.base.kv if s0 > 0 else None
        want = tuple(range(P)) if self.positions is None else self.positions
        inside = tuple(p for p in want if p >= s0)
        before = tuple(p for p in want if p < s0)
        qsel = None if self.positions is None else np.asarray([p - s0 for p in inside], np.int32)
        resume = all(e.site in AFTER_ATTENTION or e.site.startswith("ln_final") for e in edits)
        rz = self.base.z[:, :, s0:] if resume else None
        parts = []
        if before:  # positions before the window hold the base run's final residual
            idx = np.asarray(before, np.int32)
            parts.append(D.unembed(ctx, self.params, self.base.resid_final[:, idx], jnp.asarray(idx), {}, vocab=self.vocab))
        if inside:
            x, _, _ = D.run_stack(ctx, self.params["blocks"], x0, cols, kv=kv, start=start, final_qsel=qsel, resume_z=rz)
            parts.append(D.unembed(ctx, self.params, x, jnp.asarray(inside, np.int32), {}, vocab=self.vocab))
        rows = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return _view(rows, before + inside, P, self.vocab, self.cfg.d_vocab)

    def score(self, edits, start=None):
        return self.metric(self.logits(edits, start))

    def generate(self, edits, max_new_tokens: int):
        """Greedy continuation of the base tokens with edits (full prefill; edits whose positions lie in the
        prompt act on the prompt pass only) -> [B, max_new_tokens]."""
        b = self.base
        return D.generate(self.params, b.tokens, b.mask, tuple(edits), jax.random.PRNGKey(0), cfg=self.cfg,
                          max_new_tokens=max_new_tokens)

    def record(self, edits, names: dict, start=None):
        """Run every position from `start` with edits, recording {local site: layers} -> acts dict."""
        edits = tuple(edits)
        start = self.start if start is None else start
        # skipped layers record nothing: start no later than the first recorded layer
        first = min(min(ls) for ls in names.values())
        start = jnp.minimum(start, first)
        ctx = self._ctx(edits, names)
        x0, start = self._x0(ctx, edits, start, 0)
        _, _, acts = D.run_stack(ctx, self.params["blocks"], x0, jnp.arange(self.P), start=start)
        return acts


def _view(rows, order, P, vocab, V):
    """rows [B, len(order), len(vocab)] -> a [B, P, V] view holding them at positions `order` and
    token ids `vocab` (other entries repeat them; the metric does not read those). XLA fuses the
    view into the metric's reads, so it is never materialised."""
    if order != tuple(range(P)):
        if len(order) == 1:
            rows = jnp.broadcast_to(rows, (rows.shape[0], P, rows.shape[2]))
        else:
            idx = np.zeros(P, np.int32)
            idx[list(order)] = np.arange(len(order))
            rows = jnp.take(rows, jnp.asarray(idx), axis=1)
    if vocab is not None:
        idx = np.zeros(V, np.int32)
        idx[list(vocab)] = np.arange(len(vocab))
        rows = jnp.take(rows, jnp.asarray(idx), axis=2)
    return rows


# ----------------------------------------------------------------------------------------
# what the metric reads


def probe_reads(metric, logits) -> tuple[tuple | None, tuple | None]:
    """Which positions and which token ids of logits [B, P, V] the metric reads: (positions, vocab),
    each a sorted tuple or None (all / unknown). Computing logits only there is exact only if the
    answer is right, so this errs towards None.

    A metric that declares `reads(P, V)` (jinterp.metrics do) is taken at its word. Otherwise the
    candidates are the entries with a non-zero gradient, confirmed by re-running the metric with
    every other entry replaced by NaN and by random values at several scales: each must leave the
    result unchanged. A gradient that is zero everywhere (argmax, accuracy) means "all".
    """
    logits = jnp.asarray(logits, jnp.float32)
    _, P, V = logits.shape
    if hasattr(metric, "reads"):
        return metric.reads(P, V)
    if hasattr(metric, "inner"):  # an affine rescaling (metrics.Normalized) reads what its metric reads
        return probe_reads(metric.inner, logits)
    try:
        ref = np.asarray(metric(logits))
        g = np.abs(np.asarray(jax.grad(lambda lg: jnp.sum(jnp.asarray(metric(lg), jnp.float32)))(logits)))
    except Exception:
        return None, None
    pos = np.nonzero(g.sum((0, 2)) > 0)[0]
    voc = np.nonzero(g.sum((0, 1)) > 0)[0]
    if pos.size == 0:
        return None, None
    rng = np.random.default_rng(0)

    def confirmed(keep_pos, keep_voc):
        kp, kv = np.zeros(P, bool), np.zeros(V, bool)
        kp[keep_pos], kv[keep_voc] = True, True
        keep = jnp.asarray(kp)[None, :, None] & jnp.asarray(kv)[None, None, :]
        fills = [jnp.nan] + [jnp.asarray(rng.standard_normal(logits.shape) * sc, jnp.float32) for sc in (1.0, 30.0, 1e4)]
        for fill in fills:
            try:
                out = np.asarray(metric(jnp.where(keep, logits, fill)))
            except Exception:
                return False
            if not (np.all(np.isfinite(out)) and np.allclose(out, ref, rtol=1e-6, atol=1e-6)):
                return False
        return True

    as_tuple = lambda a, n: None if len(a) == n else tuple(int(i) for i in a)
    if voc.size and confirmed(pos, voc):
        return as_tuple(pos, P), as_tuple(voc, V)
    if confirmed(pos, np.arange(V)):
        return as_tuple(pos, P), None
    return None, None


def probe_positions(metric, logits) -> tuple[int, ...] | None:
    """The positions of logits [B, P, V] the metric reads (None = all); see probe_reads."""
    return probe_reads(metric, logits)[0]


# ----------------------------------------------------------------------------------------
# the driver


def window_starts(P: int, min_window: int = 4) -> list[int]:
    """Static window starts: 0, then the last P//2, P//4, ... positions (each window compiles once;
    a cell uses the narrowest window that still holds its first changed position). Finer windows
    were tried: they split cells into chunks too small for efficient matrix products."""
    out, w = [0], P
    while w // 2 >= min_window:
        w //= 2
        out.append(P - w)
    return out


def _chunk(params, base, cells, data, start, *, cfg, cell_fn, metric, s0, positions, vocab):
    def one(cell):
        return cell_fn(cell, data, Runner(params, cfg, base, start, s0, positions, metric, vocab))

    return jax.vmap(one)(cells)


@functools.partial(jax.jit, static_argnames=("cfg", "cell_fn", "metric", "s0", "positions", "vocab", "mesh"))
def _run_chunk(params, base, cells, data, start, *, cfg, cell_fn, metric, s0, positions, vocab=None, mesh=None):
    """One chunk of cells, vmapped. With a mesh, shard_map splits the cells over its first axis and
    every device runs the single-device program on its slice (no SPMD partitioning of the model)."""
    body = functools.partial(_chunk, cfg=cfg, cell_fn=cell_fn, metric=metric, s0=s0, positions=positions, vocab=vocab)
    if mesh is None:
        return body(params, base, cells, data, start)
    from jax.sharding import PartitionSpec as PS

    rep, split = PS(), PS(mesh.axis_names[0])
    # each device runs an independent single-device program: no cross-device values to type-check
    return jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, split, rep, rep), out_specs=split, check_vma=False)(
        params, base, cells, data, start
    )


@functools.partial(jax.jit, static_argnames=("cell_fn", "n_layers", "n_prompt"))
def _bounds(cells, data, *, cell_fn, n_layers, n_prompt):
    return jax.vmap(lambda c: cell_fn.bounds(c, data, n_layers, n_prompt))(cells)


def _bytes_per_cell(cfg, B, S, P, n_pos, n_vocab, itemsize):
    """A rough peak of one cell's live activations: the widest layer intermediates plus its logits."""
    per_row = 6 * cfg.d_model + 3 * cfg.d_mlp + 2 * cfg.n_heads * P
    return 2 * itemsize * B * (S * per_row + n_pos * n_vocab)


def _fingerprint(obj, h) -> None:
    """Feed a stable description of obj into hash h: array values, dataclass fields, function code."""
    if isinstance(obj, (np.ndarray, jax.Array)) or hasattr(obj, "__array__") and not callable(obj):
        a = np.asarray(obj)
        h.update(str(a.shape).encode() + str(a.dtype).encode() + np.ascontiguousarray(a).tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(type(obj).__qualname__.encode())
        for f in dataclasses.fields(obj):
            _fingerprint(getattr(obj, f.name), h)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _fingerprint(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _fingerprint(x, h)
    elif hasattr(obj, "__code__"):
        code = obj.__code__
        h.update(f"{obj.__module__}.{obj.__qualname__}".encode() + code.co_code + repr(code.co_consts).encode())
    else:
        h.update(repr(obj).encode())


def _signature(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        _fingerprint(p, h)
    return h.hexdigest()[:16]


def _static_metric(metric):
    try:
        hash(metric)
        return metric
    except TypeError as e:
        raise TypeError(
            "the metric must be hashable (a function, or a frozen dataclass like jinterp.metrics.LogitDiff); "
            f"got {type(metric).__name__}"
        ) from e


def sweep(
    model,
    tokens,
    cells: dict,
    cell_fn,
    *,
    data: Any = None,
    metric: Callable | None = None,
    attention_mask=None,
    base: Base | None = None,
    metric_positions="auto",
    windows: bool = True,
    unchanged_prefix: int = 0,
    chunk_size: int | None = None,
    memory_budget: float = 2e9,
    mesh=None,
    progress: bool | str = True,
    checkpoint_dir=None,
    desc: str = "sweep",
):
    """Run cell_fn over every cell. Returns the stacked outputs (numpy, leading axis N).

    model, tokens, attention_mask: the base run (whose cached residuals partial re-runs start from).
    cells: dict of arrays [N]; cell_fn: frozen dataclass (cell, data, runner) -> pytree, optionally
    with bounds(cell, data, n_layers, n_prompt) -> (first layer, first position) it can change.
    metric: logits [B, P, V] -> scalar (or small array), used by runner.score.
    unchanged_prefix: positions before it hold the same activations in the base run and in the
    runs the cell sources come from (e.g. clean and corrupted prompts agree there), so no edit can
    change them and no cell recomputes them.
    metric_positions: "auto" (probe which positions and token ids the metric reads, and compute
    logits only there), None (all), or the positions.
    mesh: a jax.sharding.Mesh whose first axis splits the cells (shard_map; None: one device).
    checkpoint_dir: save finished cells there (orbax) and resume from them on a re-run.
    """
    cfg = model.config
    if base is None:
        base = base_run(model, tokens, attention_mask)
    P = int(base.tokens.shape[1])
    B = int(base.tokens.shape[0])
    metric = _static_metric(metric) if metric is not None else None
    cells = {k: np.asarray(v) for k, v in cells.items()}
    N = len(next(iter(cells.values())))
    if metric is not None and metric_positions == "auto":
        full = D.unembed(D.Ctx(cfg, n_prompt=P, n_keys=P, pos_ids=base.pos_ids, key_valid=base.mask), model.params, base.resid_final, jnp.arange(P), {})
        positions, vocab = probe_reads(metric, full)
    elif metric_positions in (None, "auto"):
        positions = vocab = None
    else:
        positions = tuple(sorted({int(p) % P for p in np.atleast_1d(metric_positions)}))
        vocab = None

    # where each cell can start
    if hasattr(cell_fn, "bounds"):
        fl, fc = (np.asarray(a) for a in _bounds(cells, data, cell_fn=cell_fn, n_layers=cfg.n_layers, n_prompt=P))
        fl = np.clip(fl, 0, cfg.n_layers - 1)
        fc = np.clip(fc, 0, P)
    else:
        fl, fc = np.zeros(N, np.int32), np.zeros(N, np.int32)
    fc = np.maximum(fc, int(unchanged_prefix))
    starts = window_starts(P) if windows else [0]
    if windows and 0 < unchanged_prefix < P:
        starts = sorted(set(starts) | {int(unchanged_prefix)})
    s0 = np.array([max(s for s in starts if s <= c) for c in fc], np.int32)

    # output buffers, and resumption
    one = jax.tree.map(lambda a: a[:1], cells)
    out_shape = jax.eval_shape(
        lambda c: _run_chunk(model.params, base, c, data, jnp.int32(0), cfg=cfg, cell_fn=cell_fn, metric=metric, s0=0, positions=positions, vocab=vocab), one
    )
    results = jax.tree.map(lambda s: np.full((N,) + s.shape[1:], np.nan if np.issubdtype(s.dtype, np.floating) else 0, s.dtype), out_shape)
    done = np.zeros(N, bool)
    store = None
    if checkpoint_dir is not None:
        from jinterp.checkpoint import SweepStore

        params_sample = [np.asarray(l).ravel()[:4096] for l in jax.tree.leaves(model.params)]
        sig = _signature(cfg, cell_fn, metric, positions, vocab, base.tokens, base.mask, cells, jax.tree.leaves(data), params_sample)
        store = SweepStore(checkpoint_dir, sig)
        restored = store.load(results)
        if restored is not None:
            results, done = restored

    # group cells by (window start, first layer); chunk each group
    n_dev = 1 if mesh is None else mesh.shape[mesh.axis_names[0]]
    itemsize = jnp.dtype(model.dtype).itemsize
    todo = np.nonzero(~done)[0]
    plan = []  # (window start, start layer, chunk size, cell indices)
    for s in sorted(set(s0[todo].tolist())):
        in_bucket = todo[s0[todo] == s]
        layers = sorted(set(fl[in_bucket].tolist()))
        biggest = max(int((fl[in_bucket] == l).sum()) for l in layers)
        S = P - s
        cap = chunk_size or max(1, int(memory_budget // _bytes_per_cell(cfg, B, S, P, len(positions or range(S)), len(vocab or range(cfg.d_vocab)), itemsize)))
        C = max(1, min(cap, biggest))
        C = n_dev * math.ceil(C / n_dev)
        for l in layers:
            idx = in_bucket[fl[in_bucket] == l]
            for i in range(0, len(idx), C):
                plan.append((s, l, C, idx[i : i + C]))

    bar = None
    if progress and len(plan) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=desc, unit="cell", leave=False)
    def dispatch(s, l, C, idx):
        pad = np.concatenate([idx, np.repeat(idx[:1], C - len(idx))])
        chunk = {k: v[pad] for k, v in cells.items()}
        out = _run_chunk(model.params, base, chunk, data, jnp.int32(l), cfg=cfg, cell_fn=cell_fn, metric=metric, s0=int(s),
                         positions=positions, vocab=vocab, mesh=mesh)
        return idx, out

    last_save = time.time()
    pending = None
    for step in plan + [None]:
        nxt = dispatch(*step) if step is not None else None
        if pending is not None:
            idx, out = pending
            for r, o in zip(jax.tree.leaves(results), jax.tree.leaves(out)):
                r[idx] = np.asarray(o)[: len(idx)]
            done[idx] = True
            if bar is not None:
                bar.update(len(idx))
            if store is not None and (time.time() - last_save > 10 or nxt is None):
                store.save(results, done)
                last_save = time.time()
        pending = nxt
    if bar is not None:
        bar.close()
    return results
