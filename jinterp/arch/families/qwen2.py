"""Qwen2: Llama with biases on q/k/v (none on o), optional sliding windows on upper layers."""

from jinterp.arch.families import llama

MODEL_TYPES = ("qwen2",)
PREFIXES = llama.PREFIXES


def config(hf):
    return llama.base_config(hf, "qwen2")


def params(r, c, hf):
    return llama.params(r, c, hf, qkv_bias=True, o_bias=False)
