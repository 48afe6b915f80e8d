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
# "moe": a mixture of n_experts gated experts (no biases), top_k of them per token by a router's softmax,
# optionally plus a shared gated expert of width d_shared (see jinterp/arch/moe.py).
MLPS = ("dense", "gated", "moe")
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
    # NTK-aware dynamic scaling: a sequence of n > original_max_position_embeddings positions (HF reads
    # config.max_position_embeddings) rotates with base theta * (factor * n / orig - (factor - 1)) ** (d / (d - 2)),
    # n decided per call and row like longrope's choice (see decoder.rotate); shorter ones rotate as default
    "dynamic": ("factor", "original_max_position_embeddings"),
    # YaRN: frequencies blended between interpolated (/ factor) and extrapolated by a linear ramp over the
    # correction range of beta_fast / beta_slow rotations (floor / ceil when truncate); attention_factor (as
    # transformers derives it from factor, mscale, mscale_all_dim) multiplies cos and sin
    "yarn": ("factor", "beta_fast", "beta_slow", "truncate", "original_max_position_embeddings", "attention_factor"),
    # Gemma 4's partial rotary: the first int(partial_rotary_factor * d // 2) frequencies of a d-dim head with
    # exponents over d, the rest zero (those dims pass unrotated), all / factor; rotary_dim must be d_head
    "proportional": ("factor", "partial_rotary_factor"),
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


def _check_moe(c) -> None:
    """The mixture-of-experts fields: set (and consistent) exactly when mlp == "moe"."""
    moe = (c.n_experts, c.top_k, c.norm_topk_prob, c.d_shared, c.shared_gate)
    if c.mlp != "moe":
        if any(moe):
            raise ValueError(f"n_experts / top_k / norm_topk_prob / d_shared / shared_gate are mixture-of-experts "
                             f"fields; set mlp='moe' to use them (mlp is {c.mlp!r})")
        return
    for f in ("n_experts", "top_k", "d_shared"):
        v = getattr(c, f)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if f == "d_shared" else 1):
            raise ValueError(f"{f} must be a {'non-negative' if f == 'd_shared' else 'positive'} integer for mlp='moe', got {v!r}")
    if c.top_k > c.n_experts:
        raise ValueError(f"top_k={c.top_k} experts per token is more than n_experts={c.n_experts}")
    if c.shared_gate and not c.d_shared:
        raise ValueError("shared_gate (a sigmoid gate on the shared expert) needs a shared expert: set d_shared > 0")


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
    # the dims the frequency exponents divide by (0: rotary_dim). transformers computes ceil(n / 2) frequencies
    # base ** (-2i / n) for n = int(d_head * partial_rotary_factor) and rotates 2 * ceil(n / 2) dims, so an odd
    # n (GPT-NeoX rotary_pct) gives rotary_dim = n + 1 and rotary_base_dim = n
    rotary_base_dim: int = 0
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
    # mixture of experts (mlp="moe"): d_mlp is each expert's width. Routing as transformers: softmax of the
    # router logits in float32, the top_k largest probabilities (ties: lowest expert index), divided by their
    # sum when norm_topk_prob (Mixtral always). d_shared > 0: a shared gated expert every token passes
    # through, its output times sigmoid(x . w) when shared_gate (Qwen2-MoE).
    n_experts: int = 0
    top_k: int = 0
    norm_topk_prob: bool = False
    d_shared: int = 0
    shared_gate: bool = False
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
    # layer l's scores are further divided by l + 1 (GPT-2's scale_attn_by_inverse_layer_idx)
    attn_scale_inverse_layer: bool = False
    # q.k, masking and softmax in float32 whatever the parameter dtype (GPT-2's reorder_and_upcast_attn under
    # eager attention); the pattern is cast back to the values' dtype. Changes nothing in float32.
    attn_upcast: bool = False
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
        _check_moe(self)
        _check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        _check_choice("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        if self.shared_norm and not (self.parallel_residual and self.pre_norms):
            raise ValueError("shared_norm (the MLP reads ln1's output) needs parallel_residual=True and pre_norms=True")
        if self.positional == "rotary" and not (0 < self.rotary_dim <= self.d_head and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and in 2..d_head ({self.d_head}) for rotary positions, got {self.rotary_dim}")
        if self.rotary_base_dim and self.rotary_dim != 2 * ((self.rotary_base_dim + 1) // 2):
            raise ValueError(f"rotary_base_dim {self.rotary_base_dim} gives {(self.rotary_base_dim + 1) // 2} frequencies, "
                             f"so rotary_dim must be {2 * ((self.rotary_base_dim + 1) // 2)}, got {self.rotary_dim}")
        s = dict(self.rope_scaling)
        kind = _check_scaling("rope_scaling", s)
        if kind == "proportional" and self.rotary_dim != self.d_head:
            raise ValueError(f"proportional rotary rotates the whole head: rotary_dim must be d_head ({self.d_head}), "
                             f"got {self.rotary_dim}")
        if kind in ("yarn", "proportional") and self.rotary_base_dim:
            raise ValueError(f"{kind} rotary scaling needs an even number of rotary dims (rotary_base_dim 0), got {self.rotary_base_dim}")
        if kind == "dynamic" and self.rotary_dim <= 2:
            raise ValueError(f"dynamic rotary scaling needs rotary_dim > 2 (its exponent divides by rotary_dim - 2), got {self.rotary_dim}")
        if self.local_rope_theta is not None:
            if self.positional != "rotary":
                raise ValueError("local_rope_theta (rotary settings of sliding-window layers) needs positional='rotary'")
            if not self.local_rope_theta > 0:
                raise ValueError(f"local_rope_theta must be positive, got {self.local_rope_theta!r}")
            if _check_scaling("local_rope_scaling", dict(self.local_rope_scaling)) in ("longrope", "dynamic"):
                raise ValueError("local_rope_scaling cannot be longrope or dynamic (implemented for rope_scaling only)")
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

    @property
    def max_len(self) -> int:
        """The longest sequence (prompt plus generated tokens) a model accepts: n_ctx, or under dynamic rotary
        scaling n_ctx * factor, the context its factor is meant to reach (transformers sets no limit there)."""
        s = dict(self.rope_scaling)
        return int(self.n_ctx * s["factor"]) if s.get("rope_type") == "dynamic" else self.n_ctx

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


def _rope(cfg: Config, local: bool) -> tuple[float, dict]:
    """(theta, scaling settings) of the global layers, or of the sliding-window ones when local."""
    if local and cfg.local_rope_theta is not None:
        return float(cfg.local_rope_theta), dict(cfg.local_rope_scaling)
    return float(cfg.rope_theta), dict(cfg.rope_scaling)


def rope_inv_freq(cfg: Config, long: bool = False, local: bool = False) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] as HF computes them, in float32 as HF does (for longrope, the
    short set unless long; for dynamic, the set of sequences within original_max_position_embeddings, the
    longer ones' sets are computed per call in decoder.rotate; rope_attention_factor gives the cos/sin
    multiplier). local: those of the sliding-window layers (cfg.local_rope_theta / local_rope_scaling; the
    global ones when local_rope_theta is None)."""
    dim = cfg.rotary_base_dim or cfg.rotary_dim
    theta, s = _rope(cfg, local)
    kind = s.get("rope_type", "default")
    f32 = np.float32
    if kind == "proportional":  # transformers' _compute_proportional_rope_parameters
        n = int(s["partial_rotary_factor"] * dim // 2)
        rot = 1.0 / (theta ** (np.arange(0, 2 * n, 2, dtype=np.int64).astype(f32) / f32(dim)))
        return (np.concatenate([rot.astype(f32), np.zeros(dim // 2 - n, f32)]) / f32(s["factor"])).astype(f32)
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    if kind == "longrope":
        ext = np.asarray(s["long_factor" if long else "short_factor"], f32)
        return (1.0 / (ext * f32(theta) ** shape)).astype(f32)
    if kind == "yarn":
        return _yarn_inv_freq(theta, dim, s)
    if kind == "dynamic":  # transformers' init value (seq_len = max_position_embeddings), in Python floats
        factor, orig = s["factor"], s["original_max_position_embeddings"]
        theta = theta * ((factor * orig / orig) - (factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (theta ** shape)
    inv = inv.astype(f32)
    if kind == "linear":
        inv = inv / f32(s["factor"])
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        inv = np.where(medium, smoothed, out).astype(f32)
    return inv


def _yarn_inv_freq(theta: float, dim: int, s: dict) -> np.ndarray:
    """transformers' _compute_yarn_parameters: float32 arrays, Python floats for the correction range."""
    f32 = np.float32
    orig, factor = s["original_max_position_embeddings"], s["factor"]

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    pos_freqs = (theta ** (np.arange(0, dim, 2).astype(f32) / f32(dim))).astype(f32)
    extrapolation, interpolation = (1.0 / pos_freqs).astype(f32), (1.0 / (f32(factor) * pos_freqs)).astype(f32)
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    keep = (1 - ramp).astype(f32)  # extrapolation share
    return (interpolation * (1 - keep) + extrapolation * keep).astype(f32)


def rope_attention_factor(cfg: Config, local: bool = False) -> float:
    """The multiplier on cos and sin (longrope's attention_factor; 1 otherwise)."""
    return float(_rope(cfg, local)[1].get("attention_factor", 1.0))
