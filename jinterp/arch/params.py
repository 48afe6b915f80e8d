"""The parameter pytree: its shapes from a config alone, and TransformerLens-style weight names.

    embed.W_E [V, D]            pos_embed.W_pos [n_ctx, D]           (learned positions only)
    blocks.ln1.{w,b} [L, D]     blocks.ln2.{w,b}                     (b only for LayerNorm; none without
                                                                     pre-norms (OLMo 2), no ln2 with a shared norm (GPT-J))
    blocks.ln1_post.w, blocks.ln2_post.w                             (post-norms, Gemma 2 and 3, OLMo 2)
    blocks.attn.W_Q [L, H, D, dh]     b_Q [L, H, dh]
    blocks.attn.W_K [L, Hkv, D, dh]   b_K [L, Hkv, dh]   W_V, b_V likewise
    blocks.attn.W_O [L, H, dh, D]     b_O [L, D]
    blocks.attn.q_norm.w, k_norm.w [L, dh]                           (QK-norm, Qwen3, Gemma 3)
        or [L, H, dh], [L, Hkv, dh]                                  (QK-norm over all heads, OLMo 2)
    blocks.mlp.W_in [L, D, F]  b_in [L, F]  W_gate, b_gate (gated)  W_out [L, F, D]  b_out [L, D]
        mixture of experts instead (no biases): W_router [L, D, E], experts.{W_gate, W_in} [L, E, D, F],
        experts.W_out [L, E, F, D]; a shared expert shared.{W_gate, W_in} [L, D, Fs], shared.W_out [L, Fs, D];
        its gate W_shared_gate [L, D]
    ln_final.{w,b} [D]          unembed.W_U [D, V]   unembed.b_U [V]

Biases are always present (zeros where a checkpoint has none), so the block has no branches on
them. Every reader of weights by name (Model's attributes, weight-space analysis) goes through
`weight`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinterp.config import Config

# TransformerLens-style names -> path in the parameter pytree
WEIGHTS = {
    "W_E": ("embed", "W_E"),
    "W_pos": ("pos_embed", "W_pos"),
    "W_U": ("unembed", "W_U"),
    "b_U": ("unembed", "b_U"),
    **{n: ("blocks", "attn", n) for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")},
    **{n: ("blocks", "mlp", n) for n in ("W_in", "b_in", "W_gate", "b_gate", "W_out", "b_out")},
    "W_router": ("blocks", "mlp", "W_router"),
    **{f"{n}_experts": ("blocks", "mlp", "experts", n) for n in ("W_in", "W_gate", "W_out")},
    **{f"{n}_shared": ("blocks", "mlp", "shared", n) for n in ("W_in", "W_gate", "W_out")},
    "W_shared_gate": ("blocks", "mlp", "W_shared_gate"),
    **{f"{n}_{k}": ("blocks", n, k) for n in ("ln1", "ln2") for k in ("w", "b")},
    "ln_final_w": ("ln_final", "w"),
    "ln_final_b": ("ln_final", "b"),
}


def weight(params: dict, name: str):
    """The weight called `name` (a key of WEIGHTS, e.g. "W_Q" [L, H, D, dh]); KeyError naming the
    model's available weights if this model has none by that name."""
    if name not in WEIGHTS:
        raise KeyError(f"unknown weight {name!r}; names: {', '.join(WEIGHTS)}")
    node = params
    for k in WEIGHTS[name]:
        if k not in node:
            have = [n for n in WEIGHTS if has_weight(params, n)]
            raise KeyError(f"this model has no {name}; it has {', '.join(have)}")
        node = node[k]
    return node


def replace_weight(params: dict, name: str, value) -> dict:
    """A new parameter pytree with weight `name` replaced by value (the rest shared, not copied)."""
    weight(params, name)  # raises if absent

    def put(node, path):
        return {**node, path[0]: value if len(path) == 1 else put(node[path[0]], path[1:])}

    return put(params, WEIGHTS[name])


def has_weight(params: dict, name: str) -> bool:
    node = params
    for k in WEIGHTS[name]:
        if k not in node:
            return False
        node = node[k]
    return True


def param_shapes(cfg: Config, dtype=jnp.float32) -> dict:
    """The parameter pytree of a model with this config, as jax.ShapeDtypeStruct leaves (no memory)."""
    L, D, H, K, dh, F, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    norm = lambda *lead: {"w": s(*lead, D), **({"b": s(*lead, D)} if cfg.norm == "layernorm" else {})}
    attn = {
        "W_Q": s(L, H, D, dh), "W_K": s(L, K, D, dh), "W_V": s(L, K, D, dh), "W_O": s(L, H, dh, D),
        "b_Q": s(L, H, dh), "b_K": s(L, K, dh), "b_V": s(L, K, dh), "b_O": s(L, D),
    }
    if cfg.qk_norm:
        per_head = cfg.qk_norm_scope == "head"
        attn["q_norm"] = {"w": s(L, dh) if per_head else s(L, H, dh)}
        attn["k_norm"] = {"w": s(L, dh) if per_head else s(L, K, dh)}
    mlp = {"W_in": s(L, D, F), "b_in": s(L, F), "W_out": s(L, F, D), "b_out": s(L, D)}
    if cfg.mlp == "gated":
        mlp.update(W_gate=s(L, D, F), b_gate=s(L, F))
    elif cfg.mlp == "moe":
        E, Fs = cfg.n_experts, cfg.d_shared
        mlp = {"W_router": s(L, D, E), "experts": {"W_gate": s(L, E, D, F), "W_in": s(L, E, D, F), "W_out": s(L, E, F, D)}}
        if Fs:
            mlp["shared"] = {"W_gate": s(L, D, Fs), "W_in": s(L, D, Fs), "W_out": s(L, Fs, D)}
        if cfg.shared_gate:
            mlp["W_shared_gate"] = s(L, D)
    blocks = {"attn": attn, "mlp": mlp}
    if cfg.pre_norms:
        blocks["ln1"] = norm(L)
        if not cfg.shared_norm:
            blocks["ln2"] = norm(L)
    if cfg.post_norms:
        blocks.update(ln1_post={"w": s(L, D)}, ln2_post={"w": s(L, D)})
    out = {"embed": {"W_E": s(V, D)}, "blocks": blocks, "ln_final": norm(), "unembed": {"W_U": s(D, V), "b_U": s(V)}}
    if cfg.positional == "learned":
        out["pos_embed"] = {"W_pos": s(cfg.n_ctx, D)}
    return out
