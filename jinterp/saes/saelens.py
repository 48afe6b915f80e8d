"""Writing dictionaries: the SAELens 6 directory format (cfg.json + sae_weights.safetensors) and
circuit-tracer's per-layer transcoder set (config.yaml + layer_{l}.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jinterp.saes.dictionary import Dictionary
from jinterp.saes.formats import DictionaryError

SAELENS_FORMAT_VERSION = "6.54.12"  # the SAELens cfg.json layout written (v6: provenance under "metadata")


def _saelens_architecture(d: Dictionary) -> str:
    if not d.is_transcoder:
        return d.architecture
    if d.architecture in ("standard", "jumprelu"):
        base = "transcoder" if d.architecture == "standard" else "jumprelu_transcoder"
        if d.W_skip is not None:
            base = base.replace("transcoder", "skip_transcoder")
        return base
    raise DictionaryError(f"SAELens has no {d.architecture} transcoder architecture; cannot save {d!r} in its format")


def save_saelens(d: Dictionary, path, *, model_name: str | None = None, context_size: int | None = None,
                 metadata: dict | None = None) -> Path:
    """Write one layer's dictionary as a SAELens 6 directory: cfg.json + sae_weights.safetensors
    (W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, threshold for JumpReLU, W_skip
    [d_out, d_in] for skip transcoders), loadable by `SAE.load_from_disk` and `jinterp.saes.load`.
    cfg.json has SAELens's own keys (`metadata.hook_name` is the TransformerLens hook name, e.g.
    blocks.3.hook_resid_post; `metadata.sae_lens_version` names the cfg layout written, and
    `sae_lens_training_version` is null because SAELens did not train it). Refuses a non-empty `path`."""
    from safetensors.numpy import save_file

    if not isinstance(d, Dictionary):
        raise DictionaryError(f"save_saelens takes a saes.Dictionary, got {type(d).__name__}")
    if d.stacked:
        raise DictionaryError("save one layer at a time: save_saelens(dictionary[layer], path)")
    if d.site_name is None:
        raise DictionaryError(f"{d!r} does not say which site it reads; SAELens needs a hook_name")
    arch_name = _saelens_architecture(d)
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DictionaryError(f"{path} exists and is not empty; choose a new directory (nothing was overwritten)")
    dtype = str(jnp.dtype(d.W_enc.dtype))
    tensors = {"W_enc": d.W_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if d.architecture == "gated":
        tensors.update(b_gate=d.b_gate, r_mag=d.r_mag, b_mag=d.b_mag)
    else:
        tensors["b_enc"] = d.b_enc
    if d.architecture == "jumprelu":
        tensors["threshold"] = d.threshold
    if d.W_skip is not None:
        tensors["W_skip"] = jnp.swapaxes(d.W_skip, -1, -2)
    arrays = {}
    for n, v in tensors.items():
        a = np.ascontiguousarray(np.asarray(v))
        if not np.isfinite(a.astype(np.float32)).all():
            raise DictionaryError(f"refusing to save non-finite values in {n}")
        arrays[n] = a
    from jinterp import __version__

    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "hook_name": d.site_name,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": context_size,
    }
    if d.is_transcoder:
        meta["hook_name_out"] = d.out_site_name
        meta["hook_head_index_out"] = None
    meta["trained_with"] = f"jinterp {__version__}"
    meta.update(metadata or {})
    cfg = {"d_in": d.d_in, "d_sae": d.d_sae, "dtype": dtype, "device": "cpu",
           "apply_b_dec_to_input": bool(d.apply_b_dec_to_input), "normalize_activations": d.normalize,
           "reshape_activations": "hook_z" if d.hook_z else "none", "metadata": meta}
    if d.is_transcoder:
        cfg["d_out"] = d.d_out
    if d.architecture == "topk":
        cfg["k"] = int(d.k)
        cfg["rescale_acts_by_decoder_norm"] = bool(d.rescale_acts_by_decoder_norm)
    cfg["architecture"] = arch_name
    path.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg, indent=1))
    return path


def save_circuit_tracer(d: Dictionary, path, *, model_name: str | None = None, metadata: dict | None = None) -> Path:
    """Write per-layer transcoders (a stacked Dictionary, or one layer's) as circuit-tracer 0.5 reads
    them: `layer_{l}.safetensors` with W_enc [d_tc, d_model] (linear-style, transposed from ours),
    b_enc, W_dec [d_tc, d_model], b_dec, W_skip [d_model, d_model] (applied as x @ W_skip.T) when the
    dictionary has one, `activation_function.threshold` for JumpReLU; and config.yaml (model_name,
    model_kind transcoder_set, feature_input_hook / feature_output_hook as TransformerLens-local
    hook names, plus `metadata`). ReLU and JumpReLU only (circuit-tracer's JumpReLU has no ReLU,
    equal to ours for thresholds > 0); refuses a non-empty `path`."""
    import yaml
    from safetensors.numpy import save_file

    if not isinstance(d, Dictionary) or not d.is_transcoder:
        raise DictionaryError(f"circuit-tracer's format holds transcoders (a site in, another out); got {d!r}")
    if d.architecture not in ("standard", "jumprelu") or d.apply_b_dec_to_input or d.normalize != "none":
        raise DictionaryError(
            f"circuit-tracer's per-layer files hold ReLU or JumpReLU transcoders without input centring or "
            f"normalisation; this one is {d.architecture} (apply_b_dec_to_input={d.apply_b_dec_to_input}, "
            f"normalize={d.normalize!r}): save it with save_saelens instead")
    if d.d_in != d.d_out:
        raise DictionaryError(f"circuit-tracer's files need d_in == d_out (d_model); got {d.d_in} -> {d.d_out}")
    if d.architecture == "jumprelu" and not bool((np.asarray(d.threshold) > 0).all()):
        raise DictionaryError("circuit-tracer's JumpReLU has no ReLU: thresholds must be > 0 to keep the same outputs")
    layers = d.layers if d.stacked else (d.layer,)
    if any(l is None for l in layers):
        raise DictionaryError(f"{d!r} does not say its layer; circuit-tracer names files layer_{{l}}")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DictionaryError(f"{path} exists and is not empty; choose a new directory (nothing was overwritten)")
    path.mkdir(parents=True, exist_ok=True)
    for l in layers:
        one = d[l] if d.stacked else d
        tensors = {"W_enc": one.W_enc.T, "b_enc": one.b_enc, "W_dec": one.W_dec, "b_dec": one.b_dec}
        if one.W_skip is not None:
            tensors["W_skip"] = one.W_skip.T
        if one.architecture == "jumprelu":
            tensors["activation_function.threshold"] = one.threshold
        arrays = {n: np.ascontiguousarray(np.asarray(v)) for n, v in tensors.items()}
        for n, a in arrays.items():
            if not np.isfinite(a.astype(np.float32)).all():
                raise DictionaryError(f"refusing to save non-finite values in layer {l}'s {n}")
        save_file(arrays, str(path / f"layer_{l}.safetensors"))
    conf = {"model_name": model_name, "model_kind": "transcoder_set", "feature_input_hook": d.site,
            "feature_output_hook": d.out_site, **(metadata or {})}
    (path / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    return path
