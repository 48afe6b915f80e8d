"""Activation patching, back-patching and path patching, as compiled sweeps.

TransformerLens semantics and signature: run the corrupted tokens, overwrite one slice with the
clean cache's activation, apply the metric to the logits::

    result = patching.resid_pre(model, corrupted_tokens, clean_cache, metric)   # Labelled [layer, pos]

Every recipe only builds cells and a cell function and calls `jinterp.sweep.sweep`, so each sweep
is one compiled program (vmapped, chunked, optionally sharded, resumable). Extra keyword
arguments (chunk_size, mesh, progress, checkpoint_dir, metric_positions, ...) go to the driver.
TransformerLens names (`get_act_patch_resid_pre`, ...) are aliases.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jinterp import edits as E
from jinterp import sites as S
from jinterp.sweep import Labelled, Runner, sweep


class PatchingError(ValueError):
    pass


# ----------------------------------------------------------------------------------------
# cell functions (frozen dataclasses: hashable by value, so repeated sweeps reuse the program)


@dataclasses.dataclass(frozen=True)
class PatchCell:
    """Set `site` at (layer[, pos][, head]) to the per-layer source stack in `data`."""

    site: str
    use_pos: bool
    use_head: bool

    def edit(self, cell, data):
        return E.Edit(
            site=self.site, op="set", layers=cell["layer"][None],
            pos=cell["pos"][None] if self.use_pos else None,
            heads=cell["head"][None] if self.use_head else None,
            value=data, per_layer=True,
        )

    def __call__(self, cell, data, runner: Runner):
        return runner.score((self.edit(cell, data),))

    def bounds(self, cell, data, n_layers, n_prompt):
        e = self.edit(cell, data)
        return E.first_layer(e, n_layers), E.first_col(e, n_prompt)


def _unchanged_prefix(model, clean_cache, tokens) -> int:
    """Leading positions where the clean run's tokens equal the corrupted tokens in every row. When the
    clean cache is this model's own unedited run, every activation there is identical in both runs,
    so patching them is a no-op. Anything else (another model, edited params, an edited run): 0."""
    src = getattr(clean_cache, "tokens", None)
    if (
        src is None
        or getattr(clean_cache, "model", None) is not model
        or getattr(clean_cache, "edited", True)
        or getattr(clean_cache, "attention_mask", None) is not None
        or np.shape(src) != tuple(tokens.shape)
    ):
        return 0
    same = (np.asarray(src) == np.asarray(tokens)).all(0)
    return int(np.argmin(same)) if not same.all() else int(len(same))


def _labels(model, tokens, axis):
    c = model.config
    if axis == "layer":
        return tuple(str(l) for l in range(c.n_layers))
    if axis in ("head", "kv_head"):
        return tuple(f"H{h}" for h in range(c.n_kv_heads if axis == "kv_head" else c.n_heads))
    if axis == "pos":
        P = np.shape(tokens)[-1]
        if model.tokenizer is not None and np.ndim(tokens) == 2:
            strs = model.to_str_tokens(np.asarray(tokens)[0])
            return tuple(f"{p}:{t}" for p, t in enumerate(strs))
        return tuple(str(p) for p in range(P))
    raise ValueError(axis)


def _check_pair(model, corrupted_tokens, clean_cache, attention_mask=None):
    tokens, mask = model._inputs(corrupted_tokens, attention_mask)
    if clean_cache is None or not hasattr(clean_cache, "stack"):
        raise PatchingError("clean_cache must be the ActivationCache of model.run_with_cache(clean_tokens)")
    return tokens, mask


def _source(model, clean_cache, local, tokens):
    try:
        src = clean_cache.stack(local)
    except KeyError as e:
        raise PatchingError(
            f"the clean cache has no {local!r} at every layer; make it with model.run_with_cache(clean_tokens) "
            f"(names=None), or include 'blocks.*.{local}'"
        ) from e
    if tuple(src.shape[1:3] if S.layout(local)[1] == "pos" else (src.shape[1], src.shape[3])) != tuple(tokens.shape):
        bp = (src.shape[1], src.shape[3] if S.layout(local)[1] != "pos" else src.shape[2])
        raise PatchingError(
            f"clean and corrupted batches have different shapes: clean cache is [batch {bp[0]}, pos {bp[1]}], "
            f"corrupted tokens are {list(tokens.shape)}. Patching needs the same batch and length; pad them to match."
        )
    return src


def _patch(model, corrupted_tokens, clean_cache, metric, site, index, attention_mask=None, **kw) -> Labelled:
    cfg = model.config
    tokens, mask = _check_pair(model, corrupted_tokens, clean_cache, attention_mask)
    local = S.resolve_local(cfg, site)
    src = _source(model, clean_cache, local, tokens)
    lay = S.layout(local)
    head_axis = "kv_head" if "kv_head" in lay else "head"
    axes = tuple(head_axis if a == "head" else a for a in index)
    sizes = {"layer": cfg.n_layers, "pos": tokens.shape[1], "head": cfg.n_heads, "kv_head": cfg.n_kv_heads}
    shape = tuple(sizes[a] for a in axes)
    grid = np.indices(shape).reshape(len(shape), -1).astype(np.int32)
    cells = {("head" if a == "kv_head" else a): g for a, g in zip(axes, grid)}
    fn = PatchCell(local, "pos" in index, "head" in index)
    kw.setdefault("unchanged_prefix", _unchanged_prefix(model, clean_cache, tokens) if mask is None else 0)
    out = sweep(model, tokens, cells, fn, data=src, metric=metric, attention_mask=mask, desc=f"patch {local}", **kw)
    out = np.asarray(out).reshape(shape + np.shape(out)[1:])
    extra = tuple(f"out{i}" for i in range(out.ndim - len(shape)))
    labels = tuple(_labels(model, tokens, a) for a in axes) + tuple(tuple(map(str, range(n))) for n in out.shape[len(shape):])
    return Labelled(out, tuple("head" if a == "kv_head" else a for a in axes) + extra, labels, name=f"patch {local}")


def resid_pre(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """Patch blocks.{l}.hook_resid_pre at each (layer, position) -> [n_layers, pos]."""
    return _patch(model, corrupted_tokens, clean_cache, metric, "hook_resid_pre", ("layer", "pos"), **kw)


def resid_mid(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "hook_resid_mid", ("layer", "pos"), **kw)


def resid_post(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "hook_resid_post", ("layer", "pos"), **kw)


def attn_out(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "hook_attn_out", ("layer", "pos"), **kw)


def mlp_out(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "hook_mlp_out", ("layer", "pos"), **kw)


def attn_head_out_all_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """Patch each head's z at every position -> [n_layers, n_heads]."""
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_z", ("layer", "head"), **kw)


def attn_head_q_all_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_q", ("layer", "head"), **kw)


def attn_head_k_all_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """Keys are per key/value head: [n_layers, n_kv_heads] on GQA/MQA models."""
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_k", ("layer", "head"), **kw)


def attn_head_v_all_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """Values are per key/value head: [n_layers, n_kv_heads] on GQA/MQA models."""
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_v", ("layer", "head"), **kw)


def attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_pattern", ("layer", "head"), **kw)


def attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """Patch each head's z at each position -> [n_layers, pos, n_heads]."""
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_z", ("layer", "pos", "head"), **kw)


def attn_head_q_by_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_q", ("layer", "pos", "head"), **kw)


def attn_head_k_by_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_k", ("layer", "pos", "head"), **kw)


def attn_head_v_by_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_v", ("layer", "pos", "head"), **kw)


def attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """Patch each head's attention row at each query position -> [n_layers, pos, n_heads]
    (TransformerLens orders this one [layer, head, dest_pos])."""
    return _patch(model, corrupted_tokens, clean_cache, metric, "attn.hook_pattern", ("layer", "pos", "head"), **kw)


def _stack(results, kind_labels, n_heads=None) -> Labelled:
    vals = []
    for r in results:
        v = np.asarray(r.values, np.float64)
        if n_heads is not None and v.shape[-1] < n_heads:  # GQA k/v: pad the missing heads with NaN
            v = np.concatenate([v, np.full(v.shape[:-1] + (n_heads - v.shape[-1],), np.nan)], axis=-1)
        vals.append(v)
    base = max(results, key=lambda r: r.values.shape[-1])
    return Labelled(np.stack(vals), ("component",) + base.axes, (tuple(kind_labels),) + base.labels, name="patch")


def block_every(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """[3, n_layers, pos]: resid_pre, attn_out, mlp_out."""
    fns = (resid_pre, attn_out, mlp_out)
    return _stack([f(model, corrupted_tokens, clean_cache, metric, **kw) for f in fns], ("resid_pre", "attn_out", "mlp_out"))


def attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """[5, n_layers, n_heads]: out, q, k, v, pattern (k/v of GQA models NaN-padded to n_heads)."""
    fns = (attn_head_out_all_pos, attn_head_q_all_pos, attn_head_k_all_pos, attn_head_v_all_pos, attn_head_pattern_all_pos)
    return _stack([f(model, corrupted_tokens, clean_cache, metric, **kw) for f in fns], ("out", "q", "k", "v", "pattern"), model.config.n_heads)


def attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kw) -> Labelled:
    """[5, n_layers, pos, n_heads]: out, q, k, v, pattern (k/v of GQA models NaN-padded to n_heads)."""
    fns = (attn_head_out_by_pos, attn_head_q_by_pos, attn_head_k_by_pos, attn_head_v_by_pos, attn_head_pattern_by_pos)
    return _stack([f(model, corrupted_tokens, clean_cache, metric, **kw) for f in fns], ("out", "q", "k", "v", "pattern"), model.config.n_heads)


# TransformerLens names
get_act_patch_resid_pre = resid_pre
get_act_patch_resid_mid = resid_mid
get_act_patch_attn_out = attn_out
get_act_patch_mlp_out = mlp_out
get_act_patch_attn_head_out_all_pos = attn_head_out_all_pos
get_act_patch_attn_head_q_all_pos = attn_head_q_all_pos
get_act_patch_attn_head_k_all_pos = attn_head_k_all_pos
get_act_patch_attn_head_v_all_pos = attn_head_v_all_pos
get_act_patch_attn_head_pattern_all_pos = attn_head_pattern_all_pos
get_act_patch_attn_head_out_by_pos = attn_head_out_by_pos
get_act_patch_attn_head_q_by_pos = attn_head_q_by_pos
get_act_patch_attn_head_k_by_pos = attn_head_k_by_pos
get_act_patch_attn_head_v_by_pos = attn_head_v_by_pos
get_act_patch_block_every = block_every
get_act_patch_attn_head_all_pos_every = attn_head_all_pos_every
get_act_patch_attn_head_by_pos_every = attn_head_by_pos_every


# ----------------------------------------------------------------------------------------
# ablation scan


def head_ablation(model, tokens, metric, kind: str = "mean", attention_mask=None, **kw) -> Labelled:
    """Ablate each head's z at every position (zero, or mean over the batch) -> [n_layers, n_heads]."""
    tokens, mask = model._inputs(tokens, attention_mask)
    _, cache = model.run_with_cache(tokens, names=lambda n: n.endswith("attn.hook_z"), attention_mask=mask)
    z = cache.stack("attn.hook_z")
    if kind == "mean":
        src = jnp.broadcast_to(z.mean(axis=1, keepdims=True), z.shape)
    elif kind == "zero":
        src = jnp.zeros_like(z)
    else:
        raise ValueError(f"kind must be 'mean' or 'zero', got {kind!r}")
    cfg = model.config
    grid = np.indices((cfg.n_layers, cfg.n_heads)).reshape(2, -1).astype(np.int32)
    out = sweep(model, tokens, {"layer": grid[0], "head": grid[1]}, PatchCell("attn.hook_z", False, True), data=src,
                metric=metric, attention_mask=mask, desc=f"{kind}-ablate heads", **kw)
    out = np.asarray(out).reshape((cfg.n_layers, cfg.n_heads) + np.shape(out)[1:])
    return Labelled(out, ("layer", "head") + tuple(f"out{i}" for i in range(out.ndim - 2)),
                    (_labels(model, tokens, "layer"), _labels(model, tokens, "head")) + tuple(tuple(map(str, range(n))) for n in out.shape[2:]),
                    name=f"{kind}-ablate head")


# ----------------------------------------------------------------------------------------
# back-patching (Hopping Too Late, methods.md section 1)


@dataclasses.dataclass(frozen=True)
class BackPatchCell:
    """resid_post[i] at position t of the source run, written into resid_post[j] at t."""

    mode: str = "score"  # "score" | "generate"
    max_new_tokens: int = 10

    def edit(self, cell, data):
        return E.Edit(site="hook_resid_post", op="set", layers=cell["target"][None], pos=data["pos"],
                      value=data["src"][cell["source"]])

    def __call__(self, cell, data, runner: Runner):
        e = self.edit(cell, data)
        if self.mode == "score":
            return runner.score((e,))
        return runner.generate((e,), self.max_new_tokens)

    def bounds(self, cell, data, n_layers, n_prompt):
        e = self.edit(cell, data)
        if self.mode == "generate":
            return jnp.int32(0), jnp.int32(0)
        return E.first_layer(e, n_layers), E.first_col(e, n_prompt)


@dataclasses.dataclass
class BackPatching:
    """Back-patching results. metric: [source layer, target layer(, example)];
    generations: [source, target, example, new token]; success: [source, target, example];
    fixed: per example, whether some pair with source > target succeeds (the paper's oracle)."""

    metric: Labelled | None
    generations: np.ndarray | None
    success: Labelled | None
    fixed: np.ndarray | None

    def fixed_rate(self) -> float:
        return float(np.mean(self.fixed)) if self.fixed is not None else float("nan")


def _contains(seq, target) -> bool:
    seq, target = list(seq), list(target)
    n = len(target)
    return any(seq[i : i + n] == target for i in range(len(seq) - n + 1))


def back_patching(
    model,
    tokens,
    position=-1,
    metric=None,
    *,
    source_tokens=None,
    attention_mask=None,
    targets=None,
    judge=None,
    max_new_tokens: int = 10,
    **kw,
) -> BackPatching:
    """For every (source i, target j) layer pair: take resid_post[i] at `position` of a run on
    source_tokens (default: the prompt itself) and write it into resid_post[j] at `position` of a
    fresh pass on the prompt, layers j+1.. recomputing.

    metric: judged per pair (use a per_example metric to keep examples apart).
    targets: per example, a token id or a list of ids; when given, every pair also generates
    max_new_tokens greedily with the edit active on the prompt pass only (cut at the tokenizer's
    EOS), and succeeds for an example if the generation contains its target as a token
    subsequence. judge(generated_ids, example_index) -> bool replaces that test (e.g. the paper's
    case-insensitive match of a label or alias in the decoded text). `fixed[b]` is whether any pair
    with i > j succeeds (i > j: true "back" patches).
    position: an int or one position per example (e.g. the last real token of each row).
    """
    cfg = model.config
    tokens, mask = model._inputs(tokens, attention_mask)
    B, P = tokens.shape
    pos = np.broadcast_to(np.asarray(position), (B,)).astype(np.int32) % P
    src_tokens = tokens if source_tokens is None else model._inputs(source_tokens, None)[0]
    if src_tokens.shape != tokens.shape:
        raise PatchingError(f"source_tokens {list(src_tokens.shape)} and tokens {list(tokens.shape)} differ in shape")
    _, cache = model.run_with_cache(src_tokens, names=lambda n: n.endswith("hook_resid_post"),
                                    attention_mask=mask if source_tokens is None else None)
    data = {"src": cache.stack("hook_resid_post"), "pos": jnp.asarray(pos)[:, None]}
    L = cfg.n_layers
    grid = np.indices((L, L)).reshape(2, -1).astype(np.int32)
    cells = {"source": grid[0], "target": grid[1]}
    labels = (tuple(map(str, range(L))), tuple(map(str, range(L))))
    res_metric = None
    if metric is not None:
        out = np.asarray(sweep(model, tokens, cells, BackPatchCell("score"), data=data, metric=metric,
                               attention_mask=mask, desc="back-patching", **kw))
        out = out.reshape((L, L) + out.shape[1:])
        extra = tuple(tuple(map(str, range(n))) for n in out.shape[2:])
        res_metric = Labelled(out, ("source_layer", "target_layer") + tuple(f"example{'' if i == 0 else i}" for i in range(len(extra))), labels + extra, name="back-patching metric")
    gens = success = fixed = None
    if targets is not None or judge is not None:
        if mask is not None and not bool(np.asarray(mask)[:, -1].all()):
            raise PatchingError("generation needs left-padded prompts: the last column must be a real token in every row")
        gen = np.asarray(sweep(model, tokens, cells, BackPatchCell("generate", int(max_new_tokens)), data=data,
                               attention_mask=mask, desc="back-patching (generate)", metric_positions=None, **kw))
        gens = gen.reshape(L, L, B, -1)
        eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
        cut = lambda g: g[: int(np.argmax(g == eos))] if eos is not None and (g == eos).any() else g
        if judge is None:
            tg = [list(np.atleast_1d(t)) for t in targets] if isinstance(targets, (list, tuple, np.ndarray)) else [[int(targets)]] * B
            if len(tg) != B:
                raise PatchingError(f"targets: one per example ({B}), got {len(tg)}")
            judge = lambda g, b: _contains(g, tg[b])
        ok = np.array([[[bool(judge(cut(gens[i, j, b]), b)) for b in range(B)] for j in range(L)] for i in range(L)])
        success = Labelled(ok.astype(float), ("source_layer", "target_layer", "example"), labels + (tuple(map(str, range(B))),), name="success")
        back = np.tril(np.ones((L, L), bool), -1)  # source i > target j
        fixed = (ok & back[:, :, None]).any((0, 1))
    return BackPatching(res_metric, gens, success, fixed)


# ----------------------------------------------------------------------------------------
# path patching (Wang et al. 2023, Algorithm 1; methods.md section 7)


@dataclasses.dataclass(frozen=True)
class PathPatchCell:
    """Sender (layer, head): run orig with every head's z frozen to orig except the sender's, set
    to its value on the new input; record the receivers' q/k/v (or take the final residual); then
    run orig with only the receivers patched to the recorded values."""

    receivers: tuple  # ((layer, head, "q"|"k"|"v"), ...) or () for the final residual
    use_sender_pos: bool
    use_receiver_pos: bool

    def step2_edits(self, cell, data):
        freeze = E.Edit(site="attn.hook_z", op="set", value=data["orig_z"], per_layer=True)
        sender = E.Edit(site="attn.hook_z", op="set", layers=cell["layer"][None], heads=cell["head"][None],
                        pos=data["sender_pos"] if self.use_sender_pos else None, value=data["new_z"], per_layer=True)
        return (freeze, sender)

    def __call__(self, cell, data, runner: Runner):
        edits = self.step2_edits(cell, data)
        if not self.receivers:
            return runner.score(edits)
        names = {}
        for l, h, kind in self.receivers:
            names.setdefault(f"attn.hook_{kind}", set()).add(l)
        names = {k: tuple(sorted(v)) for k, v in names.items()}
        acts = runner.record(edits, names)
        patched = tuple(
            E.Edit(site=f"attn.hook_{kind}", op="set", layers=jnp.asarray([l], jnp.int32), heads=jnp.asarray([h], jnp.int32),
                   pos=data["receiver_pos"] if self.use_receiver_pos else None,
                   value=acts[f"attn.hook_{kind}"][names[f"attn.hook_{kind}"].index(l)])
            for l, h, kind in self.receivers
        )
        return runner.score(patched, start=min(l for l, _, _ in self.receivers))

    def bounds(self, cell, data, n_layers, n_prompt):
        return cell["layer"], jnp.int32(0)


def path_patching(
    model,
    orig_tokens,
    new_tokens,
    metric,
    receivers="resid",
    *,
    sender_pos=None,
    receiver_pos=None,
    attention_mask=None,
    **kw,
) -> Labelled:
    """Path patching from every sender head to `receivers`, in one sweep -> [n_layers, n_heads].

    receivers: "resid" (the final residual stream, i.e. the direct path to the logits plus paths
    through MLPs), or a list of (layer, head, "q" | "k" | "v") receiver inputs; for "k" and "v" the
    head is a key/value head, shared by its query group on GQA models. sender_pos /
    receiver_pos restrict the patch to positions (an int list, or one per example as [batch, k]).
    The value is the metric of the final run (use metrics.normalized to express it relative to
    the orig and new runs). Senders at or after a receiver's layer have no path to it and score the
    orig run's metric.
    """
    cfg = model.config
    orig, mask = model._inputs(orig_tokens, attention_mask)
    new, _ = model._inputs(new_tokens, None)
    if orig.shape != new.shape:
        raise PatchingError(f"orig tokens {list(orig.shape)} and new tokens {list(new.shape)} differ in shape")
    rec = ()
    if receivers != "resid":
        rec = []
        for r in receivers:
            l, h, kind = r
            if kind not in ("q", "k", "v"):
                raise PatchingError(f"receiver kind must be 'q', 'k' or 'v', got {kind!r}")
            if not 0 <= l < cfg.n_layers:
                raise PatchingError(f"receiver layer {l} out of range 0..{cfg.n_layers - 1}")
            nh = cfg.n_heads if kind == "q" else cfg.n_kv_heads
            if not 0 <= h < nh:
                raise PatchingError(f"receiver {kind} head {h} out of range 0..{nh - 1}")
            rec.append((int(l), int(h), kind))
        rec = tuple(rec)
    zname = lambda n: n.endswith("attn.hook_z")
    _, oc = model.run_with_cache(orig, names=zname, attention_mask=mask)
    _, nc = model.run_with_cache(new, names=zname, attention_mask=mask)
    data = {"orig_z": oc.stack("attn.hook_z"), "new_z": nc.stack("attn.hook_z")}
    for name, p in (("sender_pos", sender_pos), ("receiver_pos", receiver_pos)):
        if p is not None:
            data[name] = E._sel(p)
    grid = np.indices((cfg.n_layers, cfg.n_heads)).reshape(2, -1).astype(np.int32)
    fn = PathPatchCell(rec, sender_pos is not None, receiver_pos is not None)
    out = np.asarray(sweep(model, orig, {"layer": grid[0], "head": grid[1]}, fn, data=data, metric=metric,
                           attention_mask=mask, desc="path patching", **kw))
    out = out.reshape((cfg.n_layers, cfg.n_heads) + out.shape[1:])
    return Labelled(out, ("layer", "head") + tuple(f"out{i}" for i in range(out.ndim - 2)),
                    (_labels(model, orig, "layer"), _labels(model, orig, "head")) + tuple(tuple(map(str, range(n))) for n in out.shape[2:]),
                    name="path patching")
