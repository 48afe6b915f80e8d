"""Hook names that dictionary files use, mapped to jinterp's site names.

jinterp's sites carry TransformerLens names, so `blocks.{l}.hook_resid_post`, `blocks.{l}.attn.hook_z`,
`blocks.{l}.ln2.hook_normalized` (before ln2's weight and bias, as in TransformerLens), `blocks.{l}.mlp.hook_in`
(the MLP's input, after them: circuit-tracer's name), `blocks.{l}.mlp.hook_post`, ... map to themselves (short
aliases such as `resid_post` too). Names other libraries use:

    blocks.{l}.hook_mlp_in                      -> blocks.{l}.hook_resid_mid        (TransformerLens: the residual entering
                                                   ln2; a parallel-block model has no resid_mid and rejects it)
    blocks.{l}.mlp.hook_out                     -> blocks.{l}.hook_mlp_out          (MLP output)
    model.layers.{l} | .output                  -> blocks.{l}.hook_resid_post       (HF decoder layer output)
    model.layers.{l}.input                      -> blocks.{l}.hook_resid_pre
    model.layers.{l}.mlp[.output]               -> blocks.{l}.hook_mlp_out
    model.layers.{l}.mlp.input                  -> blocks.{l}.mlp.hook_in
    model.layers.{l}.pre_feedforward_layernorm.output  -> blocks.{l}.mlp.hook_in   (Gemma Scope 2)
    model.layers.{l}.post_feedforward_layernorm.output -> blocks.{l}.hook_mlp_out          (Gemma Scope 2)
    model.layers.{l}.self_attn[.output]         -> blocks.{l}.hook_attn_out
    model.layers.{l}.self_attn.o_proj.input     -> blocks.{l}.attn.hook_z
    layers.{l} (EleutherAI sparsify)            -> blocks.{l}.hook_resid_post
    model.embed_tokens | embed_tokens           -> hook_embed

A bare local name (`hook_resid_mid`, `mlp.hook_out`: circuit-tracer's config.yaml) needs the layer
passed separately. Anything else raises `jinterp.sites.SiteError` listing these forms.
"""

from __future__ import annotations

import re

from jinterp.sites import ALIASES, BLOCK_SITES, GLOBAL_SITES, SiteError, suggest

# local names other libraries use -> ours
EXTRA_LOCAL = {
    "mlp.hook_out": "hook_mlp_out",
    "hook_mlp_in": "hook_resid_mid",  # TransformerLens: resid_mid entering ln2 (sequential blocks)
}

_HF_LOCAL = {
    "": "hook_resid_post",
    "output": "hook_resid_post",
    "input": "hook_resid_pre",
    "mlp": "hook_mlp_out",
    "mlp.output": "hook_mlp_out",
    "mlp.input": "mlp.hook_in",
    "pre_feedforward_layernorm.output": "mlp.hook_in",
    "post_feedforward_layernorm.output": "hook_mlp_out",
    "self_attn": "hook_attn_out",
    "self_attn.output": "hook_attn_out",
    "self_attn.o_proj.input": "attn.hook_z",
}
_HF = re.compile(r"^(?:model\.(?:language_model\.)?)?layers\.(\d+)(?:\.(.+))?$")
_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")
_EMBED = ("model.embed_tokens", "embed_tokens", "model.language_model.embed_tokens")

FORMS = (
    "blocks.{l}.<TransformerLens hook> (e.g. blocks.3.hook_resid_post, blocks.3.attn.hook_z, blocks.3.ln2.hook_normalized, "
    "blocks.3.mlp.hook_in, blocks.3.mlp.hook_out), hook_embed, ln_final.hook_normalized, "
    "model.layers.{l}[.input|.output|.mlp|.mlp.input|.self_attn|.pre_feedforward_layernorm.output|"
    ".post_feedforward_layernorm.output|.self_attn.o_proj.input], layers.{l}, embed_tokens; "
    "or a bare local name with layer= given"
)


def _local(name: str) -> str | None:
    local = ALIASES.get(name, name)
    local = EXTRA_LOCAL.get(local, local)
    return local if (local in BLOCK_SITES or local in GLOBAL_SITES) else None


def _known_names() -> list[str]:
    return ([f"blocks.{{l}}.{s}" for s in BLOCK_SITES] + [f"blocks.{{l}}.{s}" for s in EXTRA_LOCAL]
            + list(GLOBAL_SITES) + [f"model.layers.{{l}}.{s}" if s else "model.layers.{l}" for s in _HF_LOCAL])


def to_site(hook_name: str, layer: int | None = None) -> tuple[int | None, str]:
    """(layer or None for a global site, our local site name) for a hook name from a dictionary file.

    >>> to_site("blocks.3.hook_resid_pre")
    (3, 'hook_resid_pre')
    >>> to_site("model.layers.5.mlp")
    (5, 'hook_mlp_out')
    >>> to_site("hook_resid_mid", layer=2)
    (2, 'hook_resid_mid')
    """
    if not isinstance(hook_name, str) or not hook_name:
        raise SiteError(f"a dictionary's hook name must be a non-empty string, got {hook_name!r}")
    name = hook_name.strip()
    m = _TL.match(name)
    if m:
        local = _local(m.group(2))
        if local is not None and local in BLOCK_SITES:
            return int(m.group(1)), local
    m = _HF.match(name)
    if m:
        local = _HF_LOCAL.get(m.group(2) or "")
        if local is not None:
            return int(m.group(1)), local
    if name in _EMBED:
        return None, "hook_embed"
    local = _local(name)
    if local is not None:
        if local in GLOBAL_SITES:
            return None, local
        if layer is None:
            raise SiteError(f"hook name {hook_name!r} has no layer in it: pass layer= (e.g. load(path, layer=3))")
        return int(layer), local
    generic = re.sub(r"\.\d+\.", ".{l}.", re.sub(r"\.\d+$", ".{l}", name))
    raise SiteError(
        f"unknown hook name {hook_name!r}: it maps to no jinterp site.{suggest(generic, _known_names())} "
        f"Known forms: {FORMS}. The sites themselves: {', '.join(BLOCK_SITES)}; global: {', '.join(GLOBAL_SITES)}."
    )


def site_width(cfg, local: str) -> int:
    """The width a dictionary on `local` must have for this model config (hook_z: n_heads * d_head)."""
    from jinterp.sites import layout

    lay = layout(local)
    if lay[-2:] == ("head", "d_head"):
        return cfg.n_heads * cfg.d_head
    if lay[-2:] == ("kv_head", "d_head"):
        return cfg.n_kv_heads * cfg.d_head
    if lay[-1] == "head" or lay[-1] == "key" or lay[-1] == "one":
        raise SiteError(f"site {local!r} ({', '.join(lay)}) is not a feature site: a dictionary cannot read it")
    return {"d_model": cfg.d_model, "d_mlp": cfg.d_mlp}[lay[-1]]
