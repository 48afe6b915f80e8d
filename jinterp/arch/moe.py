"""The mixture-of-experts MLP (cfg.mlp == "moe": Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), as the
generic block's MLP. Routing is transformers' (its *TopKRouter classes)::

    logits  = h W_router                                   site mlp.hook_router_logits  [B, S, E]
    probs   = softmax(float32(logits))
    top     = the top_k largest probs (ties: the lower expert index), / their sum when norm_topk_prob
    weights = top as a dense [B, S, E], zero for experts not chosen     site mlp.hook_expert_weights
    out_e   = (act(h W_gate[e]) * (h W_in[e])) W_out[e]    site mlp.hook_expert_out [B, S, E, D] (on request)
    gate    = sigmoid(h . w_shared_gate)                   site mlp.hook_shared_gate [B, S, 1] (shared_gate)
    shared  = gate * (act(h Ws_gate) * (h Ws_in)) Ws_out   site mlp.hook_shared_out [B, S, D] (d_shared > 0)
    out     = sum_e weights[e] * out_e + shared            (the block's hook_mlp_out)

Experts run densely: every expert on every token, then weighted. That is exact (an expert not
chosen weighs exactly 0), simple, differentiable in the weights, and honours any edit of
hook_expert_weights (weight given to an expert the router did not choose is applied, which a
sparse dispatch would silently drop). The cost is n_experts / top_k times the expert FLOPs of a
sparse dispatch and a [B, S, E, d_mlp] intermediate per layer (see engine.flops).

Ties: torch.topk's order among equal probabilities is unspecified (on CPU it varies with the
sizes); lax.top_k takes the lower expert index. Equal probabilities need equal router logits,
which trained or random weights essentially never give.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def routing(cfg, logits):
    """Router logits [..., E] -> the dense routing weights [..., E] (float32) as transformers computes
    them: softmax in float32, top_k, renormalised when cfg.norm_topk_prob."""
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    vals, idx = lax.top_k(probs, cfg.top_k)
    if cfg.norm_topk_prob:
        vals = vals / vals.sum(-1, keepdims=True)
    # scatter as a sum of one-hot rows: elementwise, so exact on every backend (no TF32 matmul)
    return (jax.nn.one_hot(idx, cfg.n_experts, dtype=F32) * vals[..., None]).sum(-2)


def mlp(ctx, p, h, layer, cols, acts, activation):
    """The MoE MLP on h [B, S, D] (the normalised residual); p: the layer's "mlp" parameters
    (arch/params.py); activation(name, x): the decoder's activation functions."""
    cfg = ctx.cfg
    logits = ctx.ein("bsd,de->bse", h, p["W_router"])
    logits = ctx.site("mlp.hook_router_logits", logits, layer, cols, acts)
    weights = routing(cfg, logits).astype(h.dtype)  # cast as Qwen2-MoE / OLMoE do (Mixtral keeps float32)
    weights = ctx.site("mlp.hook_expert_weights", weights, layer, cols, acts)
    ex = p["experts"]
    gate = ctx.ein("bsd,edf->bsef", h, ex["W_gate"])
    post = activation(cfg.act, gate) * ctx.ein("bsd,edf->bsef", h, ex["W_in"])
    if ctx.wants("mlp.hook_expert_out"):
        out_e = ctx.site("mlp.hook_expert_out", ctx.ein("bsef,efd->bsed", post, ex["W_out"]), layer, cols, acts)
        out = ctx.ein("bse,bsed->bsd", weights, out_e)
    else:
        out = ctx.ein("bsef,efd->bsd", post * weights[..., None], ex["W_out"])
    if cfg.d_shared:
        sh = p["shared"]
        hidden = activation(cfg.act, ctx.ein("bsd,df->bsf", h, sh["W_gate"])) * ctx.ein("bsd,df->bsf", h, sh["W_in"])
        shared = ctx.ein("bsf,fd->bsd", hidden, sh["W_out"])
        if cfg.shared_gate:
            g = jax.nn.sigmoid(ctx.ein("bsd,d->bs", h, p["W_shared_gate"])[..., None])
            shared = ctx.site("mlp.hook_shared_gate", g, layer, cols, acts) * shared
        out = out + ctx.site("mlp.hook_shared_out", shared, layer, cols, acts)
    return out
