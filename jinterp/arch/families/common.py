"""Mapping helpers several family files share."""

import numpy as np

from jinterp.config import Config
from jinterp.io.safetensors import CheckpointError


def zeros(shape, like):
    """Zeros in the checkpoint's dtype, for biases a family does not have."""
    return np.zeros(shape, dtype=like.dtype)


def unembedding(r, name: str, W_E, cfg: Config) -> dict:
    """The "unembed" parameters {W_U [D, V], b_U [V]}, decided as transformers decides it: the
    checkpoint's separate output tensor `name` whenever it has one (transformers does not tie
    weights that differ), else W_E^T when the config ties embeddings. An untied config without
    that tensor is an error rather than a silent fallback to W_E."""
    V, D = cfg.d_vocab, cfg.d_model
    if r.has(name):
        W_U = r.get(name, (V, D))
    elif cfg.tied_embeddings:
        W_U = W_E
    else:
        raise CheckpointError(
            f"config.json says the embeddings are not tied (tie_word_embeddings false), but the checkpoint in "
            f"{r.dir} has no output matrix {name!r}. Is the checkpoint complete, or should the config tie them?"
        )
    return {"W_U": W_U.T, "b_U": zeros((V,), W_E)}
