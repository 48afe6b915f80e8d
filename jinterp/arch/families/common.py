"""Mapping helpers several family files share."""

from jinterp.config import Config
from jinterp.io.safetensors import CheckpointError, zeros


def unembedding(r, name: str, embed: str, cfg: Config) -> dict:
    """The "unembed" parameters {W_U [D, V], b_U [V]}, decided as transformers decides it: the
    checkpoint's separate output tensor `name` whenever it has one (transformers does not tie
    weights that differ), else W_E^T when the config ties embeddings. An untied config without
    that tensor is an error rather than a silent fallback to W_E. embed: the embedding's name."""
    V, D = cfg.d_vocab, cfg.d_model
    if r.has(name):
        W_U = r.get(name, (V, D), transpose=True)
    elif cfg.tied_embeddings:
        W_U = r.get(embed, (V, D), transpose=True)
    else:
        raise CheckpointError(
            f"config.json says the embeddings are not tied (tie_word_embeddings false), but the checkpoint in "
            f"{r.dir} has no output matrix {name!r}. Is the checkpoint complete, or should the config tie them?"
        )
    return {"W_U": W_U, "b_U": zeros((V,))}
