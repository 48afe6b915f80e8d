"""Head detectors, vectorised over every layer and head at once.

A detector is a boolean target mask over (query, key) per example, built from the tokens:

    previous_token   key == query - 1
    duplicate_token  key < query and tokens[key] == tokens[query]
    induction        key <= query and tokens[key - 1] == tokens[query]   (the token after an earlier copy)

A head's score is the attention mass it puts on target keys, averaged over the query rows that
have at least one target (rows with no target say nothing about the head). Scores are
[n_layers, n_heads] from one cached forward pass.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def previous_token_mask(tokens) -> np.ndarray:
    B, P = np.shape(tokens)
    m = np.zeros((B, P, P), bool)
    idx = np.arange(1, P)
    m[:, idx, idx - 1] = True
    return m


def duplicate_token_mask(tokens) -> np.ndarray:
    t = np.asarray(tokens)
    P = t.shape[1]
    same = t[:, :, None] == t[:, None, :]
    return same & np.tril(np.ones((P, P), bool), -1)[None]


def induction_mask(tokens) -> np.ndarray:
    t = np.asarray(tokens)
    P = t.shape[1]
    m = np.zeros(t.shape + (P,), bool)
    # key k (>= 1) is a target for query q when tokens[k - 1] == tokens[q] and k - 1 < q
    m[:, :, 1:] = t[:, :, None] == t[:, None, :-1]
    return m & np.tril(np.ones((P, P), bool))[None] & ~np.eye(P, dtype=bool)[None]


MASKS = {"previous_token": previous_token_mask, "duplicate_token": duplicate_token_mask, "induction": induction_mask}


def score_patterns(patterns, mask, attention_mask=None) -> jnp.ndarray:
    """patterns [L, B, H, Q, K], mask [B, Q, K] -> scores [L, H]."""
    mask = jnp.asarray(mask)
    rows = mask.any(-1)  # [B, Q]
    if attention_mask is not None:
        rows = rows & jnp.asarray(attention_mask, bool)
    mass = jnp.einsum("lbhqk,bqk->lbhq", patterns, mask.astype(patterns.dtype))
    return (mass * rows[None, :, None]).sum((1, 3)) / jnp.maximum(rows.sum(), 1)


def head_scores(model, tokens, kinds=("previous_token", "duplicate_token", "induction"), attention_mask=None) -> dict:
    """{kind: [n_layers, n_heads]} for each detector, from one forward pass."""
    _, cache = model.run_with_cache(tokens, names=lambda n: n.endswith("attn.hook_pattern"), attention_mask=attention_mask)
    pats = cache.stack("attn.hook_pattern").astype(jnp.float32)
    toks = np.asarray(tokens)
    return {k: np.asarray(score_patterns(pats, MASKS[k](toks), attention_mask)) for k in kinds}
