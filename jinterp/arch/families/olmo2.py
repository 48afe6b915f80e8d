"""OLMo 2: Llama with no pre-norms, RMSNorm on the attention and MLP outputs before each residual add
(post-norms), and QK-norm as one RMSNorm over all heads of the projected q (of k), before rotary."""

from jinterp.arch.families import llama

MODEL_TYPES = ("olmo2",)
PREFIXES = llama.PREFIXES


def config(hf):
    return llama.base_config(hf, "olmo2", pre_norms=False, post_norms=True, qk_norm=True, qk_norm_scope="all")


def params(r, c, hf):
    norms = {"ln1_post": "post_attention_layernorm", "ln2_post": "post_feedforward_layernorm"}
    return llama.params(r, c, hf, norms=norms)
