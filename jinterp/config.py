"""The static model config: every knob the generic decoder reads.

A `Config` is a frozen, hashable dataclass, so it can be a static argument to `jax.jit`.
Families differ only in these fields (see `jinterp/arch/families/`); the decoder has no
`if family == ...` branches.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

NORMS = ("layernorm", "rmsnorm")
POSITIONALS = ("learned", "rotary")
# "dense": act(x W_in + b_in) W_out; "gated": (act(x W_gate + b_gate) * (x W_in + b_in)) W_out.
# A mixture of experts would be a third kind ("moe") with its own fields (experts, router, top-k).
MLPS = ("dense", "gated")
ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "gelu_fast", "silu", "relu")
# rope_type -> the rope_scaling keys it needs (see rope_inv_freq)
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    # Phi-3: short_factor / long_factor divide the frequencies (one per frequency); a sequence uses the long
    # set once its last position reaches original_max_position_embeddings (decided per call and row, as HF
    # decides per call); attention_factor multiplies cos and sin
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"),
}
QK_NORM_SCOPES = ("head", "all")
# "highest": fp32 matmuls stay exact on GPU/TPU; "default": the backend may use TF32 / bf16 passes
MATMUL_PRECISIONS = ("highest", "default")
SIZES = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "n_ctx")


def _check_choice(field: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")


def _check_scaling(field: str, s: dict) -> str:
    """The rope_type of rotary-scaling settings s, checked to be known and to carry the keys it needs."""
    kind = s.get("rope_type", "default")
    _check_choice("rope_type", kind, ROPE_TYPES)
    missing = [k for k in ROPE_TYPES[kind] if k not in s]
    if missing:
        raise ValueError(f"rope_type {kind!r} needs {field} keys {', '.join(ROPE_TYPES[kind])}; missing {', '.join(missing)}")
    return kind


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

    norm: str = "layernorm"  # one of NORMS
    norm_eps: float = 1e-5
    positional: str = "learned"  # one of POSITIONALS
    rotary_dim: int = 0  # leading dims of each head that rotate (partial rotary); even, <= d_head
    rope_theta: float = 10000.0
    # Rotary scaling as a sorted tuple of (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...);
    # a dict is accepted and stored that way. Empty = default rotary.
    rope_scaling: tuple = ()
    # Rotary settings of the sliding-window layers (windows[l] > 0) where they differ from the other layers'
    # (HF's rope_parameters by layer type; Gemma 3: rope_local_base_freq, global layers maybe "linear"-scaled).
    # None: every layer rotates with rope_theta / rope_scaling. local_rope_scaling is read only when
    # local_rope_theta is set: (key, value) pairs as rope_scaling, empty = default rotary; no longrope.
    local_rope_theta: float | None = None
    local_rope_scaling: tuple = ()
    act: str = "gelu_new"  # one of ACTIVATIONS
    mlp: str = "dense"  # one of MLPS
    parallel_residual: bool = False
    qk_norm: bool = False  # RMSNorm on q and k after their projections (Qwen3, OLMo 2)
    # "head": over each head's d_head dims, weights [L, dh] (Qwen3); "all": over all heads of q (of k) at
    # once, weights [L, H, dh] / [L, Hkv, dh] (OLMo 2)
    qk_norm_scope: str = "head"
    rotary_interleaved: bool = False  # rotate pairs (2i, 2i+1) (GPT-J's rotate_every_two), not halves
    pre_norms: bool = True  # norms ln1 / ln2 on the residual before attention / MLP; False: OLMo 2
    post_norms: bool = False  # extra norms after attention and MLP outputs (Gemma 2, OLMo 2)
    # parallel residual where the MLP reads ln1's output as attention does, no ln2 (GPT-J)
    shared_norm: bool = False
    attn_scale: float | None = None  # multiplies q.k; None means d_head ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Sliding-window size per layer (0 = full causal attention); empty = no windows anywhere.
    windows: tuple = ()
    embed_scale: float | None = None  # multiply embeddings (Gemma: sqrt(d_model))
    tied_embeddings: bool = False
    matmul_precision: str = "highest"  # one of MATMUL_PRECISIONS

    def __post_init__(self):
        """Check every option here, so a bad config fails when built, not deep inside a trace."""
        # JSON and HF give lists and dicts; keep the config hashable
        scaling = self.rope_scaling.items() if isinstance(self.rope_scaling, dict) else self.rope_scaling
        hashable = lambda v: tuple(v) if isinstance(v, (list, tuple, np.ndarray)) else v  # longrope's factor lists
        object.__setattr__(self, "rope_scaling", tuple(sorted((k, hashable(v)) for k, v in scaling)))
        local = self.local_rope_scaling
        local = local.items() if isinstance(local, dict) else local
        object.__setattr__(self, "local_rope_scaling", tuple(sorted((k, hashable(v)) for k, v in local)))
        object.__setattr__(self, "windows", tuple(self.windows))
        for f in SIZES:
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("positional", self.positional, POSITIONALS)
        _check_choice("act", self.act, ACTIVATIONS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        _check_choice("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        if self.shared_norm and not (self.parallel_residual and self.pre_norms):
            raise ValueError("shared_norm (the MLP reads ln1's output) needs parallel_residual=True and pre_norms=True")
        if self.positional == "rotary" and not (0 < self.rotary_dim <= self.d_head and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and in 2..d_head ({self.d_head}) for rotary positions, got {self.rotary_dim}")
        s = dict(self.rope_scaling)
        kind = _check_scaling("rope_scaling", s)
        if self.local_rope_theta is not None:
            if self.positional != "rotary":
                raise ValueError("local_rope_theta (rotary settings of sliding-window layers) needs positional='rotary'")
            if not self.local_rope_theta > 0:
                raise ValueError(f"local_rope_theta must be positive, got {self.local_rope_theta!r}")
            if _check_scaling("local_rope_scaling", dict(self.local_rope_scaling)) == "longrope":
                raise ValueError("local_rope_scaling cannot be longrope (longrope is implemented for rope_scaling only)")
        elif self.local_rope_scaling:
            raise ValueError("local_rope_scaling is read only with local_rope_theta; set both (or neither)")
        if kind == "longrope":
            for k in ("short_factor", "long_factor"):
                if len(s[k]) != self.rotary_dim // 2:
                    raise ValueError(f"longrope {k} needs rotary_dim // 2 = {self.rotary_dim // 2} entries, got {len(s[k])}")
        if self.windows and len(self.windows) != self.n_layers:
            raise ValueError(f"windows lists {len(self.windows)} entries; it needs one per layer (n_layers={self.n_layers}) or none")
        if any(not isinstance(w, (int, np.integer)) or w < 0 for w in self.windows):
            raise ValueError(f"windows must be non-negative integers (0 = full causal attention), got {self.windows}")

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


def _rope(cfg: Config, local: bool) -> tuple[float, dict]:
    """(theta, scaling settings) of the global layers, or of the sliding-window ones when local."""
    if local and cfg.local_rope_theta is not None:
        return float(cfg.local_rope_theta), dict(cfg.local_rope_scaling)
    return float(cfg.rope_theta), dict(cfg.rope_scaling)


def rope_inv_freq(cfg: Config, long: bool = False, local: bool = False) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] as HF computes them (for longrope, the short set unless
    long; rope_attention_factor gives longrope's cos/sin multiplier). local: those of the sliding-window
    layers (cfg.local_rope_theta / local_rope_scaling; the global ones when local_rope_theta is None)."""
    dim = cfg.rotary_dim
    theta, s = _rope(cfg, local)
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    kind = s.get("rope_type", "default")
    if kind == "longrope":
        ext = np.asarray(s["long_factor" if long else "short_factor"], np.float32)
        return (1.0 / (ext * np.float32(theta) ** shape)).astype(np.float32)
    inv = 1.0 / (theta ** shape)
    inv = inv.astype(np.float32)
    if kind == "linear":
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
    return inv


def rope_attention_factor(cfg: Config, local: bool = False) -> float:
    """The multiplier on cos and sin (longrope's attention_factor; 1 otherwise)."""
    return float(_rope(cfg, local)[1].get("attention_factor", 1.0))
