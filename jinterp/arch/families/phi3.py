"""Phi-3: Llama with fused qkv_proj and gate_up_proj weights, partial rotary (partial_rotary_factor),
"longrope" rotary scaling, sliding windows on every layer when sliding_window is set, no biases."""

from jinterp.arch.families import llama
from jinterp.arch.families.common import unembedding
from jinterp.config import Config
from jinterp.io.hf import layer_windows
from jinterp.io.safetensors import zeros

MODEL_TYPES = ("phi3",)
PREFIXES = llama.PREFIXES


def config(hf) -> Config:
    return llama.base_config(hf, "phi3", windows=layer_windows(hf, hf.num_hidden_layers, all_layers=True))


def params(r, c: Config, hf) -> dict:
    L, D, H, K, dh, F, V = c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp, c.d_vocab
    pre = "layers.{}."
    # qkv_proj: nn.Linear(D, (H + 2K) dh), output rows [q heads | k heads | v heads]; read once per part
    bounds = {"q": (0, H), "k": (H, H + K), "v": (H + K, H + 2 * K)}

    def qkv(part):
        a, b = bounds[part]
        return r.stack(pre + "self_attn.qkv_proj.weight", L, ((H + 2 * K) * dh, D),
                       lambda w: w[a * dh:b * dh].reshape(b - a, dh, D).transpose(0, 2, 1))

    # gate_up_proj: nn.Linear(D, 2F), output rows [gate | up]
    gate_up = lambda i: r.stack(pre + "mlp.gate_up_proj.weight", L, (2 * F, D), lambda w: w[i * F:(i + 1) * F].T)
    norm = lambda n: {"w": r.stack(pre + n + ".weight", L, (D,))}
    return {
        "embed": {"W_E": r.get("embed_tokens.weight", (V, D))},
        "blocks": {
            "ln1": norm("input_layernorm"),
            "ln2": norm("post_attention_layernorm"),
            "attn": {
                "W_Q": qkv("q"), "W_K": qkv("k"), "W_V": qkv("v"),
                "W_O": r.stack(pre + "self_attn.o_proj.weight", L, (D, H * dh), lambda w: w.T.reshape(H, dh, D)),
                "b_Q": zeros((L, H, dh)), "b_K": zeros((L, K, dh)), "b_V": zeros((L, K, dh)), "b_O": zeros((L, D)),
            },
            "mlp": {
                "W_gate": gate_up(0), "b_gate": zeros((L, F)),
                "W_in": gate_up(1), "b_in": zeros((L, F)),
                "W_out": r.stack(pre + "mlp.down_proj.weight", L, (D, F), lambda w: w.T),
                "b_out": zeros((L, D)),
            },
        },
        "ln_final": {"w": r.get("norm.weight", (D,))},
        "unembed": unembedding(r, "lm_head.weight", "embed_tokens.weight", c),
    }
