"""GPT-2: learned positions, LayerNorm, GELU MLP, Conv1D weights stored [in, out], fused qkv."""

import numpy as np

from jinterp.arch.families.common import unembedding
from jinterp.config import Config
from jinterp.io.hf import hf_attr

MODEL_TYPES = ("gpt2",)
PREFIXES = ("transformer.", "")


def config(hf) -> Config:
    d, h = hf.n_embd, hf.n_head
    return Config(
        family="gpt2",
        n_layers=hf.n_layer,
        d_model=d,
        n_heads=h,
        n_kv_heads=h,
        d_head=d // h,
        d_mlp=hf_attr(hf, "n_inner", default=4 * d),
        d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions,
        norm="layernorm",
        norm_eps=hf.layer_norm_epsilon,
        positional="learned",
        act=hf.activation_function,
        attn_scale=(d // h) ** -0.5 if getattr(hf, "scale_attn_weights", True) else 1.0,
        attn_scale_inverse_layer=bool(getattr(hf, "scale_attn_by_inverse_layer_idx", False)),
        # transformers upcasts only under eager attention (sdpa, its default, ignores the flag); jinterp always
        # does, which is eager's result
        attn_upcast=bool(getattr(hf, "reorder_and_upcast_attn", False)),
        tied_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )


def params(r, c: Config, hf) -> dict:
    L, D, H, dh, F, V = c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp, c.d_vocab
    # fused qkv, Conv1D [D, 3D] (x @ W): part i -> [H, D, dh]; read once per part
    part = lambda i: lambda w: np.split(w, 3, axis=-1)[i].reshape(D, H, dh).transpose(1, 0, 2)
    W_Q, W_K, W_V = (r.stack("h.{}.attn.c_attn.weight", L, (D, 3 * D), part(i)) for i in range(3))
    bpart = lambda i: lambda b: np.split(b, 3)[i].reshape(H, dh)
    b_Q, b_K, b_V = (r.stack("h.{}.attn.c_attn.bias", L, (3 * D,), bpart(i)) for i in range(3))
    ln = lambda n: {"w": r.stack(f"h.{{}}.{n}.weight", L, (D,)), "b": r.stack(f"h.{{}}.{n}.bias", L, (D,))}
    return {
        "embed": {"W_E": r.get("wte.weight", (V, D))},
        "pos_embed": {"W_pos": r.get("wpe.weight", (c.n_ctx, D))},
        "blocks": {
            "ln1": ln("ln_1"),
            "ln2": ln("ln_2"),
            "attn": {
                "W_Q": W_Q, "W_K": W_K, "W_V": W_V, "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
                "W_O": r.stack("h.{}.attn.c_proj.weight", L, (D, D), lambda w: w.reshape(H, dh, D)),
                "b_O": r.stack("h.{}.attn.c_proj.bias", L, (D,)),
            },
            "mlp": {
                "W_in": r.stack("h.{}.mlp.c_fc.weight", L, (D, F)),
                "b_in": r.stack("h.{}.mlp.c_fc.bias", L, (F,)),
                "W_out": r.stack("h.{}.mlp.c_proj.weight", L, (F, D)),
                "b_out": r.stack("h.{}.mlp.c_proj.bias", L, (D,)),
            },
        },
        "ln_final": {"w": r.get("ln_f.weight", (D,)), "b": r.get("ln_f.bias", (D,))},
        "unembed": unembedding(r, "lm_head.weight", "wte.weight", c),
    }


def to_hf(p: dict, c: Config) -> dict:
    """Our parameters -> HF GPT2LMHeadModel tensors (used to save the bundled models)."""
    L, D = c.n_layers, c.d_model
    a, m, out = p["blocks"]["attn"], p["blocks"]["mlp"], {}
    flat = lambda w: np.asarray(w).transpose(0, 2, 1, 3).reshape(L, D, -1)  # [L,H,D,dh] -> [L,D,H*dh]
    qkv = np.concatenate([flat(a["W_Q"]), flat(a["W_K"]), flat(a["W_V"])], -1)
    qkv_b = np.concatenate([np.asarray(a[k]).reshape(L, -1) for k in ("b_Q", "b_K", "b_V")], -1)
    for l in range(L):
        pre = f"transformer.h.{l}."
        out[pre + "attn.c_attn.weight"] = qkv[l]
        out[pre + "attn.c_attn.bias"] = qkv_b[l]
        out[pre + "attn.c_proj.weight"] = np.asarray(a["W_O"][l]).reshape(-1, D)
        out[pre + "attn.c_proj.bias"] = np.asarray(a["b_O"][l])
        out[pre + "mlp.c_fc.weight"] = np.asarray(m["W_in"][l])
        out[pre + "mlp.c_fc.bias"] = np.asarray(m["b_in"][l])
        out[pre + "mlp.c_proj.weight"] = np.asarray(m["W_out"][l])
        out[pre + "mlp.c_proj.bias"] = np.asarray(m["b_out"][l])
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[pre + theirs + ".weight"] = np.asarray(p["blocks"][ours]["w"][l])
            out[pre + theirs + ".bias"] = np.asarray(p["blocks"][ours]["b"][l])
    out["transformer.wte.weight"] = np.asarray(p["embed"]["W_E"])
    out["transformer.wpe.weight"] = np.asarray(p["pos_embed"]["W_pos"])
    out["transformer.ln_f.weight"] = np.asarray(p["ln_final"]["w"])
    out["transformer.ln_f.bias"] = np.asarray(p["ln_final"]["b"])
    if not c.tied_embeddings:
        out["lm_head.weight"] = np.asarray(p["unembed"]["W_U"]).T
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
