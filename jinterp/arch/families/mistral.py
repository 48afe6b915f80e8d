"""Mistral: Llama with sliding-window attention on every layer."""

from jinterp.arch.families import llama
from jinterp.io.hf import layer_windows

MODEL_TYPES = ("mistral",)
PREFIXES = llama.PREFIXES


def config(hf):
    return llama.base_config(hf, "mistral", windows=layer_windows(hf, hf.num_hidden_layers, all_layers=True))


params = llama.params
