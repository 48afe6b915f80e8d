"""Mixtral: Llama (sliding windows on every layer when set) with a mixture of experts for its MLP:
num_local_experts gated experts, num_experts_per_tok of them per token, weights renormalised over
the chosen ones. The expert mapping here (`experts`) is shared by Qwen2-MoE / Qwen3-MoE and OLMoE.

Checkpoint layouts read: per expert (what transformers 5 save_pretrained writes, and the released
checkpoints): `{block}.experts.{e}.{gate,up,down}` with Mixtral's w1 / w3 / w2 under
`block_sparse_moe`; and fused, as transformers 5 holds them in memory: `mlp.experts.gate_up_proj`
[E, 2F, D] (gate rows first) and `mlp.experts.down_proj` [E, D, F].
"""

from jinterp.arch.families import llama
from jinterp.io.hf import layer_windows
from jinterp.io.safetensors import Lazy, aligned_empty

MODEL_TYPES = ("mixtral",)
PREFIXES = llama.PREFIXES


def config(hf):
    return llama.base_config(hf, "mixtral", mlp="moe", n_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                             norm_topk_prob=True, windows=layer_windows(hf, hf.num_hidden_layers, all_layers=True))


def _per_expert(r, fmt: str, L: int, E: int, shape, fn) -> Lazy:
    """fmt (with "{}" for the layer and "{e}" for the expert) stacked to [L, E, ...], each tensor
    checked now against shape, mapped by fn when built, one expert's layers in memory at a time."""
    parts = [r.stack(fmt.replace("{e}", str(e)), L, shape, fn) for e in range(E)]

    def build(dtype):
        out = None
        for e, part in enumerate(parts):
            a = part.build(dtype)
            if out is None:
                out = aligned_empty((L, E) + a.shape[1:], dtype)
            out[:, e] = a
        return out

    return Lazy(build, parts[0].name.replace(".0.", ".{e}.", 1) if parts else fmt)


def experts(r, c, block: str = "mlp", names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """The routed experts and router of layers.{l}.{block}: {"W_router", "experts": {W_gate, W_in, W_out}}.
    names: the per-expert gate / up / down projections (Mixtral: w1, w3, w2)."""
    L, D, F, E = c.n_layers, c.d_model, c.d_mlp, c.n_experts
    pre = f"layers.{{}}.{block}."
    tr = lambda w: w.T
    router = r.stack(pre + "gate.weight", L, (E, D), tr)
    if r.has(f"layers.0.{block}.experts.gate_up_proj"):  # fused
        gate_up = pre + "experts.gate_up_proj"
        ex = {
            "W_gate": r.stack(gate_up, L, (E, 2 * F, D), lambda w: w[:, :F].transpose(0, 2, 1)),
            "W_in": r.stack(gate_up, L, (E, 2 * F, D), lambda w: w[:, F:].transpose(0, 2, 1)),
            "W_out": r.stack(pre + "experts.down_proj", L, (E, D, F), lambda w: w.transpose(0, 2, 1)),
        }
    else:
        g, u, d = (pre + "experts.{e}." + n + ".weight" for n in names)
        ex = {"W_gate": _per_expert(r, g, L, E, (F, D), tr), "W_in": _per_expert(r, u, L, E, (F, D), tr),
              "W_out": _per_expert(r, d, L, E, (D, F), tr)}
    return {"W_router": router, "experts": ex}


def params(r, c, hf):
    block = "block_sparse_moe" if r.has("layers.0.block_sparse_moe.gate.weight") else "mlp"
    names = ("w1", "w3", "w2") if block == "block_sparse_moe" else ("gate_proj", "up_proj", "down_proj")
    return llama.params(r, c, hf, mlp=lambda r, c, hf: experts(r, c, block, names))
