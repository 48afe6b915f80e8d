"""The one sweep driver: every recipe (patching, path patching, back-patching, ablation scans)
builds cells and a cell function, then calls `sweep` (raw arrays) or `sweep_grid` (a labelled
grid).

A *cell* is one point of the sweep (say layer 3, position 5); `cells` is a dict of arrays with a
leading axis over all N cells. A *cell function* is a frozen (hashable) dataclass called as
`cell_fn(cell, data, runner)`: it builds edits from its cell and from `data` (arrays shared by all
cells, e.g. a clean cache) and asks the runner for a score. Because the cell function is static
and hashable by value and everything else is an array, the whole sweep is one compiled program:
repeated sweeps with the same shapes reuse it.

The driver:
- vmaps the cell function over chunks of cells, sized to a memory budget (engine/plan.py);
- computes only what changes (DESIGN.md principle 6): a cell whose edits start at layer l and
  position p re-runs layers >= l (from the base run's cached residual) and positions >= p (reading
  the base run's keys and values before p), and the last block and unembedding run only at the
  positions and token ids the metric reads (metrics.reads);
- shows progress, shards the cell axis over a device mesh, and checkpoints finished cells so an
  interrupted sweep resumes (engine/store.py).

Results equal the naive computation (one full forward per cell) up to float rounding; the tests
check this against per-cell loops.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import arch, compile_cache
from jinterp import metrics as M
from jinterp.distributed import sweep_mesh, to_host
from jinterp.engine.flops import packed_waste
from jinterp.engine.nan import SweepError, check_nan  # noqa: F401 (SweepError: part of this module's API)
from jinterp.engine.plan import bytes_per_cell, chunk_budget, plan
from jinterp.engine.stairs import small_groups, stair_plan
from jinterp.engine import traced
from jinterp.engine.store import SweepStore, signature
from jinterp.results import Labelled, label_grid

_base_run = jax.jit(arch.base_run, static_argnames=("cfg",))


class PatchingError(ValueError):
    """Bad input to a patching recipe (jinterp.patching, jinterp.path_patching)."""


def base_run(model, tokens, attention_mask=None) -> arch.Base:
    """The unedited run a sweep's partial re-runs start from."""
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    return _base_run(model.params, tokens, mask, cfg=model.config)


class Runner:
    """What a cell function asks for, inside one compiled chunk: partial forwards from the base run.

    start: traced layer index where this chunk's edits begin; s0: static first position that can
    change; positions / vocab: static tuples of the positions and token ids the metric reads
    (None = all).
    """

    def __init__(self, params, cfg, base: arch.Base, start, s0: int, positions, metric, vocab=None):
        self.params, self.cfg, self.base = params, cfg, base
        self.start, self.s0, self.positions, self.metric, self.vocab = start, s0, positions, metric, vocab

    def logits(self, edits, start=None):
        """Edited logits as a [B, P, V] view; only the positions and token ids the metric reads hold
        real values."""
        start = self.start if start is None else start
        return arch.resume(self.params, self.cfg, self.base, edits, start, self.s0, self.positions, self.vocab)

    def score(self, edits, start=None):
        return self.metric(self.logits(edits, start))

    def generate(self, edits, max_new_tokens: int):
        """Greedy continuation of the base tokens with edits (full prefill; edits whose positions lie in the
        prompt act on the prompt pass only) -> [B, max_new_tokens]."""
        b = self.base
        return arch.generate(self.params, b.tokens, b.mask, tuple(edits), jax.random.PRNGKey(0), cfg=self.cfg,
                             max_new_tokens=max_new_tokens)

    def record(self, edits, names: dict, start=None):
        """Run every position from `start` with edits, recording {local site: layers} -> acts dict."""
        start = self.start if start is None else start
        return arch.resume_record(self.params, self.cfg, self.base, edits, start, names)


class _Probe(Runner):
    """Traces a cell function once to see what it asks for: a staircase sweep needs exactly one
    logits/score call from the chunk's start, and no record or generate."""

    def __init__(self, *a):
        super().__init__(*a)
        self.calls = []

    def logits(self, edits, start=None):
        self.calls.append("logits" if start is None else "logits from a start")
        self.edits = tuple(edits)
        return super().logits(edits, start)

    def generate(self, edits, max_new_tokens):
        self.calls.append("generate")
        return super().generate(edits, max_new_tokens)

    def record(self, edits, names, start=None):
        self.calls.append("record")
        return super().record(edits, names, start)


class _Collect(Runner):
    """Keeps the cell's edits; its logits are a placeholder (the staircase computes the real ones)."""

    def logits(self, edits, start=None):
        self.edits = tuple(edits)
        B, P = self.base.tokens.shape
        return jnp.zeros((B, P, self.cfg.d_vocab), self.base.resid_final.dtype)


class _Replay(Runner):
    """Hands the cell function the logits the staircase computed for it."""

    def __init__(self, view, *a):
        super().__init__(*a)
        self.view = view

    def logits(self, edits, start=None):
        return self.view


def _probe(params, base, cells, data, *, cfg, cell_fn, metric, positions, vocab):
    """(whether the cell function can run as a staircase (engine/stairs.py), its edits' sites, the
    shapes of one cell's output)."""
    one = jax.tree.map(lambda a: a[0], cells)
    probe = []

    def trace(c):
        r = _Probe(params, cfg, base, jnp.int32(0), 0, positions, metric, vocab)
        out = cell_fn(c, data, r)
        probe.append(r)
        return out

    out = jax.eval_shape(trace, one)
    r = probe[0]
    sites = {e.site for e in getattr(r, "edits", ())}
    return r.calls == ["logits"] and not sites & set(arch.PRE_BLOCK_SITES), sites, out


@functools.partial(jax.jit, static_argnames=("cfg", "cell_fn", "metric", "s0", "positions", "vocab", "counts",
                                             "first", "mesh", "first_pos"))
def _run_stairs(params, base, cells, data, device_first_pos=None, *, cfg, cell_fn, metric, s0, positions, vocab, counts,
                first, mesh=None, first_pos=None):
    """One staircase chunk: collect every cell's edits, run them through arch.resume_cells (cells
    ordered by start layer, `counts` per layer; first_pos: each cell's first position, to pack their
    rows; on a mesh every device's [devices, cells], with device_first_pos the same split over the
    devices), and give each cell function its logits back."""

    def body(params, base, cells, data, fp):
        args = (params, cfg, base, jnp.int32(first), s0, positions, metric, vocab)

        def make_edits(c):
            r = _Collect(*args)
            cell_fn(c, data, r)
            return r.edits

        rows = arch.resume_cells(params, cfg, base, make_edits, cells, counts, first, s0, positions, vocab, first_pos,
                                 device_first_pos=fp)
        P = base.tokens.shape[1]
        view = lambda r: arch.cells_view(r, cfg, P, s0, positions, vocab)
        return jax.vmap(lambda c, r: cell_fn(c, data, _Replay(view(r), *args)))(cells, rows)

    if mesh is None:
        return body(params, base, cells, data, None)
    from jax.sharding import PartitionSpec as PS

    rep, split = PS(), PS(mesh.axis_names[0])
    return jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, split, rep, split), out_specs=split, check_vma=False)(
        params, base, cells, data, device_first_pos
    )


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
    base: arch.Base | None = None,
    metric_positions="auto",
    buckets: bool = True,
    stairs: bool | str = "auto",
    pack: bool = True,
    unchanged_prefix: int = 0,
    chunk_size: int | None = None,
    memory_budget: float | None = None,
    mesh=None,
    progress: bool | str = True,
    checkpoint_dir=None,
    desc: str = "sweep",
    stats: dict | None = None,
    allow_nan: bool = False,
    cell_labels: dict | None = None,
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
    buckets: group cells by their first changed position (False: every cell re-runs all positions).
    stairs: run each chunk as a staircase (engine/stairs.py: one pass whose batch grows layer by
    layer; needs a cell function that asks for logits once); False: one program call per first
    layer; "auto": a staircase when those calls' matrix products would be small (stairs.small_groups).
    pack: a staircase packs the rows its cells re-run into one product per projection, each cell's from
    its own first position (arch.resume_cells), so position buckets only save attention. On a mesh
    every device packs its own cells' rows (its products sized for the busiest device).
    mesh: a jax.sharding.Mesh whose first axis splits the cells (shard_map; None: one device), for
    a model held whole on every device (default: the one jinterp.distributed.split_sweeps set, if any).
    A model loaded with jinterp.load(..., mesh=) needs none: its sweeps run on its own mesh.
    memory_budget: bytes a chunk may take (None: half the device's free memory, engine.plan.chunk_budget).
    checkpoint_dir: save finished cells there (orbax) and resume from them on a re-run (with several
    processes, process 0 writes and reads it; a directory every process can see is not needed).
    stats: a dict to fill with the plan (chunks, rows, cells' bounds) for engine/flops.py.
    allow_nan: return results holding NaN; by default a NaN anywhere in a cell's output raises a
    SweepError naming the cell (by cell_labels: cell key -> the label of each index, as sweep_grid
    passes its axes) and carrying the results. Results of sweeps without NaN are unchanged.
    """
    cfg = model.config
    if mesh is None and model.mesh is None:
        mesh = sweep_mesh()  # distributed.split_sweeps
    compile_cache.guard_map_count()  # a process holding many programs nears the kernel's map limit
    if mesh is not None and model.mesh is not None:
        raise ValueError("this model's parameters are sharded on a mesh (jinterp.load(..., mesh=)); its sweeps run "
                         "on that mesh, partitioned by XLA. Drop mesh= (it splits cells over a mesh for a model "
                         "held whole on every device).")
    if base is None:
        base = base_run(model, tokens, attention_mask)
    P = int(base.tokens.shape[1])
    B = int(base.tokens.shape[0])
    metric = _static_metric(metric) if metric is not None else None
    cells = {k: np.asarray(v) for k, v in cells.items()}
    N = len(next(iter(cells.values())))
    if metric is not None and metric_positions == "auto":
        positions, vocab = M.reads(metric, arch.unembed(model.params, cfg, base.resid_final))
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

    # what the cell function asks for and returns (one trace), output buffers, and resumption
    fits, sites, out_shape = _probe(model.params, base, cells, data, cfg=cfg, cell_fn=cell_fn, metric=metric,
                                    positions=positions, vocab=vocab)
    results = jax.tree.map(lambda s: np.full((N,) + s.shape, np.nan if np.issubdtype(s.dtype, np.floating) else 0, s.dtype), out_shape)
    done = np.zeros(N, bool)
    store = None
    if checkpoint_dir is not None:
        params_sample = [np.asarray(l).ravel()[:4096] for l in jax.tree.leaves(model.params)]
        sig = signature(cfg, cell_fn, metric, positions, vocab, base.tokens, base.mask, cells, jax.tree.leaves(data), params_sample)
        store = SweepStore(checkpoint_dir, sig)
        restored = store.load(results)
        if restored is not None:
            results, done = restored

    n_dev = 1 if mesh is None else mesh.shape[mesh.axis_names[0]]
    todo = np.nonzero(~done)[0]
    itemsize = jnp.dtype(model.dtype).itemsize
    if stairs == "auto":
        stairs = small_groups(fl, fc, todo, P=P, batch=B, buckets=buckets, unchanged_prefix=unchanged_prefix)
    stairs = bool(stairs) and fits and len(todo) > 0
    first_pos = np.maximum(fc, unchanged_prefix)
    pack = stairs and pack and cfg.mlp != "moe"  # (moe: its experts are not packed)
    if stairs:
        n_pos, n_voc = len(positions or range(P)), len(vocab or range(cfg.d_vocab))
        budget = chunk_budget() if memory_budget is None else memory_budget
        cap = chunk_size or max(1, int(budget // bytes_per_cell(cfg, B, P, P, n_pos, n_voc, itemsize)))
        chunks = stair_plan(fl, fc, todo, P=P, n_layers=cfg.n_layers, cap=cap, n_devices=n_dev, batch=B,
                            buckets=buckets, unchanged_prefix=unchanged_prefix,
                            waste=packed_waste(cfg, P) if pack else 1.0)
    else:
        chunks = plan(fl, fc, todo, cfg=cfg, batch=B, P=P, positions=positions, vocab=vocab, itemsize=itemsize,
                      buckets=buckets, unchanged_prefix=unchanged_prefix, chunk_size=chunk_size,
                      memory_budget=memory_budget, n_devices=n_dev)
    # packing: each cell's first position, in the chunk's order ([devices, cells] on a mesh)
    packed = lambda ch: first_pos[ch.order].reshape(n_dev, -1) if pack else None

    if stats is not None:  # what engine/flops.py needs to count the work
        stats.update(from_z=bool(sites) and arch.from_attention_mixes(cfg, sites), batch=B, P=P, positions=positions,
                     n_vocab=len(vocab or range(cfg.d_vocab)), stairs=stairs,
                     first_layer=fl[todo], first_pos=first_pos[todo], chunks=[
                         dict(s0=ch.s0,
                              starts=[(ch.first + i, k * n_dev) for i, k in enumerate(ch.counts)] if stairs
                              else [(ch.layer, ch.size)],
                              packed=packed(ch).tolist() if pack else None, counts=ch.counts if stairs else None)
                         for ch in chunks])

    bar = None
    if progress and len(chunks) > 1 and jax.process_index() == 0:  # one bar, in process 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=desc, unit="cell", leave=False)

    def dispatch(ch):
        static = dict(cfg=cfg, cell_fn=cell_fn, metric=metric, s0=ch.s0, positions=positions, vocab=vocab, mesh=mesh)
        if stairs:
            chunk = {k: v[ch.order] for k, v in cells.items()}
            fp = packed(ch)  # [devices, cells] or None
            args = (model.params, base, chunk, data)
            static_fp = None
            if mesh is not None:  # each device's own first positions as data, every device's as static
                args += (np.zeros(len(ch.order), np.int32) if fp is None else fp.reshape(-1).astype(np.int32),)
                static_fp = None if fp is None else tuple(map(tuple, fp.tolist()))
            elif fp is not None:
                static_fp = tuple(fp[0].tolist())
            static.update(counts=ch.counts, first=ch.first, first_pos=static_fp)
            if stats is None:
                out = traced.call(_run_stairs, args, static)
            else:  # XLA's own count (a staircase has no loops, so its count is exact), from the program run
                compiled = _run_stairs.lower(*args, **static).compile()
                cost = compiled.cost_analysis()
                stats.setdefault("xla_flops", []).append(float((cost[0] if isinstance(cost, list) else cost)["flops"]))
                out = compiled(*args)
            return ch.cells, out, np.nonzero(ch.real)[0]
        pad = np.concatenate([ch.cells, np.repeat(ch.cells[:1], ch.size - len(ch.cells))])
        chunk = {k: v[pad] for k, v in cells.items()}
        out = traced.call(_run_chunk, (model.params, base, chunk, data, jnp.int32(ch.layer)), static)
        return ch.cells, out, np.arange(len(ch.cells))

    # dispatch the next chunk before reading the last one back, so the device never waits on the host
    last_save = time.time()
    pending = None
    for ch in chunks + [None]:
        nxt = dispatch(ch) if ch is not None else None
        if pending is not None:
            idx, out, sel = pending
            for r, o in zip(jax.tree.leaves(results), jax.tree.leaves(out)):
                r[idx] = to_host(o)[sel]  # a jax array, even one sharded over several processes
            done[idx] = True
            if bar is not None:
                bar.update(len(idx))
            if store is not None and (time.time() - last_save > 10 or nxt is None):
                store.save(results, done)
                last_save = time.time()
        pending = nxt
    if bar is not None:
        bar.close()
    if not allow_nan:
        check_nan(results, cells, cell_labels, desc)
    return results


def sweep_grid(model, tokens, axes: dict, cell_fn, *, name: str, metric=None, **kw) -> Labelled:
    """Sweep every point of a grid and label the result: axes maps each grid axis (cells are keyed
    by these names) to its labels; the result is Labelled [*axes, *metric output axes]."""
    shape = tuple(len(l) for l in axes.values())
    grid = np.indices(shape).reshape(len(shape), -1).astype(np.int32)
    cells = dict(zip(axes, grid))
    out = np.asarray(sweep(model, tokens, cells, cell_fn, metric=metric, desc=name, cell_labels=axes, **kw))
    return label_grid(out.reshape(shape + out.shape[1:]), axes, metric, name=name)
