"""Sparse dictionaries: SAEs and transcoders from SAELens, Gemma Scope and circuit-tracer, as pytrees.

    sae = jinterp.saes.load("path/to/saelens_dir")        # or a hub id when online
    f = sae.encode(acts)                                   # [..., d_sae]
    recon = sae(acts)                                      # decode(encode(x)) [+ skip]
    jinterp.saes.check(sae, model)                         # its site exists and has width d_in
    model(tokens, edits=[jinterp.edits.splice(sae, ablate=[12])])   # spliced in, error term kept

`Dictionary` / `CrossLayerTranscoder` are `flax.struct` dataclasses: arrays are leaves, so encode,
decode and call compose with jit, vmap and grad. `to_site` maps the hook names files use (TransformerLens,
HF module paths, circuit-tracer's bare names) to jinterp's site names.
"""

from __future__ import annotations

from jinterp.saes.dictionary import CrossLayerTranscoder, Dictionary
from jinterp.saes.formats import FORMATS, DictionaryError, detect, load
from jinterp.saes.hooks import site_width, to_site
from jinterp.saes.splicing import (Splice, TranscoderSplice, ablation_sweep, acts_name, feature_attribution,
                                   run_with_features, splice, splice_transcoder)
from jinterp.saes import influence, shipped, train  # influence.prune / graph_scores; train.fit, train.save_saelens
# shipped: the organisms' trained dictionaries (shipped.load("ioi-4l"), shipped.train(spec, out))
from jinterp.saes.graph import Graph, attribute
from jinterp.saes.graph_export import to_json, to_png
from jinterp.saes.graph_html import feature_top_activations, to_html
from jinterp.saes.intervene import intervene

__all__ = ["CrossLayerTranscoder", "Dictionary", "DictionaryError", "FORMATS", "Graph", "Splice", "TranscoderSplice",
           "ablation_sweep", "acts_name", "attribute", "check", "detect", "feature_attribution", "feature_top_activations",
           "influence", "intervene", "load", "run_with_features", "site_width", "splice", "splice_transcoder", "to_html",
           "to_json", "to_png", "to_site", "train", "shipped"]


def check(dictionary, model) -> None:
    """Raise DictionaryError unless `dictionary` fits `model`: its site (and, for a transcoder, its
    output site) exists at its layer(s), and d_in (d_out) equals that site's width."""
    from jinterp import sites

    cfg = getattr(model, "config", model)
    d = dictionary
    if d.site is None:
        raise DictionaryError(f"{d!r} does not say which site it reads; load it with hook_name=... (e.g. 'blocks.3.hook_resid_post')")
    if isinstance(d, CrossLayerTranscoder):
        layers = list(range(d.n_layers))
        if d.n_layers != cfg.n_layers:
            raise DictionaryError(f"this cross-layer transcoder has {d.n_layers} layers but the model has {cfg.n_layers}")
    elif d.stacked:
        layers = list(d.layers)
    else:
        layers = [d.layer]
    is_global = d.site in sites.GLOBAL_SITES
    for layer in layers:
        for local, width, what in ((d.site, d.d_in, "d_in"), (d.out_site or d.site, d.d_out, "d_out")):
            if layer is None and local not in sites.GLOBAL_SITES:
                raise DictionaryError(
                    f"{d!r} reads the per-layer site {local!r} but no layer is known; load it with layer=..."
                )
            name = local if (layer is None or is_global and local == d.site) else f"blocks.{layer}.{local}"
            if local == "hook_resid_mid" and "hook_mlp_in" in (d.hook_name or "") and cfg.parallel_residual:
                raise DictionaryError(f"{d!r} reads TransformerLens's hook_mlp_in, which is hook_resid_mid in sequential "
                                      "blocks; this parallel-block model's MLP reads hook_resid_pre: load it with "
                                      "hook_name='blocks.L.hook_resid_pre' if that is what it was trained on")
            try:
                sites.parse(cfg, name)
            except sites.SiteError as e:
                raise DictionaryError(f"the dictionary's site does not fit this model: {e}") from e
            need = site_width(cfg, local)
            if width != need:
                raise DictionaryError(
                    f"dictionary {what}={width} but site {name!r} of this model has width {need}; "
                    "this dictionary was trained on another model or site"
                )
