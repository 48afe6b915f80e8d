"""GPT-J: parallel attention and MLP that both read one LayerNorm (ln_1), partial rotary over the
first rotary_dim dims of each head with interleaved pairs (rotate_every_two), no attention biases,
biases on the MLP and on lm_head."""

from jinterp.arch.families.common import unembedding
from jinterp.config import Config
from jinterp.io.hf import UnsupportedArchitecture, hf_attr
from jinterp.io.safetensors import zeros

MODEL_TYPES = ("gptj",)
PREFIXES = ("transformer.",)


def config(hf) -> Config:
    d, h = hf.n_embd, hf.n_head
    if not getattr(hf, "rotary_dim", None):
        # transformers then rotates with d_model-wide tables, which only fits one head
        raise UnsupportedArchitecture("GPT-J without rotary_dim is not supported; set rotary_dim in config.json")
    return Config(
        family="gptj",
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
        positional="rotary",
        rotary_dim=int(hf.rotary_dim),
        rotary_interleaved=True,
        rope_theta=10000.0,  # fixed in transformers' GPT-J
        act=hf.activation_function,
        parallel_residual=True,
        shared_norm=True,
        tied_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )


def params(r, c: Config, hf) -> dict:
    L, D, H, dh, F, V = c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp, c.d_vocab
    pre = "h.{}."
    proj = lambda n: r.stack(pre + f"attn.{n}.weight", L, (D, D), lambda w: w.reshape(H, dh, D).transpose(0, 2, 1))
    unembed = unembedding(r, "lm_head.weight", "wte.weight", c)
    if r.has("lm_head.bias"):
        unembed["b_U"] = r.get("lm_head.bias", (V,))
    return {
        "embed": {"W_E": r.get("wte.weight", (V, D))},
        "blocks": {
            "ln1": {"w": r.stack(pre + "ln_1.weight", L, (D,)), "b": r.stack(pre + "ln_1.bias", L, (D,))},
            "attn": {
                "W_Q": proj("q_proj"), "W_K": proj("k_proj"), "W_V": proj("v_proj"),
                "W_O": r.stack(pre + "attn.out_proj.weight", L, (D, D), lambda w: w.T.reshape(H, dh, D)),
                "b_Q": zeros((L, H, dh)), "b_K": zeros((L, H, dh)), "b_V": zeros((L, H, dh)), "b_O": zeros((L, D)),
            },
            "mlp": {
                "W_in": r.stack(pre + "mlp.fc_in.weight", L, (F, D), lambda w: w.T),
                "b_in": r.stack(pre + "mlp.fc_in.bias", L, (F,)),
                "W_out": r.stack(pre + "mlp.fc_out.weight", L, (D, F), lambda w: w.T),
                "b_out": r.stack(pre + "mlp.fc_out.bias", L, (D,)),
            },
        },
        "ln_final": {"w": r.get("ln_f.weight", (D,)), "b": r.get("ln_f.bias", (D,))},
        "unembed": unembed,
    }
