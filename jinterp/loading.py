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

from jinterp.arch import families
from jinterp.io import hf, orbax
from jinterp.io.safetensors import Reader
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


def cast(params, dtype):
    """Parameters to `dtype`, except norm weights and biases, which stay float32 (they are tiny, and HF
    computes norms in float32; Gemma's folded 1 + w would lose precision in bfloat16)."""

    def leaf(path, a):
        in_norm = any(str(getattr(k, "key", "")).startswith(("ln", "q_norm", "k_norm")) for k in path)
        return jnp.asarray(a, dtype=jnp.float32 if in_norm else dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


def load(source, dtype=jnp.float32, *, precision: str = "highest", tokenizer: bool = True) -> Model:
    """Load a model for jinterp.

    source: a local HF-format directory (config.json, model.safetensors or a sharded index,
    tokenizer files if present), the name of a bundled model under models/, a hub id (online),
    or a directory written by Model.save (orbax).
    dtype: parameter dtype (float32, bfloat16, ...); norms and softmax always run in float32.
    precision: matmul precision, "highest" (fp32 exact on GPU/TPU too) or "default" (the backend's).
    tokenizer: False skips loading the tokenizer.
    """
    path = resolve(source)
    if orbax.is_saved_model(path):
        saved = orbax.load_model(path, tokenizer=tokenizer)
        cfg = saved.config.replace(matmul_precision=precision)
        return Model(cfg, cast(saved.params, dtype), saved.tokenizer, saved.name)
    hf_cfg = hf.read_config(path, families.supported())
    fam = families.family_for(hf_cfg.model_type)
    cfg = fam.config(hf_cfg).replace(matmul_precision=precision)
    reader = Reader(path, prefixes=fam.PREFIXES)
    np_params = fam.params(reader, cfg, hf_cfg)
    extra = [n for n in reader.unused() if not n.endswith(_BUFFERS)]
    if extra:
        warnings.warn(f"{len(extra)} checkpoint tensors were not used, e.g. {extra[:3]}", stacklevel=2)
    params = cast(np_params, dtype)
    tok = None
    if tokenizer and any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return Model(cfg, params, tok, name=Path(source).name if Path(str(source)).is_dir() else str(source))
