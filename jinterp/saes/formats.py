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

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jinterp.saes.dictionary import CrossLayerTranscoder, Dictionary
from jinterp.saes.hooks import to_site

FORMATS = ("saelens", "gemma_scope", "circuit_tracer", "circuit_tracer_clt")


class DictionaryError(ValueError):
    """A dictionary file that is missing, malformed, unsupported, or does not fit the model."""


_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


# ---------------------------------------------------------------------------------------------
# tensors


class _Tensors:
    """The named tensors of one file (safetensors or npz), read as numpy, checked on access."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DictionaryError(f"dictionary file {self.path} does not exist")
        try:
            if self.path.suffix == ".npz":
                with np.load(self.path) as z:
                    self._t = {k: np.asarray(z[k]) for k in z.files}
            else:
                from safetensors.numpy import load_file

                self._t = load_file(str(self.path))
        except Exception as e:  # garbled / truncated files raise library-specific errors
            raise DictionaryError(f"could not read {self.path}: {e}. Is the file complete?") from e

    def keys(self):
        return list(self._t)

    def __contains__(self, name):
        return name in self._t

    def get(self, name: str, shape: tuple | None = None, optional: bool = False):
        if name not in self._t:
            if optional:
                return None
            raise DictionaryError(
                f"{self.path} is missing tensor {name!r}" + (f" (expected shape {list(shape)})" if shape else "")
                + f"; it has {sorted(self._t)}. Is it the right format, and complete?"
            )
        a = self._t[name]
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise DictionaryError(f"tensor {name!r} in {self.path} has shape {list(a.shape)}, expected {list(shape)}")
        if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16:
            bad = ~np.isfinite(a.astype(np.float32))
            if bad.any():
                raise DictionaryError(
                    f"tensor {name!r} in {self.path} has {int(bad.sum())} non-finite (NaN/inf) values "
                    f"(first at index {tuple(int(i) for i in np.argwhere(bad)[0])}); the file is corrupt or was saved mid-divergence"
                )
        return a


def _arr(a, dtype):
    return None if a is None else jnp.asarray(np.asarray(a).astype(dtype))


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
    np_dtype = _DTYPES.get(str(cfg.get("dtype", "float32")).replace("torch.", ""), np.float32) if dtype is None else dtype
    t = _Tensors(w_file)
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
        W_enc=_arr(W_enc, np_dtype), W_dec=_arr(W_dec, np_dtype), b_dec=_arr(b_dec, np_dtype),
        **{n: _arr(v, np_dtype) for n, v in fields.items()},
        architecture=act, k=k, rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)) and act == "topk",
        clamp=True, apply_b_dec_to_input=apply_b, normalize=norm, hook_z=reshape, site=site, out_site=out_site,
        layer=site_layer, hook_name=hook, format="saelens", source=str(path),
    )


# ---------------------------------------------------------------------------------------------
# Gemma Scope


_GS_KIND = (("transcoders", ("ln2.hook_normalized", "hook_mlp_out")), ("-res", ("hook_resid_post", None)),
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
    t = _Tensors(file)
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
        W_enc=_arr(W_enc, np_dtype), W_dec=_arr(W_dec, np_dtype), b_dec=_arr(b_dec, np_dtype), b_enc=_arr(b_enc, np_dtype),
        threshold=_arr(threshold, np_dtype), W_skip=_arr(skip, np_dtype), architecture="jumprelu", clamp=True,
        apply_b_dec_to_input=False, hook_z=site == "attn.hook_z", site=site, out_site=out_site if out_site != site else None,
        layer=lay if site is not None else layer, hook_name=hook, format="gemma_scope", source=str(path),
    )


# ---------------------------------------------------------------------------------------------
# circuit-tracer


def _ct_config(path: Path) -> dict:
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
    t = _Tensors(file)
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
        W_enc=_arr(W_enc, np_dtype), W_dec=_arr(W_dec, np_dtype), b_enc=_arr(b_enc, np_dtype), b_dec=_arr(b_dec, np_dtype),
        threshold=_arr(threshold, np_dtype) if arch == "jumprelu" else None,
        W_skip=_arr(skip.T, np_dtype) if skip is not None else None,
    ), arch, k


def load_circuit_tracer(path: Path, *, layer=None, hook_name=None, dtype=None) -> Dictionary:
    np_dtype = np.float32 if dtype is None else dtype
    if path.is_file():
        conf = _ct_config(path.parent)
        m = re.search(r"layer_(\d+)", path.name)
        files = {layer if layer is not None else (int(m.group(1)) if m else None): path}
    else:
        conf = _ct_config(path)
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
        t = _Tensors(enc_files[i])
        be = t.get(f"b_enc_{i}")
        bd = t.get(f"b_dec_{i}")
        d_sae, d_model = be.shape[0], bd.shape[0]
        W_enc.append(t.get(f"W_enc_{i}", (d_sae, d_model)).T)
        b_enc.append(be)
        b_dec.append(bd)
        thr.append(t.get(f"threshold_{i}", (d_sae,), optional=True))
        W_dec.append(_Tensors(path / f"W_dec_{i}.safetensors").get(f"W_dec_{i}", (d_sae, L - i, d_model)))
    if any(x is None for x in thr) and not all(x is None for x in thr):
        raise DictionaryError(f"{path}: some layers have threshold_i and some do not")
    jump = thr[0] is not None
    conf = _ct_config(path)
    in_hook, out_hook = _ct_hooks(conf)
    if hook_name is not None:
        in_hook = hook_name
    return CrossLayerTranscoder(
        W_enc=_arr(np.stack(W_enc), np_dtype), b_enc=_arr(np.stack(b_enc), np_dtype),
        W_dec=tuple(_arr(w, np_dtype) for w in W_dec), b_dec=_arr(np.stack(b_dec), np_dtype),
        threshold=_arr(np.stack(thr), np_dtype) if jump else None, architecture="jumprelu" if jump else "standard",
        clamp=False, site=to_site(in_hook, 0)[1], out_site=to_site(out_hook, 0)[1], hook_name=in_hook, source=str(path),
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
            conf = _ct_config(path)
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
    fmt = format or detect(path)
    return _LOADERS[fmt](path, layer=layer, hook_name=hook_name, dtype=dtype)
