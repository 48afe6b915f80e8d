"""Gemma: embeddings scaled by sqrt(d_model), GeGLU MLP, (1 + w) RMSNorm, explicit head_dim, tied embeddings (HF default)."""

from jinterp.arch.families import llama
from jinterp.io.hf import hf_attr

MODEL_TYPES = ("gemma",)
PREFIXES = llama.PREFIXES


def config(hf):
    return llama.base_config(
        hf,
        "gemma",
        act=hf_attr(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
        embed_scale=hf.hidden_size**0.5,
    )


def params(r, c, hf):
    return llama.params(r, c, hf, norm_offset=1.0)
