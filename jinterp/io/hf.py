"""HF `config.json`: reading it, the one supported-architecture check, and the parsing helpers the
family files share (attributes under several names, rotary settings, per-layer sliding windows)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Collection

from jinterp.config import ROPE_TYPES
from jinterp.io.safetensors import CheckpointError


class UnsupportedArchitecture(ValueError):
    """A model type, or an option of a supported one, that jinterp does not implement."""


def read_config(directory, supported: Collection[str]):
    """The transformers config of the HF model in `directory`, once its model_type is in `supported`.

    The check reads config.json itself first, so an unsupported model type is named (with the
    supported ones) even where this transformers version cannot parse it.
    """
    cfg_file = Path(directory) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{directory} has no config.json; is it an HF-format model directory?")
    try:
        raw = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    model_type = raw.get("model_type")
    if model_type not in supported:
        arch = (raw.get("architectures") or [model_type])[0]
        raise UnsupportedArchitecture(
            f"unsupported architecture {arch!r} (model_type {model_type!r}) in {cfg_file}. "
            f"jinterp supports model types: {', '.join(sorted(supported))}."
        )
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UnsupportedArchitecture(
            f"{cfg_file} describes a quantized checkpoint (quantization_config, quant_method {method!r}); jinterp "
            "does not dequantize. Load the unquantized (float) weights of this model."
        )
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(directory))
    check_options(hf)
    return hf


# every layer type the decoder implements (jinterp.arch: full causal attention, or a sliding window)
LAYER_TYPES = ("full_attention", "sliding_attention")


def check_options(hf) -> None:
    """Refuse HF config options that change what a supported model computes and that jinterp does
    not implement, naming the option (rather than load and quietly compute something else).

    Options a family implements or refuses itself are checked in its file (e.g. GPT-2's
    scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn, GPT-J without rotary_dim); rotary
    scaling types in `rope_settings`; dropout and training-only fields do not change inference."""
    text = getattr(hf, "text_config", None)
    if text is not None and text is not hf:
        check_options(text)  # a multimodal wrapper (Gemma 3): the text model it holds
    mt = getattr(hf, "model_type", "?")
    if getattr(hf, "use_bidirectional_attention", None):
        raise UnsupportedArchitecture(
            f"{mt} with use_bidirectional_attention=True (non-causal attention) is not supported: jinterp's "
            "decoder is causal. Set it to false (or remove it) in config.json for the causal model."
        )
    types = getattr(hf, "layer_types", None) or ()
    unknown = sorted({str(t) for t in types} - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedArchitecture(
            f"{mt} layer_types {unknown} are not supported (jinterp implements {', '.join(LAYER_TYPES)})"
        )


def hf_attr(hf, *names, default=None):
    """First attribute of the HF config that is present and not None."""
    for n in names:
        v = getattr(hf, n, None)
        if v is not None:
            return v
    return default


def rope_settings(hf, head_dim: int) -> dict:
    """Rotary settings from an HF config, wherever this transformers version keeps them.

    transformers 5 keeps them in `rope_parameters`; older configs use rope_theta / rope_scaling /
    rotary_pct / rotary_emb_base. rope_parameters keyed by layer type (Gemma 3: full_attention and
    sliding_attention) give rope_theta / rope_scaling from the full-attention layers and, where the
    sliding-window layers' differ, local_rope_theta / local_rope_scaling.
    """
    rp = dict(getattr(hf, "rope_parameters", None) or {})
    by_type = bool(rp) and all(isinstance(v, dict) for v in rp.values())
    if not by_type:
        theta, partial, scaling = _rope_one(hf, rp, legacy=dict(getattr(hf, "rope_scaling", None) or {}))
        return dict(positional="rotary", rope_theta=theta, rope_scaling=scaling, **_rotary_dims(head_dim, partial, scaling))
    unknown = sorted(set(rp) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedArchitecture(
            f"rotary settings for layer types {unknown} are not supported (jinterp implements {', '.join(LAYER_TYPES)})")
    theta, partial, scaling = _rope_one(hf, rp.get("full_attention") or rp["sliding_attention"], what="full_attention")
    out = dict(positional="rotary", rope_theta=theta, rope_scaling=scaling, **_rotary_dims(head_dim, partial, scaling))
    if "sliding_attention" in rp and "full_attention" in rp:
        l_theta, l_partial, l_scaling = _rope_one(hf, rp["sliding_attention"], what="sliding_attention")
        if l_partial != partial:
            raise UnsupportedArchitecture(
                f"different partial_rotary_factor on sliding_attention ({l_partial}) and full_attention ({partial}) "
                "layers is not supported")
        l_kind = dict(l_scaling).get("rope_type")
        if l_kind in ("longrope", "dynamic", "proportional"):
            raise UnsupportedArchitecture(f"rotary scaling {l_kind!r} on sliding_attention layers is not supported "
                                          "(it is on full_attention layers)")
        if (l_theta, l_scaling) != (theta, scaling):
            out.update(local_rope_theta=l_theta, local_rope_scaling=l_scaling)
    return out


def _rotary_dims(head_dim: int, partial: float, scaling) -> dict:
    """rotary_dim (and rotary_base_dim) as transformers computes them: n = int(head_dim * partial) gives
    ceil(n / 2) frequencies with exponents over n, and 2 * ceil(n / 2) rotated dims (an odd n rotates n + 1).
    Proportional rotary rotates the whole head (its partial factor zeroes frequencies instead)."""
    if dict(scaling).get("rope_type") == "proportional":
        return dict(rotary_dim=head_dim)
    n = int(head_dim * partial)
    if n < 1 or 2 * ((n + 1) // 2) > head_dim:
        raise UnsupportedArchitecture(
            f"partial_rotary_factor (rotary_pct) {partial} with head_dim {head_dim} gives {n} rotary dims, which "
            f"transformers rotates as {2 * ((n + 1) // 2)} dims: not within 2..{head_dim}. Use a factor giving 2..{head_dim} dims.")
    return dict(rotary_dim=2 * ((n + 1) // 2), rotary_base_dim=n if n % 2 else 0)


def _rope_one(hf, rp: dict, legacy=None, what=None):
    """(rope_theta, partial_rotary_factor, rope_scaling pairs) of one set of rotary parameters; rotary
    scaling types jinterp does not implement raise UnsupportedArchitecture naming them."""
    theta = rp.get("rope_theta", hf_attr(hf, "rope_theta", "rotary_emb_base", default=10000.0))
    partial = rp.get("partial_rotary_factor", hf_attr(hf, "partial_rotary_factor", "rotary_pct", default=1.0))
    scaling = {**(legacy or {}), **{k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    keep = {"rope_type": kind}
    if kind == "linear":
        keep["factor"] = float(scaling["factor"])
    elif kind == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            keep[k] = float(scaling[k])
        keep["original_max_position_embeddings"] = int(
            scaling.get("original_max_position_embeddings") or hf.max_position_embeddings
        )
    elif kind == "longrope":
        # as transformers' _compute_longrope_parameters: factor defaults to max / original positions, and
        # attention_factor to sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1)
        orig = int(scaling.get("original_max_position_embeddings") or hf_attr(hf, "original_max_position_embeddings"))
        factor = scaling.get("factor") or hf.max_position_embeddings / orig
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        keep.update(
            short_factor=tuple(float(f) for f in scaling["short_factor"]),
            long_factor=tuple(float(f) for f in scaling["long_factor"]),
            original_max_position_embeddings=orig,
            attention_factor=float(attn),
        )
    elif kind == "dynamic":
        # transformers' _compute_dynamic_ntk_parameters scales from config.max_position_embeddings (not from an
        # original_max_position_embeddings, which it ignores): kept under that name here
        keep.update(factor=float(scaling["factor"]), original_max_position_embeddings=int(hf.max_position_embeddings))
    elif kind == "yarn":
        keep.update(_yarn(hf, scaling))
    elif kind == "proportional":
        keep.update(factor=float(scaling.get("factor", 1.0)), partial_rotary_factor=float(partial))
    elif kind not in ROPE_TYPES:
        where = f" on {what} layers" if what else ""
        raise UnsupportedArchitecture(f"rotary scaling {kind!r}{where} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return float(theta), float(partial), tuple(sorted(keep.items()))


def _yarn(hf, scaling: dict) -> dict:
    """YaRN settings with transformers' defaults (_compute_yarn_parameters): factor from max / original
    positions when unset, attention_factor from factor, mscale and mscale_all_dim, beta_fast 32 and beta_slow 1
    when unset or 0, truncate read from the top level of rope_parameters (so True under parameters by layer type)."""
    orig = int(scaling.get("original_max_position_embeddings") or hf_attr(hf, "original_max_position_embeddings", "max_position_embeddings"))
    factor = scaling.get("factor")
    factor = hf.max_position_embeddings / orig if factor is None else factor
    mscale = lambda m=1: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    attn = scaling.get("attention_factor")
    if attn is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(m) / mscale(m_all) if m and m_all else mscale()
    top = getattr(hf, "rope_parameters", None) or {}
    return dict(factor=float(factor), attention_factor=float(attn), beta_fast=float(scaling.get("beta_fast") or 32),
                beta_slow=float(scaling.get("beta_slow") or 1), truncate=bool(top.get("truncate", True)),
                original_max_position_embeddings=orig)


def layer_windows(hf, n_layers: int, all_layers: bool = False) -> tuple:
    """Per-layer sliding windows from `layer_types` (or every layer when all_layers and sliding_window is set)."""
    w = getattr(hf, "sliding_window", None)
    if not w:
        return ()
    types = getattr(hf, "layer_types", None)
    if types:
        out = tuple(int(w) if t == "sliding_attention" else 0 for t in types)
    elif all_layers:
        out = (int(w),) * n_layers
    else:
        return ()
    return out if any(out) else ()
