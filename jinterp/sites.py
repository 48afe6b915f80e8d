"""Named activation sites, with TransformerLens names and layouts.

`BLOCK_SITES` and `GLOBAL_SITES` are the vocabulary: every name and its layout. Which of them a
model has is the decoder's to say (`arch.emitted_sites`, found by tracing it); global sites sit
before the first block and after the last. A site's *layout* names its
axes, which is how edits find the position, head and key axes of the activation.

    blocks.{l}.hook_resid_pre          [batch, pos, d_model]
    blocks.{l}.attn.hook_z             [batch, pos, head, d_head]
    blocks.{l}.attn.hook_pattern       [batch, head, query, key]

`ln*.hook_normalized` is TransformerLens's: the norm's output before its weight and bias ((x - mean) /
scale, or x / rms). What a sublayer reads, after them, is `attn.hook_in` / `mlp.hook_in`.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable

from jinterp.arch import emitted_sites
from jinterp.config import Config

# layouts: axis names. "pos" is the query/sequence axis, "key" the key axis of attention maps.
_RESID = ("batch", "pos", "d_model")
_SCALE = ("batch", "pos", "one")
_HEADS = ("batch", "pos", "head", "d_head")
_KV = ("batch", "pos", "kv_head", "d_head")
_MAP = ("batch", "head", "pos", "key")
_MLP = ("batch", "pos", "d_mlp")
_EXPERTS = ("batch", "pos", "expert")

BLOCK_SITES: dict[str, tuple[str, ...]] = {
    "hook_resid_pre": _RESID,
    "ln1.hook_scale": _SCALE,
    "ln1.hook_normalized": _RESID,  # as in TransformerLens: before ln1's weight and bias
    "attn.hook_in": _RESID,  # what attention reads: ln1's output after w, b (the residual without pre-norms)
    "attn.hook_q": _HEADS,
    "attn.hook_k": _KV,
    "attn.hook_v": _KV,
    "attn.hook_rot_q": _HEADS,
    "attn.hook_rot_k": _KV,
    "attn.hook_attn_scores": _MAP,
    "attn.hook_pattern": _MAP,
    "attn.hook_z": _HEADS,
    "attn.hook_result": ("batch", "pos", "head", "d_model"),
    "ln1_post.hook_scale": _SCALE,
    "hook_attn_out": _RESID,
    "hook_resid_mid": _RESID,
    "ln2.hook_scale": _SCALE,
    "ln2.hook_normalized": _RESID,  # before ln2's weight and bias
    "mlp.hook_in": _RESID,  # what the MLP reads: ln2's output after w, b (ln1's under shared_norm)
    "mlp.hook_pre": _MLP,
    "mlp.hook_pre_linear": _MLP,
    "mlp.hook_post": _MLP,
    # mixture of experts (cfg.mlp == "moe"): router logits, the routing weights after top-k as a dense array
    # (zero for experts not chosen), each expert's output before weighting (computed only when asked for),
    # the sigmoid gate of the shared expert and its gated output. hook_mlp_out = sum_e weights[e] *
    # expert_out[e] + shared_out.
    "mlp.hook_router_logits": _EXPERTS,
    "mlp.hook_expert_weights": _EXPERTS,
    "mlp.hook_expert_out": ("batch", "pos", "expert", "d_model"),
    "mlp.hook_shared_gate": _SCALE,
    "mlp.hook_shared_out": _RESID,
    "ln2_post.hook_scale": _SCALE,
    "hook_mlp_out": _RESID,
    "hook_resid_post": _RESID,
}

GLOBAL_SITES: dict[str, tuple[str, ...]] = {
    "hook_embed": _RESID,
    "hook_pos_embed": _RESID,
    "ln_final.hook_scale": _SCALE,
    "ln_final.hook_normalized": _RESID,  # before ln_final's weight and bias
}


# Short names, as TransformerLens's get_act_name accepts them.
ALIASES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "pattern": "attn.hook_pattern",
    "attn_scores": "attn.hook_attn_scores",
    "scores": "attn.hook_attn_scores",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
    "router_logits": "mlp.hook_router_logits",
    "expert_weights": "mlp.hook_expert_weights",
    "expert_out": "mlp.hook_expert_out",
    "shared_gate": "mlp.hook_shared_gate",
    "shared_out": "mlp.hook_shared_out",
    "scale1": "ln1.hook_scale",
    "scale2": "ln2.hook_scale",
    "normalized1": "ln1.hook_normalized",
    "normalized2": "ln2.hook_normalized",
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
}


class SiteError(KeyError):
    """An unknown or unavailable site name; the message suggests the closest valid names."""

    def __str__(self):  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def block_sites(cfg: Config) -> list[str]:
    """Block-local sites that exist for this config, in firing order (the decoder's own account)."""
    return list(emitted_sites(cfg)[0])


def global_sites(cfg: Config) -> list[str]:
    """Sites before the first block and after the last that exist for this config."""
    return list(emitted_sites(cfg)[1])


def all_names(cfg: Config) -> list[str]:
    """Every full site name of the model, in firing order."""
    g = global_sites(cfg)
    pre = [n for n in g if not n.startswith("ln_final")]
    post = [n for n in g if n.startswith("ln_final")]
    blocks = [f"blocks.{l}.{s}" for l in range(cfg.n_layers) for s in block_sites(cfg)]
    return pre + blocks + post


def layout(local: str) -> tuple[str, ...]:
    return BLOCK_SITES.get(local) or GLOBAL_SITES[local]


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean ...?' naming the closest valid names, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


_FULL = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_name(name: str) -> tuple[int, str] | None:
    """'blocks.3.attn.hook_z' -> (3, 'attn.hook_z'); None for a name without a layer."""
    m = _FULL.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def parse(cfg: Config, name: str) -> tuple[int | None, str]:
    """Full site name -> (layer or None for global sites, local site name). Raises SiteError."""
    if not isinstance(name, str):
        raise SiteError(f"site names are strings like 'blocks.0.hook_resid_pre', got {name!r}")
    split = split_name(name)
    if split:
        layer, local = split
        local = ALIASES.get(local, local)
        if not 0 <= layer < cfg.n_layers:
            raise SiteError(
                f"layer {layer} in {name!r} is out of range: this model has {cfg.n_layers} layers (0..{cfg.n_layers - 1})"
            )
        if local not in block_sites(cfg):
            raise SiteError(
                f"unknown site {name!r} for this {cfg.family} model."
                + suggest(name, all_names(cfg))
                + " List them with model.site_names()."
            )
        return layer, local
    local = ALIASES.get(name, name)
    if local in global_sites(cfg):
        return None, local
    if local in block_sites(cfg):
        raise SiteError(f"{name!r} is a per-layer site: name a layer, e.g. 'blocks.0.{local}'")
    raise SiteError(
        f"unknown site {name!r} for this {cfg.family} model."
        + suggest(name, all_names(cfg) + block_sites(cfg) + list(ALIASES))
        + " List them with model.site_names()."
    )


def resolve_local(cfg: Config, site: str) -> str:
    """A block-local site name from a local name or alias ('resid_pre', 'attn.hook_z', 'z')."""
    local = ALIASES.get(site, site)
    if local in block_sites(cfg) or local in global_sites(cfg):
        return local
    split = split_name(site)
    if split:
        raise SiteError(f"pass the local site name (e.g. {split[1]!r}) and the layers separately, not {site!r}")
    raise SiteError(
        f"unknown site {site!r} for this {cfg.family} model."
        + suggest(site, block_sites(cfg) + global_sites(cfg) + list(ALIASES))
    )


def select(cfg: Config, names) -> dict[str, tuple[int, ...] | None]:
    """Which sites to record: None (all), a list of full names, or a predicate on full names.

    Returns {local name: layers tuple} for block sites and {global name: None} for global ones.
    """
    if names is None:
        chosen = all_names(cfg)
    elif callable(names):
        chosen = [n for n in all_names(cfg) if names(n)]
    elif isinstance(names, str):
        chosen = [names]
    else:
        chosen = list(names)
    out: dict[str, set | None] = {}
    for n in chosen:
        layer, local = parse(cfg, n)
        if layer is None:
            out[local] = None
        else:
            out.setdefault(local, set()).add(layer)
    return {k: (None if v is None else tuple(sorted(v))) for k, v in out.items()}


def full_name(layer: int | None, local: str) -> str:
    return local if layer is None else f"blocks.{layer}.{local}"

