"""circuit-tracer's transcoders: per-layer files (W_enc [d_tc, d_model], transposed here to the
SAELens orientation; optional W_skip applied as x @ W_skip.T) and cross-layer transcoders."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jinterp.saes.dictionary import CrossLayerTranscoder, Dictionary
from jinterp.saes.hooks import to_site
from jinterp.saes.tensors import DictionaryError, Tensors, as_array


def ct_config(path: Path) -> dict:
    for name in ("config.yaml", "config.yml"):
        f = path / name
        if f.exists():
            import yaml

            try:
                return yaml.safe_load(f.read_text()) or {}
            except yaml.YAMLError as e:
                raise DictionaryError(f"{f} is not valid YAML: {e}") from e
    return {}


def _ct_hooks(conf: dict):
    # circuit-tracer's configs name TransformerLens-local hooks; these are the CLT defaults (dictionaries.md §3)
    return conf.get("feature_input_hook", "hook_resid_mid"), conf.get("feature_output_hook", "hook_mlp_out")


def _ct_layer_file(file: Path, conf: dict, np_dtype):
    """One per-layer transcoder file -> the Dictionary fields (circuit-tracer layout, see module doc)."""
    t = Tensors(file)
    if "log_thresholds" in t:
        raise DictionaryError(f"{file} stores 'log_thresholds', which circuit-tracer rejects too; store 'threshold' values")
    b_enc = t.get("b_enc")
    b_dec = t.get("b_dec")
    d_sae, d_model = b_enc.shape[0], b_dec.shape[0]
    W_enc = t.get("W_enc", (d_sae, d_model)).T
    W_dec = t.get("W_dec", (d_sae, d_model))
    skip = t.get("W_skip", (d_model, d_model), optional=True)
    threshold = t.get("activation_function.threshold", (d_sae,), optional=True)
    activation = conf.get("activation")
    k = None
    if activation == "topk" or "k" in t:
        arch = "topk"
        k = int(conf.get("k") or np.asarray(t.get("k")).item())
    elif threshold is not None and activation != "relu":
        arch = "jumprelu"
    else:
        arch = "standard"
    return dict(
        W_enc=as_array(W_enc, np_dtype), W_dec=as_array(W_dec, np_dtype), b_enc=as_array(b_enc, np_dtype), b_dec=as_array(b_dec, np_dtype),
        threshold=as_array(threshold, np_dtype) if arch == "jumprelu" else None,
        W_skip=as_array(skip.T, np_dtype) if skip is not None else None,
    ), arch, k


def load_circuit_tracer(path: Path, *, layer=None, hook_name=None, dtype=None) -> Dictionary:
    np_dtype = np.float32 if dtype is None else dtype
    if path.is_file():
        conf = ct_config(path.parent)
        m = re.search(r"layer_(\d+)", path.name)
        files = {layer if layer is not None else (int(m.group(1)) if m else None): path}
    else:
        conf = ct_config(path)
        listed = conf.get("transcoders")
        if listed:
            files = {}
            for i, entry in enumerate(listed):
                p = entry.get("filepath") if isinstance(entry, dict) else entry
                i = entry.get("layer", i) if isinstance(entry, dict) else i
                if str(p).startswith("hf://"):
                    raise DictionaryError(f"{path}/config.yaml lists hub files ({p}); download them and list local paths")
                p = Path(p)
                files[int(i)] = p if p.is_absolute() else path / p
        else:
            files = {int(re.search(r"layer_(\d+)", f.name).group(1)): f for f in path.glob("layer_*.safetensors")}
        if not files:
            raise DictionaryError(f"{path} holds no circuit-tracer transcoders (layer_*.safetensors or a config.yaml list)")
        if layer is not None:
            if layer not in files:
                raise DictionaryError(f"{path} has no transcoder for layer {layer}; it has layers {sorted(files)}")
            files = {layer: files[layer]}
    in_hook, out_hook = _ct_hooks(conf)
    if hook_name is not None:
        in_hook = hook_name
    layers = sorted(files, key=lambda x: -1 if x is None else x)
    parts = [_ct_layer_file(files[l], conf, np_dtype) for l in layers]
    archs = {p[1] for p in parts}
    if len(archs) != 1:
        raise DictionaryError(f"{path}: the layers mix activation functions {sorted(archs)}")
    arch, k = parts[0][1], parts[0][2]
    site_layer = layers[0] if len(layers) == 1 else 0
    site = to_site(in_hook, site_layer)[1] if site_layer is not None else to_site(in_hook, 0)[1]
    out_site = to_site(out_hook, site_layer if site_layer is not None else 0)[1]
    common = dict(architecture=arch, k=k, clamp=False, apply_b_dec_to_input=False, site=site, out_site=out_site,
                  hook_name=in_hook, format="circuit_tracer", source=str(path))
    if len(layers) == 1:
        return Dictionary(**parts[0][0], layer=layers[0], **common)
    fields = parts[0][0]
    shapes = {n: None if v is None else v.shape for n, v in fields.items()}
    for l, p in zip(layers, parts):
        got = {n: None if v is None else v.shape for n, v in p[0].items()}
        if got != shapes:
            raise DictionaryError(f"{path}: layer {l}'s tensors {got} differ in shape from layer {layers[0]}'s {shapes}")
    stacked = {n: None if fields[n] is None else jnp.stack([p[0][n] for p in parts]) for n in fields}
    return Dictionary(**stacked, layers=tuple(layers), **common)


def load_circuit_tracer_clt(path: Path, *, layer=None, hook_name=None, dtype=None) -> CrossLayerTranscoder:
    np_dtype = np.float32 if dtype is None else dtype
    enc_files = {int(re.search(r"W_enc_(\d+)", f.name).group(1)): f for f in path.glob("W_enc_*.safetensors")}
    L = len(enc_files)
    if sorted(enc_files) != list(range(L)):
        raise DictionaryError(f"{path}: W_enc_*.safetensors must cover layers 0..{L - 1} contiguously, got {sorted(enc_files)}")
    W_enc, b_enc, b_dec, thr, W_dec = [], [], [], [], []
    for i in range(L):
        t = Tensors(enc_files[i])
        be = t.get(f"b_enc_{i}")
        bd = t.get(f"b_dec_{i}")
        d_sae, d_model = be.shape[0], bd.shape[0]
        W_enc.append(t.get(f"W_enc_{i}", (d_sae, d_model)).T)
        b_enc.append(be)
        b_dec.append(bd)
        thr.append(t.get(f"threshold_{i}", (d_sae,), optional=True))
        W_dec.append(Tensors(path / f"W_dec_{i}.safetensors").get(f"W_dec_{i}", (d_sae, L - i, d_model)))
    if any(x is None for x in thr) and not all(x is None for x in thr):
        raise DictionaryError(f"{path}: some layers have threshold_i and some do not")
    jump = thr[0] is not None
    conf = ct_config(path)
    in_hook, out_hook = _ct_hooks(conf)
    if hook_name is not None:
        in_hook = hook_name
    return CrossLayerTranscoder(
        W_enc=as_array(np.stack(W_enc), np_dtype), b_enc=as_array(np.stack(b_enc), np_dtype),
        W_dec=tuple(as_array(w, np_dtype) for w in W_dec), b_dec=as_array(np.stack(b_dec), np_dtype),
        threshold=as_array(np.stack(thr), np_dtype) if jump else None, architecture="jumprelu" if jump else "standard",
        clamp=False, site=to_site(in_hook, 0)[1], out_site=to_site(out_hook, 0)[1], hook_name=in_hook, source=str(path),
    )
