"""Reading published SAE / transcoder files into `Dictionary` pytrees (no torch).

Formats (shared/reference/dictionaries.md has the details):

    saelens        directory with cfg.json + sae_weights.safetensors (v6 and pre-6 cfg layouts);
                   W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, threshold | log_threshold,
                   gated b_gate/r_mag/b_mag, skip transcoders W_skip [d_out, d_in] (x @ W_skip.T)
    gemma_scope    params.npz (W_enc [d_model, d_sae], W_dec, b_enc, b_dec, threshold; b_dec not
                   subtracted from the input) or Gemma Scope 2 params.safetensors (lowercase w_enc,
                   w_dec, ..., affine_skip_connection [d_in, d_out]) with an optional config.json
    circuit_tracer per-layer transcoders: layer_{i}.safetensors (W_enc [d_tc, d_model] linear-style,
                   W_dec [d_tc, d_model], b_enc, b_dec, optional W_skip [d_model, d_model] applied
                   as x @ W_skip.T, activation_function.threshold => JumpReLU without ReLU), with an
                   optional config.yaml naming feature_input_hook / feature_output_hook
    circuit_tracer_clt  cross-layer transcoders: W_enc_{i}.safetensors (W_enc_i, b_enc_i, b_dec_i,
                   threshold_i) and W_dec_{i}.safetensors (W_dec_i [d_tc, L - i, d_model])

Every failure is a DictionaryError naming the file, tensor or field and what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from jinterp.saes.circuit_tracer import ct_config, load_circuit_tracer, load_circuit_tracer_clt
from jinterp.saes.dictionary import Dictionary
from jinterp.saes.hooks import to_site
from jinterp.saes.tensors import DTYPES, DictionaryError, Tensors, as_array

FORMATS = ("saelens", "gemma_scope", "circuit_tracer", "circuit_tracer_clt")


# ---------------------------------------------------------------------------------------------
# SAELens


def _saelens_cfg(raw: dict, path: Path) -> dict:
    """Normalise a v6 or pre-6 cfg.json into one flat dict."""
    cfg = dict(raw)
    meta = cfg.pop("metadata", None) or {}
    for k, v in meta.items():
        cfg.setdefault(k, v)
    if "hook_name" not in cfg and "hook_point" in cfg:
        cfg["hook_name"] = cfg["hook_point"]
    if "hook_head_index" not in cfg and "hook_point_head_index" in cfg:
        cfg["hook_head_index"] = cfg["hook_point_head_index"]
    if "architecture" not in cfg:
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        cfg["architecture"] = "topk" if fn == "topk" else "standard"
        if fn == "topk" and "k" not in cfg:
            cfg["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations", "none")
    if norm is True:
        norm = "expected_average_only_in"
    elif norm in (False, None):
        norm = "none"
    cfg["normalize_activations"] = norm
    for need in ("d_in", "d_sae"):
        if need not in cfg:
            raise DictionaryError(f"{path / 'cfg.json'} has no {need!r}; is it a SAELens config?")
    return cfg


_SAELENS_ARCH = {
    # architecture -> (our activation, transcoder, skip)
    "standard": ("standard", False, False),
    "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False),
    "gated": ("gated", False, False),
    "transcoder": ("standard", True, False),
    "skip_transcoder": ("standard", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}


def load_saelens(path: Path, *, layer=None, hook_name=None, dtype=None) -> Dictionary:
    cfg_file, w_file = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.exists():
        raise DictionaryError(f"{path} has no cfg.json; a SAELens directory holds cfg.json and sae_weights.safetensors")
    try:
        cfg = _saelens_cfg(json.loads(cfg_file.read_text()), path)
    except json.JSONDecodeError as e:
        raise DictionaryError(f"{cfg_file} is not valid JSON: {e}") from e
    arch = cfg["architecture"]
    if arch not in _SAELENS_ARCH:
        raise DictionaryError(
            f"SAELens architecture {arch!r} ({cfg_file}) is not supported; supported: {', '.join(_SAELENS_ARCH)}"
        )
    act, transcoder, skip = _SAELENS_ARCH[arch]
    norm = cfg["normalize_activations"]
    if norm == "expected_average_only_in":
        norm = "none"  # inference no-op: the scale is folded into the weights (SAELens does the same on load_from_disk)
    if norm not in ("none", "constant_norm_rescale", "layer_norm"):
        raise DictionaryError(
            f"normalize_activations={cfg['normalize_activations']!r} in {cfg_file} is not supported at inference "
            "(supported: none, expected_average_only_in, constant_norm_rescale, layer_norm)"
        )
    if cfg.get("hook_head_index") is not None:
        raise DictionaryError(
            f"{cfg_file} is a single-head SAE (hook_head_index={cfg['hook_head_index']}); these are not supported yet"
        )
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out", d_in))
    np_dtype = DTYPES.get(str(cfg.get("dtype", "float32")).replace("torch.", ""), np.float32) if dtype is None else dtype
    t = Tensors(w_file)
    W_enc = t.get("W_enc", (d_in, d_sae))
    W_dec = t.get("W_dec", (d_sae, d_out))
    b_dec = t.get("b_dec", (d_out,))
    fields = {}
    if act == "gated":
        for n in ("b_gate", "r_mag", "b_mag"):
            fields[n] = t.get(n, (d_sae,))
    else:
        fields["b_enc"] = t.get("b_enc", (d_sae,))
    if act == "jumprelu":
        if "threshold" in t or "log_threshold" not in t:
            fields["threshold"] = t.get("threshold", (d_sae,))
        else:
            fields["threshold"] = np.exp(t.get("log_threshold", (d_sae,)))
    if skip:
        fields["W_skip"] = t.get("W_skip", (d_out, d_in)).T
    sf = t.get("scaling_factor", (d_sae,), optional=True)
    if sf is not None and not np.allclose(sf, 1.0):
        raise DictionaryError(f"{w_file} has a legacy scaling_factor that is not all ones; this is not supported")
    k = None
    if act == "topk":
        k = cfg.get("k")
        if k is None:
            raise DictionaryError(f"{cfg_file}: a topk SAE needs 'k'")
        k = int(k)
        if not 1 <= k <= d_sae:
            raise DictionaryError(f"{cfg_file}: k={k} must be in 1..d_sae={d_sae}")
    apply_b = bool(cfg.get("apply_b_dec_to_input", not transcoder))
    hook = hook_name or cfg.get("hook_name")
    site_layer, site = (None, None) if hook is None else to_site(hook, layer)
    out_site = None
    if transcoder:
        hook_out = cfg.get("hook_name_out")
        out_site = to_site(hook_out, site_layer)[1] if hook_out else None
    reshape = cfg.get("reshape_activations", "none") == "hook_z" or site == "attn.hook_z"
    return Dictionary(
        W_enc=as_array(W_enc, np_dtype), W_dec=as_array(W_dec, np_dtype), b_dec=as_array(b_dec, np_dtype),
        **{n: as_array(v, np_dtype) for n, v in fields.items()},
        architecture=act, k=k, rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)) and act == "topk",
        clamp=True, apply_b_dec_to_input=apply_b, normalize=norm, hook_z=reshape, site=site, out_site=out_site,
        layer=site_layer, hook_name=hook, format="saelens", source=str(path),
    )


# ---------------------------------------------------------------------------------------------
# Gemma Scope


_GS_KIND = (("transcoders", ("mlp.hook_in", "hook_mlp_out")), ("-res", ("hook_resid_post", None)),
            ("-mlp", ("hook_mlp_out", None)), ("-att", ("attn.hook_z", None)))


def _gemma_scope_site(path: Path, layer):
    """(layer, site, out_site) from a Gemma Scope path such as .../gemma-scope-2b-pt-res/layer_12/width_16k/..."""
    s = str(path).replace(os.sep, "/")
    m = re.search(r"layer_(\d+)", s)
    lay = int(m.group(1)) if m and layer is None else layer
    for key, (site, out) in _GS_KIND:
        if key in s:
            return lay, site, out
    m = re.search(r"/(resid_post|resid_pre|mlp_out|attn_out)(?:_all)?/", s)  # Gemma Scope 2 folders
    if m:
        return lay, {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "mlp_out": "hook_mlp_out",
                     "attn_out": "hook_attn_out"}[m.group(1)], None
    return lay, None, None


def load_gemma_scope(path: Path, *, layer=None, hook_name=None, dtype=None) -> Dictionary:
    file = path
    if path.is_dir():
        found = [path / n for n in ("params.npz", "params.safetensors") if (path / n).exists()]
        if not found:
            raise DictionaryError(f"{path} has neither params.npz nor params.safetensors (Gemma Scope files)")
        file = found[0]
    t = Tensors(file)
    low = "w_enc" in t
    W_enc = t.get("w_enc" if low else "W_enc")
    if W_enc.ndim != 2:
        raise DictionaryError(f"{file}: W_enc must be 2-D [d_in, d_sae], got shape {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    W_dec = t.get("w_dec" if low else "W_dec")
    if W_dec.ndim != 2 or W_dec.shape[0] != d_sae:
        raise DictionaryError(f"{file}: W_dec has shape {list(W_dec.shape)}, expected [{d_sae}, d_out]")
    d_out = W_dec.shape[1]
    b_enc = t.get("b_enc", (d_sae,))
    b_dec = t.get("b_dec", (d_out,))
    threshold = t.get("threshold", (d_sae,))
    skip = t.get("affine_skip_connection", (d_in, d_out), optional=True)  # already [d_in, d_out]
    lay, site, out_site = _gemma_scope_site(file, layer)
    hook = hook_name
    conf = file.parent / "config.json"
    if conf.exists():
        c = json.loads(conf.read_text())
        hook = hook or c.get("hf_hook_point_in")
        if c.get("hf_hook_point_out") and c.get("hf_hook_point_out") != c.get("hf_hook_point_in"):
            out_site = to_site(c["hf_hook_point_out"], layer)[1]
        else:
            out_site = None
    if hook is not None:
        lay, site = to_site(hook, lay)
    np_dtype = np.float32 if dtype is None else dtype
    return Dictionary(
        W_enc=as_array(W_enc, np_dtype), W_dec=as_array(W_dec, np_dtype), b_dec=as_array(b_dec, np_dtype), b_enc=as_array(b_enc, np_dtype),
        threshold=as_array(threshold, np_dtype), W_skip=as_array(skip, np_dtype), architecture="jumprelu", clamp=True,
        apply_b_dec_to_input=False, hook_z=site == "attn.hook_z", site=site, out_site=out_site if out_site != site else None,
        layer=lay if site is not None else layer, hook_name=hook, format="gemma_scope", source=str(path),
    )


# ---------------------------------------------------------------------------------------------
# detection, hub, entry point


def detect(path: Path) -> str:
    """Which format the file or directory at `path` is in."""
    if path.is_dir():
        if (path / "cfg.json").exists() or (path / "sae_weights.safetensors").exists():
            return "saelens"
        if any(path.glob("W_enc_*.safetensors")):
            return "circuit_tracer_clt"
        if any(path.glob("layer_*.safetensors")) or (path / "config.yaml").exists():
            conf = ct_config(path)
            return "circuit_tracer_clt" if conf.get("model_kind") == "cross_layer_transcoder" else "circuit_tracer"
        if (path / "params.npz").exists() or (path / "params.safetensors").exists():
            return "gemma_scope"
        raise DictionaryError(
            f"cannot tell the format of {path}: expected cfg.json + sae_weights.safetensors (SAELens), params.npz / "
            "params.safetensors (Gemma Scope), layer_*.safetensors (circuit-tracer) or W_enc_*.safetensors (CLT). "
            f"It has {sorted(p.name for p in path.iterdir())[:10]}; pass format= if it is one of {FORMATS}."
        )
    if path.suffix == ".npz":
        return "gemma_scope"
    if path.suffix == ".safetensors":
        if path.name == "sae_weights.safetensors":
            return "saelens"
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
        if "w_enc" in keys:
            return "gemma_scope"
        return "circuit_tracer"
    raise DictionaryError(f"cannot tell the format of {path}; pass format= (one of {FORMATS})")


_LOADERS = {"saelens": load_saelens, "gemma_scope": load_gemma_scope, "circuit_tracer": load_circuit_tracer,
            "circuit_tracer_clt": load_circuit_tracer_clt}


def _from_hub(ident: str) -> Path:
    """'owner/repo' or 'owner/repo/sub/folder' (or 'hf://...', '@revision' at the end) -> a local snapshot."""
    ident = ident.removeprefix("hf://")
    rev = None
    if "@" in ident:
        ident, rev = ident.rsplit("@", 1)
    parts = ident.strip("/").split("/")
    if len(parts) < 2:
        raise DictionaryError(f"{ident!r} is neither a local path nor a hub id ('owner/repo[/subfolder]')")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, revision=rev, allow_patterns=[f"{sub}/*", f"{sub}"] if sub else None)
    except Exception as e:
        raise DictionaryError(
            f"could not fetch {ident!r} from the hub ({type(e).__name__}: {e}). Offline? Download it and pass the local path."
        ) from e
    return Path(local) / sub if sub else Path(local)


def load(path_or_id, *, format: str | None = None, layer: int | None = None, hook_name: str | None = None, dtype=None):
    """A `Dictionary` (or `CrossLayerTranscoder`) from a local path or a hub id.

    format: one of FORMATS; None detects it. layer: which layer of a per-layer transcoder set (None:
    all of them, stacked), or the layer of a file whose hook name has none. hook_name: the hook it
    reads, when the file does not say (Gemma Scope npz outside its hub layout). dtype: numpy dtype of
    the arrays (default: SAELens cfg's dtype, else float32)."""
    if format is not None and format not in FORMATS:
        raise DictionaryError(f"unknown format {format!r}; choose one of {FORMATS} (or None to detect)")
    path = Path(os.fspath(path_or_id)).expanduser()
    if not path.exists():
        s = str(path_or_id)
        if s.startswith(("/", ".", "~")) or "/" not in s.removeprefix("hf://"):
            raise DictionaryError(f"{s} does not exist (a hub id looks like 'owner/repo[/subfolder]')")
        path = _from_hub(s)
    if dtype is not None:
        from jinterp.loading import resolve_dtype

        dtype = resolve_dtype(dtype)  # "bf16", jnp.bfloat16, ...; a clear error for an unknown name
    fmt = format or detect(path)
    return _LOADERS[fmt](path, layer=layer, hook_name=hook_name, dtype=dtype)
