"""Llama 1/2/3: RMSNorm, gated SiLU MLP, GQA/MQA, rotary (default, linear, llama3 scaling).

The mapping here is shared by the Llama-like families (Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, OLMo 2),
whose files only set their own knobs.
"""

import numpy as np

from jinterp.arch.families.common import unembedding
from jinterp.io.safetensors import zeros
from jinterp.config import Config
from jinterp.io.hf import hf_attr, layer_windows, rope_settings

MODEL_TYPES = ("llama",)
PREFIXES = ("model.",)


def base_config(hf, family: str, **over) -> Config:
    d, h = hf.hidden_size, hf.num_attention_heads
    dh = hf_attr(hf, "head_dim", default=d // h)
    kw = dict(
        family=family,
        n_layers=hf.num_hidden_layers,
        d_model=d,
        n_heads=h,
        n_kv_heads=hf_attr(hf, "num_key_value_heads", default=h),
        d_head=dh,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        norm="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        act=hf_attr(hf, "hidden_act", default="silu"),
        mlp="gated",
        tied_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        windows=layer_windows(hf, hf.num_hidden_layers),
        **rope_settings(hf, dh),
    )
    kw.update(over)
    return Config(**kw)


def config(hf) -> Config:
    return base_config(hf, "llama")


def params(r, c: Config, hf, *, qkv_bias=None, o_bias=None, norm_offset=0.0, norms=None, mlp=None) -> dict:
    """norms maps our norm names to HF layer-norm names; norm_offset folds Gemma's (1 + w) into w;
    mlp(r, c, hf) -> the "mlp" parameters, where they are not Llama's gated MLP (mixture of experts)."""
    L, D, H, K, dh, F, V = c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp, c.d_vocab
    att_bias = bool(getattr(hf, "attention_bias", False))
    qkv_bias = att_bias if qkv_bias is None else qkv_bias
    o_bias = att_bias if o_bias is None else o_bias
    mlp_bias = bool(getattr(hf, "mlp_bias", False))
    pre = "layers.{}."

    def norm_w(name, n=D):
        fn = (lambda w: w.astype(np.float32) + norm_offset) if norm_offset else None
        return r.get(name, (n,), fn) if "{}" not in name else r.stack(name, L, (n,), fn)

    def proj_in(name, n_out_heads):  # nn.Linear [heads*dh, D] -> [L, heads, D, dh]
        return r.stack(pre + f"self_attn.{name}.weight", L, (n_out_heads * dh, D),
                       lambda w: w.reshape(n_out_heads, dh, D).transpose(0, 2, 1))

    def bias(name, shape, present):
        if present:
            return r.stack(pre + name, L, (int(np.prod(shape)),), lambda b: b.reshape(shape))
        return zeros((L,) + shape)

    mlp_w = lambda n, shape: r.stack(pre + f"mlp.{n}.weight", L, shape, lambda w: w.T)
    norms = norms or {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
    blocks = {k: {"w": norm_w(pre + v + ".weight")} for k, v in norms.items()}
    attn = {
        "W_Q": proj_in("q_proj", H),
        "W_K": proj_in("k_proj", K),
        "W_V": proj_in("v_proj", K),
        "W_O": r.stack(pre + "self_attn.o_proj.weight", L, (D, H * dh), lambda w: w.T.reshape(H, dh, D)),
        "b_Q": bias("self_attn.q_proj.bias", (H, dh), qkv_bias),
        "b_K": bias("self_attn.k_proj.bias", (K, dh), qkv_bias),
        "b_V": bias("self_attn.v_proj.bias", (K, dh), qkv_bias),
        "b_O": bias("self_attn.o_proj.bias", (D,), o_bias),
    }
    if c.qk_norm and c.qk_norm_scope == "head":
        attn["q_norm"] = {"w": norm_w(pre + "self_attn.q_norm.weight", dh)}
        attn["k_norm"] = {"w": norm_w(pre + "self_attn.k_norm.weight", dh)}
    elif c.qk_norm:  # one norm over all heads: [heads * dh] -> [heads, dh]
        for n, heads in (("q_norm", H), ("k_norm", K)):
            attn[n] = {"w": r.stack(pre + f"self_attn.{n}.weight", L, (heads * dh,), lambda w, h=heads: w.reshape(h, dh))}
    blocks["attn"] = attn
    blocks["mlp"] = mlp(r, c, hf) if mlp is not None else {
        "W_gate": mlp_w("gate_proj", (F, D)),
        "b_gate": bias("mlp.gate_proj.bias", (F,), mlp_bias),
        "W_in": mlp_w("up_proj", (F, D)),
        "b_in": bias("mlp.up_proj.bias", (F,), mlp_bias),
        "W_out": mlp_w("down_proj", (D, F)),
        "b_out": bias("mlp.down_proj.bias", (D,), mlp_bias),
    }
    return {
        "embed": {"W_E": r.get("embed_tokens.weight", (V, D))},
        "blocks": blocks,
        "ln_final": {"w": norm_w("norm.weight")},
        "unembed": unembedding(r, "lm_head.weight", "embed_tokens.weight", c),
    }
