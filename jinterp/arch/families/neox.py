"""GPT-NeoX / Pythia: partial rotary, LayerNorm, parallel or sequential residual, fused per-head qkv."""

from jinterp.arch.families.common import unembedding
from jinterp.io.safetensors import zeros
from jinterp.config import Config
from jinterp.io.hf import rope_settings

MODEL_TYPES = ("gpt_neox",)
PREFIXES = ("gpt_neox.",)


def config(hf) -> Config:
    d, h = hf.hidden_size, hf.num_attention_heads
    return Config(
        family="gpt_neox",
        n_layers=hf.num_hidden_layers,
        d_model=d,
        n_heads=h,
        n_kv_heads=h,
        d_head=d // h,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        norm="layernorm",
        norm_eps=hf.layer_norm_eps,
        act=hf.hidden_act,
        parallel_residual=bool(hf.use_parallel_residual),
        tied_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        **rope_settings(hf, d // h),
    )


def params(r, c: Config, hf) -> dict:
    L, D, H, dh, F, V = c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp, c.d_vocab
    # query_key_value: nn.Linear(D, 3D); output features are laid out [head, (q|k|v), dh]
    # query_key_value: nn.Linear(D, 3D); output features are laid out [head, (q|k|v), dh]; read once per part
    part = lambda i: lambda w: w.reshape(H, 3, dh, D)[:, i].transpose(0, 2, 1)  # -> [H, D, dh]
    W_Q, W_K, W_V = (r.stack("layers.{}.attention.query_key_value.weight", L, (3 * D, D), part(i)) for i in range(3))
    if getattr(hf, "attention_bias", True):
        bpart = lambda i: lambda b: b.reshape(H, 3, dh)[:, i]
        b_Q, b_K, b_V = (r.stack("layers.{}.attention.query_key_value.bias", L, (3 * D,), bpart(i)) for i in range(3))
        b_O = r.stack("layers.{}.attention.dense.bias", L, (D,))
    else:
        b_Q = b_K = b_V = zeros((L, H, dh))
        b_O = zeros((L, D))
    ln = lambda n: {"w": r.stack(f"layers.{{}}.{n}.weight", L, (D,)), "b": r.stack(f"layers.{{}}.{n}.bias", L, (D,))}
    return {
        "embed": {"W_E": r.get("embed_in.weight", (V, D))},
        "blocks": {
            "ln1": ln("input_layernorm"),
            "ln2": ln("post_attention_layernorm"),
            "attn": {
                "W_Q": W_Q, "W_K": W_K, "W_V": W_V, "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
                "W_O": r.stack("layers.{}.attention.dense.weight", L, (D, D), lambda w: w.T.reshape(H, dh, D)),
                "b_O": b_O,
            },
            "mlp": {
                "W_in": r.stack("layers.{}.mlp.dense_h_to_4h.weight", L, (F, D), lambda w: w.T),
                "b_in": r.stack("layers.{}.mlp.dense_h_to_4h.bias", L, (F,)),
                "W_out": r.stack("layers.{}.mlp.dense_4h_to_h.weight", L, (D, F), lambda w: w.T),
                "b_out": r.stack("layers.{}.mlp.dense_4h_to_h.bias", L, (D,)),
            },
        },
        "ln_final": {"w": r.get("final_layer_norm.weight", (D,)), "b": r.get("final_layer_norm.bias", (D,))},
        "unembed": unembedding(r, "embed_out.weight", "embed_in.weight", c),
    }
