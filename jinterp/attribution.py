"""Gradient-based attribution and direct logit attribution.

Attribution patching (Nanda 2023): the first-order estimate of patching a site from the clean run
into the corrupted run,

    effect ~= sum over the patched slice of (clean - corrupted) * d metric / d activation,

for every site, position and head at once. The gradients come from one forward and one backward
pass of the corrupted run, through zero-valued additive edits at every requested site: adding zero
changes nothing, and the gradient with respect to the added value is the gradient with respect to
the activation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import edits as E
from jinterp import sites as S
from jinterp import arch
from jinterp.cache import select_positions
from jinterp.results import Labelled, Results, axis_labels

# site -> the axes the attribution keeps (everything else is summed over)
DEFAULT_SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v")


@functools.partial(jax.jit, static_argnames=("cfg", "record", "metric"))
def _value_and_grads(params, tokens, mask, zeros, *, cfg, record, metric):
    def f(values):
        edits = tuple(E.steer(s, v, per_layer=s not in S.GLOBAL_SITES) for s, v in values.items())
        logits, acts = arch.forward(params, tokens, mask, edits, cfg=cfg, record=record)
        return jnp.asarray(metric(logits), jnp.float32), acts

    return jax.value_and_grad(f, has_aux=True)(zeros)


def _grads(model, tokens, mask, metric, locals_):
    """metric value, recorded corrupted activations, and d metric / d activation per site."""
    cfg = model.config
    B, P = tokens.shape
    record = {}
    zeros = {}
    for site in locals_:
        lay = S.layout(site)
        sizes = E.site_shape(cfg, site, B, P)
        shape = tuple(sizes[a] for a in lay)
        if site in S.GLOBAL_SITES:
            record[site] = None
            zeros[site] = jnp.zeros(shape, jnp.float32)
        else:
            record[site] = tuple(range(cfg.n_layers))
            zeros[site] = jnp.zeros((cfg.n_layers,) + shape, jnp.float32)

    (value, acts), grads = _value_and_grads(model.params, tokens, mask, zeros, cfg=cfg, record=tuple(sorted(record.items())), metric=metric)
    return value, acts, grads


def attribution_patching(model, clean_tokens, corrupted_tokens, metric, sites=DEFAULT_SITES, by_pos: bool = True, attention_mask=None) -> Results:
    """First-order patching effects for every site in `sites`, from one forward and one backward pass.

    Returns Results {site: Labelled}: residual-like sites [layer, pos]; head sites (z, q, k, v, result,
    pattern) [layer, pos, head] when by_pos else [layer, head]; MLP activations [layer, pos];
    global sites [pos]. Each value estimates `metric(patched) - metric(corrupted)`.
    """
    cfg = model.config
    clean, mask = model.prepare_inputs(clean_tokens, attention_mask)
    corrupted, _ = model.prepare_inputs(corrupted_tokens, attention_mask)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {list(clean.shape)} and corrupted {list(corrupted.shape)} tokens differ in shape")
    locals_ = [S.resolve_local(cfg, s) for s in sites]
    names = [n for n in S.all_names(cfg) if S.parse(cfg, n)[1] in locals_]
    _, clean_cache = model.run_with_cache(clean, names=names, attention_mask=mask)
    _, acts, grads = _grads(model, corrupted, mask, metric, locals_)
    out = Results(name="attribution patching")
    for site in locals_:
        lay = S.layout(site)
        glob = site in S.GLOBAL_SITES
        c = clean_cache[site] if glob else clean_cache.stack(site)
        prod = (jnp.asarray(c, jnp.float32) - jnp.asarray(acts[site], jnp.float32)) * grads[site]
        # axes of prod: ([layer], *lay); keep layer, pos (or query pos), head
        axes = ([] if glob else ["layer"]) + list(lay)
        keep = [a for a in ("layer", "pos", "head", "kv_head") if a in axes and (a != "pos" or by_pos)]
        red = tuple(i for i, a in enumerate(axes) if a not in keep)
        summed = prod.sum(red)
        left = [a for a in axes if a in keep]  # the order after summing; reorder to (layer, pos, head)
        vals = np.asarray(jnp.transpose(summed, [left.index(a) for a in keep]))
        labels = tuple(axis_labels(model, a, clean) for a in keep)
        out[site] = Labelled(vals, tuple(keep), labels, name=f"attribution {site}")
    return out


def direct_logit_attribution(model, tokens, answer_tokens, pos: int = -1, attention_mask=None) -> Results:
    """Direct logit attribution of the logit difference answer[:, 0] - answer[:, 1] at `pos`, with the
    final norm's cached scale treated as constant (TransformerLens's apply_ln_to_stack):

    {"heads": Labelled [layer, head], "components": Labelled [component] (embeddings, each layer's
    attention and MLP output), "bias": the constant part (norm bias, b_U, and b_O's per-layer sums
    are inside the attention components), "total": the model's logit difference}.
    Values are averaged over the batch; components + bias == total up to float rounding, except
    with a final logit soft-cap (Gemma 2), which is not linear. Head results are z @ W_O, before
    any post-attention norm (Gemma 2's ln1_post).
    """
    cfg = model.config
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    ans = np.asarray(answer_tokens)
    need = ("hook_embed", "hook_pos_embed", "hook_attn_out", "hook_mlp_out", "attn.hook_z", "ln_final.hook_scale")
    logits, cache = model.run_with_cache(tokens, names=lambda n: n.endswith(need), attention_mask=mask)
    P = tokens.shape[1]
    p = pos % P
    direction = model.tokens_to_residual_directions(ans[:, 0]) - model.tokens_to_residual_directions(ans[:, 1])  # [B, D]

    def attrs(stack):  # [n, B, P, D] at pos -> [n] batch-mean
        s = cache.apply_ln_to_stack(select_positions(stack, [p]), pos_slice=[p])[:, :, 0]
        return np.asarray((s * direction).sum(-1).mean(-1))

    heads_stack, _ = cache.stack_head_results(return_labels=True)
    comps, comp_labels = cache.decompose_resid(return_labels=True)
    b = jnp.arange(len(ans))
    lg = jnp.asarray(logits, jnp.float32)[b, p]
    total = float((lg[b, ans[:, 0]] - lg[b, ans[:, 1]]).mean())
    comp_vals = attrs(comps)
    W_U, b_U = model.W_U, model.b_U
    bias = b_U[ans[:, 0]] - b_U[ans[:, 1]]
    if arch.has_weight(model.params, "ln_final_b"):
        bias = bias + model.ln_final_b @ (W_U[:, ans[:, 0]] - W_U[:, ans[:, 1]])
    L, H = cfg.n_layers, cfg.n_heads
    return Results(
        heads=Labelled(attrs(heads_stack).reshape(L, H), ("layer", "head"),
                       (axis_labels(model, "layer"), axis_labels(model, "head")), name="direct logit attribution"),
        components=Labelled(comp_vals, ("component",), (tuple(comp_labels),), name="direct logit attribution"),
        bias=float(np.mean(np.asarray(bias))),
        total=total,
        name="direct logit attribution",
    )
