"""jinterp.load: a local HF-format directory, a bundled model name, a hub id (online), or a saved jinterp model.

No torch: configs come from transformers.AutoConfig, weights straight from safetensors, tokenizers
from AutoTokenizer. The files are read by jinterp.io; this module picks the family, casts the
parameters and builds the Model.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

import numpy as np

from jinterp import sharding
from jinterp.arch import families, param_shapes
from jinterp.io import hf, orbax
from jinterp.io.safetensors import CheckpointError, Lazy, Reader, aligned_empty, all_finite, nonfinite_summary
from jinterp.model import Model

MODELS_DIR = Path(os.environ.get("JINTERP_MODELS", Path(__file__).resolve().parent.parent / "models"))

# tensors HF checkpoints carry that are buffers, not parameters
_BUFFERS = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq", "masked_bias")


def bundled() -> list[str]:
    """Names of the models bundled under models/."""
    if not MODELS_DIR.exists():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").exists())


def resolve(source) -> Path:
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if (MODELS_DIR / str(source) / "config.json").exists():
        return MODELS_DIR / str(source)
    if p.exists():
        raise FileNotFoundError(f"{p} is a file; pass the directory holding config.json and the weights")
    if str(source).count("/") > 1 or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no directory {p}; bundled models: {bundled()}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(source),
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "vocab*", "merges.txt"],
            )
        )
    except Exception as e:
        raise FileNotFoundError(
            f"{source!r} is not a local directory or a bundled model ({', '.join(bundled()) or 'none'}), "
            f"and fetching it from the hub failed ({type(e).__name__}: {str(e)[:200]}). "
            "Offline? Pass a local directory with config.json and model.safetensors."
        ) from e


# the parameter dtypes load accepts, by name (any spelling numpy or jax accepts for these works too)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
_ALIASES = {"fp32": "float32", "f32": "float32", "single": "float32", "bf16": "bfloat16", "fp16": "float16",
            "f16": "float16", "half": "float16", "fp64": "float64", "f64": "float64", "double": "float64"}


def resolve_dtype(dtype) -> np.dtype:
    """The parameter dtype `dtype` names (a string such as "bfloat16" / "bf16", or a numpy / jax
    dtype), or a ValueError listing the accepted ones. float64 needs jax's x64 mode, without which
    jax would silently compute in float32."""
    accepted = ", ".join(list(DTYPES) + [f"{k} ({v})" for k, v in _ALIASES.items()])
    name = dtype
    if isinstance(dtype, str):
        key = _ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
        if key not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {accepted}, or a jax / numpy float dtype")
        dtype = DTYPES[key]
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{name!r} is not a dtype; accepted: {accepted}, or a jax / numpy float dtype") from e
    if dt not in {np.dtype(v) for v in DTYPES.values()}:
        raise ValueError(f"parameters need a float dtype, got {dt}; accepted: {', '.join(DTYPES)}")
    if dt == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError("float64 parameters need jax's 64-bit mode (jax.config.update('jax_enable_x64', True) "
                         "before anything else runs); without it jax computes in float32")
    return dt


def _dtype_of(path, dtype):
    """Norm weights and biases stay float32 (they are tiny, and HF computes norms in float32; Gemma's
    folded 1 + w would lose precision in bfloat16); every other parameter takes `dtype`."""
    in_norm = any(str(getattr(k, "key", "")).startswith(("ln", "q_norm", "k_norm")) for k in path)
    return jnp.float32 if in_norm else dtype


def place(params, cfg, dtype, mesh=None, check_finite: bool = True):
    """Build and place every parameter, one at a time, in its final dtype: `params` holds `Lazy`
    leaves (read from the checkpoint now) or arrays. On one device the 64-byte-aligned buffer a Lazy
    builds is adopted by jax without a copy; on a mesh each parameter goes to its NamedSharding
    (jinterp.sharding) and its host buffer is dropped before the next is read. So loading holds the
    placed parameters plus one in flight, never a second copy of the model.

    check_finite: scan each parameter on the host, once it is built in its final dtype, for NaN or
    inf (one pass, a few GB/s: io.safetensors.all_finite) and raise a CheckpointError naming the tensor."""
    dtype = resolve_dtype(dtype)
    expect = param_shapes(cfg)
    got_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, Lazy))[0]}
    want_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expect)[0]}
    if got_paths != want_paths:
        raise CheckpointError(f"parameters {sorted(got_paths ^ want_paths)} differ from what the config implies")
    shards = sharding.param_shardings(cfg, mesh) if mesh is not None else None
    flat_expect = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(expect)[0]}
    flat_shards = {} if shards is None else {jax.tree_util.keystr(p): s for p, s in
                                              jax.tree_util.tree_flatten_with_path(shards)[0]}

    def leaf(path, v):
        key = jax.tree_util.keystr(path)
        dt = np.dtype(_dtype_of(path, dtype))
        if isinstance(v, Lazy):
            a = v.build(dt)
        else:
            a = aligned_empty(np.shape(v), dt)
            a[...] = np.asarray(v)
        if a.shape != flat_expect[key].shape:
            raise CheckpointError(f"parameter {key} has shape {list(a.shape)}, the config implies "
                                  f"{list(flat_expect[key].shape)}")
        if check_finite and not all_finite(a):
            raise CheckpointError(_nonfinite_message(key, v, a, dt))
        return jax.device_put(a, flat_shards.get(key))

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=lambda x: isinstance(x, Lazy))


def _nonfinite_message(key, v, a, dt) -> str:
    """Which tensor (and, for a stacked one, which layer) holds NaN or inf, and what to do."""
    name = getattr(v, "name", "") if isinstance(v, Lazy) else ""
    stacked = "{}" in name
    if stacked or (not name and key.startswith("['blocks']")):  # a leading layer axis: name the layer
        layer = next(l for l in range(a.shape[0]) if not all_finite(a[l]))
        where = repr(name.format(layer)) if name else f"{key} at layer {layer}"
        detail = nonfinite_summary(a[layer])
    else:
        where = repr(name) if name else key
        detail = nonfinite_summary(a)
    return (f"checkpoint tensor {where} (parameter {key}, loaded as {dt}) holds {detail}. The checkpoint is corrupt "
            f"or was saved in a dtype that overflowed"
            + (f", or {dt} cannot hold its values (load in bfloat16 or float32)" if dt == np.float16 else "")
            + ". Re-download or re-save it; jinterp.load(..., check_finite=False) loads it anyway.")


def load(source, dtype=jnp.float32, *, precision: str = "highest", tokenizer: bool = True, mesh=None,
         check_finite: bool = True) -> Model:
    """Load a model for jinterp.

    source: a local HF-format directory (config.json, model.safetensors or a sharded index,
    tokenizer files if present), the name of a bundled model under models/, a hub id (online),
    or a directory written by Model.save (orbax).
    dtype: parameter dtype: "float32", "bfloat16", "float16" ("float64" with jax's x64 mode), or the
    jax / numpy dtype; an unknown name is a ValueError listing these. Norms and softmax always run in float32.
    precision: matmul precision, "highest" (fp32 exact on GPU/TPU too) or "default" (the backend's).
    tokenizer: False skips loading the tokenizer.
    mesh: a jax.sharding.Mesh with axes "data" and/or "model": parameters are sharded over it by
    jinterp.sharding's rules (tensor parallel over heads, d_mlp and vocabulary on "model", d_model on
    "data"); a mesh that does not fit the model is refused before any weight is read.
    check_finite: refuse (CheckpointError naming the tensor) weights holding NaN or inf; the scan
    costs one pass over each tensor on the host.
    """
    dtype = resolve_dtype(dtype)
    path = resolve(source)
    if orbax.is_saved_model(path):
        saved = orbax.load_model(path, tokenizer=tokenizer)
        cfg = saved.config.replace(matmul_precision=precision)
        if mesh is not None:
            sharding.check_mesh(cfg, mesh)
        return Model(cfg, place(saved.params, cfg, dtype, mesh, check_finite), saved.tokenizer, saved.name)
    hf_cfg = hf.read_config(path, families.supported())
    fam = families.family_for(hf_cfg.model_type)
    cfg = fam.config(hf_cfg).replace(matmul_precision=precision)
    if mesh is not None:
        sharding.check_mesh(cfg, mesh)
    reader = Reader(path, prefixes=fam.PREFIXES)
    lazy = fam.params(reader, cfg, hf_cfg)  # checks every tensor's presence and shape; reads nothing
    extra = [n for n in reader.unused() if not n.endswith(_BUFFERS)]
    if extra:
        warnings.warn(f"{len(extra)} checkpoint tensors were not used, e.g. {extra[:3]}", stacklevel=2)
    params = place(lazy, cfg, dtype, mesh, check_finite)
    tok = None
    if tokenizer and any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return Model(cfg, params, tok, name=Path(source).name if Path(str(source)).is_dir() else str(source))
