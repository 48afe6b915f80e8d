"""The static model config: every knob the generic decoder reads.

A `Config` is a frozen, hashable dataclass, so it can be a static argument to `jax.jit`.
Families differ only in these fields (see `jinterp/arch/families/`); the decoder has no
`if family == ...` branches.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Config:
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int

    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    positional: str = "learned"  # "learned" | "rotary"
    rotary_dim: int = 0  # leading dims of each head that rotate (partial rotary)
    rope_theta: float = 10000.0
    # Rotary scaling as a sorted tuple of (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
    rope_scaling: tuple = ()
    act: str = "gelu_new"  # "gelu_new" | "gelu" | "gelu_pytorch_tanh" | "silu" | "relu"
    gated_mlp: bool = False
    parallel_residual: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    post_norms: bool = False  # extra norms after attention and MLP outputs (Gemma 2)
    attn_scale: float | None = None  # multiplies q.k; None means d_head ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Sliding-window size per layer (0 = full causal attention); empty = no windows anywhere.
    windows: tuple = ()
    embed_scale: float | None = None  # multiply embeddings (Gemma: sqrt(d_model))
    tied_embeddings: bool = False
    matmul_precision: str = "highest"  # "highest" keeps fp32 exact on GPU/TPU too

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm {self.norm!r}")
        if self.positional not in ("learned", "rotary"):
            raise ValueError(f"unknown positional scheme {self.positional!r}")
        if self.windows and len(self.windows) != self.n_layers:
            raise ValueError("windows must list one entry per layer")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.d_head**-0.5

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def layer_windows(self) -> np.ndarray:
        """Per-layer sliding window as an int array (0 = no window)."""
        return np.asarray(self.windows or (0,) * self.n_layers, dtype=np.int32)

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


def rope_inv_freq(cfg: Config) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] and the cos/sin multiplier, as HF computes them."""
    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    s = dict(cfg.rope_scaling)
    kind = s.get("rope_type", "default")
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / np.float32(s["factor"])
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        inv = np.where(medium, smoothed, out).astype(np.float32)
    else:  # validated when the config is built; kept as a guard
        raise ValueError(f"unsupported rope_type {kind!r}")
    return inv
