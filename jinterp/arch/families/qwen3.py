"""Qwen3: Llama with per-head RMSNorm on q and k (QK-norm) and head_dim independent of d_model / n_heads."""

from jinterp.arch.families import llama

MODEL_TYPES = ("qwen3",)
PREFIXES = llama.PREFIXES


def config(hf):
    return llama.base_config(hf, "qwen3", qk_norm=True)


params = llama.params
