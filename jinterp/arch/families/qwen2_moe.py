"""Qwen2-MoE and Qwen3-MoE: Qwen2 (q/k/v biases, optional sliding windows) or Qwen3 (per-head QK-norm)
attention, with a mixture of experts for the MLP: num_experts gated experts of width
moe_intermediate_size, num_experts_per_tok per token, renormalised only when norm_topk_prob; Qwen2-MoE
adds a shared expert (shared_expert_intermediate_size) scaled by a sigmoid gate.

Every layer must be sparse: decoder_sparse_step other than 1 or a non-empty mlp_only_layers (dense
MLP layers between the sparse ones) raise UnsupportedArchitecture, as does num_experts 0.
"""

from jinterp.arch.families import llama, mixtral
from jinterp.io.hf import UnsupportedArchitecture, hf_attr, layer_windows

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
PREFIXES = llama.PREFIXES


def check_all_sparse(hf) -> None:
    """Refuse configs whose layers are not all mixture-of-experts layers (transformers' rule:
    layer l is sparse iff l not in mlp_only_layers and num_experts > 0 and (l + 1) % decoder_sparse_step == 0)."""
    L, step = hf.num_hidden_layers, hf_attr(hf, "decoder_sparse_step", default=1)
    only = list(getattr(hf, "mlp_only_layers", None) or [])
    dense = [l for l in range(L) if l in only or not (hf.num_experts > 0 and (l + 1) % step == 0)]
    if dense:
        raise UnsupportedArchitecture(
            f"{hf.model_type} with dense MLP layers {dense} (mlp_only_layers={only}, decoder_sparse_step={step}, "
            f"num_experts={hf.num_experts}) is not supported: jinterp needs every layer to be a mixture of experts "
            "(mlp_only_layers empty, decoder_sparse_step 1, num_experts > 0)")


def config(hf):
    check_all_sparse(hf)
    qwen3 = hf.model_type == "qwen3_moe"
    shared = 0 if qwen3 else int(hf_attr(hf, "shared_expert_intermediate_size", default=0))
    extra = dict(qk_norm=True, windows=layer_windows(hf, hf.num_hidden_layers, all_layers=True)) if qwen3 else {}
    return llama.base_config(
        hf, hf.model_type, mlp="moe", d_mlp=hf.moe_intermediate_size, n_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok, norm_topk_prob=bool(hf.norm_topk_prob), d_shared=shared,
        shared_gate=bool(shared), **extra)


def _mlp(r, c, hf):
    out = mixtral.experts(r, c)
    if c.d_shared:
        L, D, Fs = c.n_layers, c.d_model, c.d_shared
        w = lambda n, shape: r.stack(f"layers.{{}}.mlp.shared_expert.{n}.weight", L, shape, lambda a: a.T)
        out["shared"] = {"W_gate": w("gate_proj", (Fs, D)), "W_in": w("up_proj", (Fs, D)), "W_out": w("down_proj", (D, Fs))}
        out["W_shared_gate"] = r.stack("layers.{}.mlp.shared_expert_gate.weight", L, (1, D), lambda a: a.reshape(D))
    return out


def params(r, c, hf):
    if hf.model_type == "qwen3_moe":
        return llama.params(r, c, hf, mlp=_mlp)
    return llama.params(r, c, hf, qkv_bias=bool(hf_attr(hf, "qkv_bias", default=True)), o_bias=False, mlp=_mlp)
