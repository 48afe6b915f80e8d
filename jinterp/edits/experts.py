"""Edits on a mixture of experts' routing (cfg.mlp == "moe"; sites in jinterp/arch/moe.py).

    ablate_experts(ids)                 mlp.hook_expert_weights: those experts' weights become 0, the
                                        other chosen experts keep theirs (as if the experts output 0)
    ablate_experts(ids, reroute=True)   mlp.hook_router_logits: those experts' logits become the dtype's
                                        minimum, so the router chooses among the others (top_k of them,
                                        renormalised as the model does)
    force_experts(ids)                  mlp.hook_router_logits: every other expert's logit becomes the
                                        minimum, so the router chooses among `ids` only: their weights
                                        are the softmax of their own logits (summing to 1 whatever
                                        norm_topk_prob); with fewer ids than top_k the remaining slots
                                        weigh 0

Other routing edits are the general ones on these sites: `patch("mlp.hook_expert_weights", w)` sets
the dense routing weights (an expert the router did not choose is applied too: experts run densely),
`steer("mlp.hook_router_logits", bias)` biases the router.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jinterp.edits.ops import Op
from jinterp.edits.select import concrete

ROUTING_SITES = ("mlp.hook_router_logits", "mlp.hook_expert_weights")


@struct.dataclass
class MaskExperts(Op):
    """new = fill at the experts in `experts` (or at every other expert when `others`), x elsewhere.
    fill: "zero" or "min" (the dtype's minimum: a router logit no expert is chosen by)."""

    experts: jax.Array  # int32 [k] expert ids
    fill: str = struct.field(pytree_node=False, default="zero")
    others: jax.Array = False  # bool, a leaf: rerouting and forcing share one compiled program
    sites: ClassVar = ROUTING_SITES

    def __call__(self, x, at):
        hit = (self.experts[:, None] == jnp.arange(x.shape[-1])).any(0)
        hit = hit ^ jnp.asarray(self.others, bool)
        value = jnp.finfo(x.dtype).min if self.fill == "min" else 0
        return jnp.where(hit, jnp.asarray(value, x.dtype), x)

    def check(self, at):
        super().check(at)
        n = at.sizes["expert"]
        ids = concrete(self.experts)
        if np.ndim(self.experts) != 1:
            at.fail(f"experts must be a list of expert ids, got shape {np.shape(self.experts)}")
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= n):
            bad = ids[(ids < 0) | (ids >= n)][0]
            at.fail(f"expert {bad} is out of range; this model has {n} experts (0..{n - 1})")
        if self.fill not in ("zero", "min"):
            at.fail(f"fill must be 'zero' or 'min', got {self.fill!r}")


def _ids(experts) -> jax.Array:
    a = np.atleast_1d(np.asarray(experts)) if not isinstance(experts, jax.Array) else jnp.atleast_1d(experts)
    if a.size == 0:
        raise ValueError("experts is empty; name at least one expert id")
    if not np.issubdtype(a.dtype, np.integer) or a.ndim != 1:
        raise TypeError(f"experts are an int or a list of ints (expert ids), got {a.dtype} of shape {a.shape}")
    return jnp.asarray(a, jnp.int32)


def ablate_experts(experts, *, layers=None, pos=None, reroute: bool = False):
    """Ablate experts (ids) at the chosen layers and positions: by default their routing weight becomes
    0 (the other chosen experts keep their weights); reroute=True removes them from the router's choice
    instead (their logits become the minimum; the top_k are chosen among the rest)."""
    from jinterp.edits import edit

    if reroute:
        return edit("mlp.hook_router_logits", MaskExperts(_ids(experts), "min", jnp.asarray(False)), layers=layers, pos=pos)
    return edit("mlp.hook_expert_weights", MaskExperts(_ids(experts), "zero"), layers=layers, pos=pos)


def force_experts(experts, *, layers=None, pos=None):
    """Route only to `experts` (ids) at the chosen layers and positions: every other expert's router logit
    becomes the minimum, so the router picks among these (their weights: the softmax of their logits)."""
    from jinterp.edits import edit

    return edit("mlp.hook_router_logits", MaskExperts(_ids(experts), "min", jnp.asarray(True)), layers=layers, pos=pos)
