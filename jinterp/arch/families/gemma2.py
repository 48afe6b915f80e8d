"""Gemma 2: Gemma plus attention and final-logit soft-capping, alternating sliding-window layers,
norms before and after both attention and MLP, and scores scaled by query_pre_attn_scalar ** -0.5."""

from jinterp.arch.families import llama
from jinterp.io.hf import hf_attr

MODEL_TYPES = ("gemma2",)
PREFIXES = llama.PREFIXES


def config(hf):
    return llama.base_config(
        hf,
        "gemma2",
        act=hf_attr(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
        embed_scale=hf.hidden_size**0.5,
        post_norms=True,
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        attn_softcap=hf_attr(hf, "attn_logit_softcapping"),
        final_softcap=hf_attr(hf, "final_logit_softcapping"),
    )


def params(r, c, hf):
    norms = {
        "ln1": "input_layernorm",
        "ln1_post": "post_attention_layernorm",
        "ln2": "pre_feedforward_layernorm",
        "ln2_post": "post_feedforward_layernorm",
    }
    return llama.params(r, c, hf, norm_offset=1.0, norms=norms)
