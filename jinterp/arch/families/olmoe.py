"""OLMoE: Llama with QK-norm as one RMSNorm over all heads of q (of k), before rotary, and a mixture of
experts for the MLP (num_experts of width intermediate_size, num_experts_per_tok per token, renormalised
only when norm_topk_prob). clip_qkv (clamping q, k, v) is not implemented and is refused."""

from jinterp.arch.families import llama, mixtral
from jinterp.io.hf import UnsupportedArchitecture

MODEL_TYPES = ("olmoe",)
PREFIXES = llama.PREFIXES


def config(hf):
    if getattr(hf, "clip_qkv", None) is not None:
        raise UnsupportedArchitecture(
            f"olmoe with clip_qkv={hf.clip_qkv} (q, k and v clamped to +-clip_qkv) is not supported; "
            "jinterp implements clip_qkv null only")
    return llama.base_config(hf, "olmoe", qk_norm=True, qk_norm_scope="all", mlp="moe", n_experts=hf.num_experts,
                             top_k=hf.num_experts_per_tok, norm_topk_prob=bool(hf.norm_topk_prob))


def params(r, c, hf):
    return llama.params(r, c, hf, mlp=lambda r, c, hf: mixtral.experts(r, c))
