"""Activation patching, back-patching and path patching, as compiled sweeps.

TransformerLens semantics and signature: run the corrupted tokens, overwrite one slice with the
clean cache's activation, apply the metric to the logits::

    result = patching.resid_pre(model, corrupted_tokens, clean_cache, metric)   # Labelled [layer, pos]

Every recipe only builds cells and a cell function and calls the sweep driver (`jinterp.engine`), so each sweep
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
from jinterp.engine import PatchingError, Runner, sweep, sweep_grid
from jinterp.path_patching import PathPatchCell, path_patching  # path patching: its own module, this API
from jinterp.results import Labelled, Results, axis_labels, label_grid


# ----------------------------------------------------------------------------------------
# cell functions (frozen dataclasses: hashable by value, so repeated sweeps reuse the program)


@dataclasses.dataclass(frozen=True)
class PatchCell:
    """Set `site` at (layer[, pos][, head]) to the per-layer source stack in `data`."""

    site: str
    use_pos: bool
    use_head: bool

    def edit(self, cell, data):
        return E.patch(
            self.site, data, layers=cell["layer"][None],
            pos=cell["pos"][None] if self.use_pos else None,
            heads=cell["kv_head" if "kv_head" in cell else "head"][None] if self.use_head else None,
            per_layer=True,
        )

    def __call__(self, cell, data, runner: Runner):
        return runner.score((self.edit(cell, data),))

    def bounds(self, cell, data, n_layers, n_prompt):
        e = self.edit(cell, data)
        return E.first_layer(e, n_layers), E.first_col(e, n_prompt)


def _check_pair(model, corrupted_tokens, clean_cache, attention_mask=None):
    tokens, mask = model.prepare_inputs(corrupted_tokens, attention_mask)
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
    head_axis = "kv_head" if "kv_head" in S.layout(local) else "head"
    axes = {(head_axis if a == "head" else a): axis_labels(model, head_axis if a == "head" else a, tokens) for a in index}
    fn = PatchCell(local, "pos" in index, "head" in index)
    kw.setdefault("unchanged_prefix", clean_cache.unchanged_prefix(model, tokens) if mask is None else 0)
    return sweep_grid(model, tokens, axes, fn, data=src, metric=metric, attention_mask=mask, name=f"patch {local}", **kw)


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


def block_every(model, corrupted_tokens, clean_cache, metric, **kw) -> Results:
    """resid_pre, attn_out and mlp_out, each [n_layers, pos]; `.stack()` gives TransformerLens's
    [3, n_layers, pos]."""
    fns = {"resid_pre": resid_pre, "attn_out": attn_out, "mlp_out": mlp_out}
    return Results({k: f(model, corrupted_tokens, clean_cache, metric, **kw) for k, f in fns.items()}, name="patch every block")


def attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kw) -> Results:
    """out, q, k, v and pattern, each [n_layers, n_heads] (k and v [n_layers, n_kv_heads] on
    grouped-query models); `.stack()` gives TransformerLens's [5, n_layers, n_heads] where the
    head axes agree."""
    fns = {"out": attn_head_out_all_pos, "q": attn_head_q_all_pos, "k": attn_head_k_all_pos, "v": attn_head_v_all_pos,
           "pattern": attn_head_pattern_all_pos}
    return Results({k: f(model, corrupted_tokens, clean_cache, metric, **kw) for k, f in fns.items()}, name="patch every head input")


def attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kw) -> Results:
    """out, q, k, v and pattern, each [n_layers, pos, n_heads] (k and v per key/value head on
    grouped-query models); `.stack()` gives TransformerLens's [5, n_layers, pos, n_heads]."""
    fns = {"out": attn_head_out_by_pos, "q": attn_head_q_by_pos, "k": attn_head_k_by_pos, "v": attn_head_v_by_pos,
           "pattern": attn_head_pattern_by_pos}
    return Results({k: f(model, corrupted_tokens, clean_cache, metric, **kw) for k, f in fns.items()}, name="patch every head input by position")


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
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    _, cache = model.run_with_cache(tokens, names=lambda n: n.endswith("attn.hook_z"), attention_mask=mask)
    z = cache.stack("attn.hook_z")
    if kind == "mean":
        src = jnp.broadcast_to(z.mean(axis=1, keepdims=True), z.shape)
    elif kind == "zero":
        src = jnp.zeros_like(z)
    else:
        raise ValueError(f"kind must be 'mean' or 'zero', got {kind!r}")
    axes = {a: axis_labels(model, a) for a in ("layer", "head")}
    return sweep_grid(model, tokens, axes, PatchCell("attn.hook_z", False, True), data=src, metric=metric,
                      attention_mask=mask, name=f"{kind}-ablate head", **kw)


# ----------------------------------------------------------------------------------------
# back-patching (Hopping Too Late, methods.md section 1)


@dataclasses.dataclass(frozen=True)
class BackPatchCell:
    """resid_post[i] at position t of the source run, written into resid_post[j] at t."""

    mode: str = "score"  # "score" | "generate"
    max_new_tokens: int = 10

    def edit(self, cell, data):
        return E.patch("hook_resid_post", data["src"][cell["source"]], layers=cell["target"][None], pos=data["pos"])

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

    def __repr__(self):
        parts = [f"metric={self.metric!r}" if self.metric is not None else None,
                 f"generations {list(self.generations.shape)}" if self.generations is not None else None,
                 f"fixed {int(np.sum(self.fixed))}/{len(self.fixed)} examples" if self.fixed is not None else None]
        return "BackPatching(" + ", ".join(p for p in parts if p) + ")"


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
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    B, P = tokens.shape
    pos = np.broadcast_to(np.asarray(position), (B,)).astype(np.int32) % P
    src_tokens = tokens if source_tokens is None else model.prepare_inputs(source_tokens, None)[0]
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
        res_metric = label_grid(out.reshape((L, L) + out.shape[1:]), dict(zip(("source_layer", "target_layer"), labels)),
                                metric, name="back-patching metric")
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

