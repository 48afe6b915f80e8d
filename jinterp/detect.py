"""Head detectors, vectorised over every layer and head at once.

A detector is a boolean target mask over (query, key) per example, built from the tokens:

    previous_token   key == query - 1
    duplicate_token  key < query and tokens[key] == tokens[query]
    induction        key <= query and tokens[key - 1] == tokens[query]   (the token after an earlier copy)

A head's score is the attention mass it puts on target keys, averaged over the query rows that
have at least one target (rows with no target say nothing about the head; TransformerLens's
detect_head averages over every row instead). Scores are [n_layers, n_heads] from one cached
forward pass.
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
    # key k (>= 1) is a target for query q when tokens[k - 1] == tokens[q] and k <= q
    m[:, :, 1:] = t[:, :, None] == t[:, None, :-1]
    return m & np.tril(np.ones((P, P), bool))[None]


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


def rouge1_recall(generated, reference) -> float:
    """Unigram recall of reference tokens in the generation (counts clipped), as in ROUGE-1."""
    from collections import Counter

    g, r = Counter(np.asarray(generated).tolist()), Counter(np.asarray(reference).tolist())
    return sum(min(n, g[t]) for t, n in r.items()) / max(1, sum(r.values()))


def retrieval_scores(
    model,
    prompts,
    needle_spans,
    max_new_tokens: int = 50,
    stop_token: int | None = None,
    min_recall: float = 0.5,
) -> dict:
    """Retrieval score of every head (Wu et al. 2024; methods.md section 4).

    Each prompt (token ids, one row per sample) holds a needle at prompt[a:b] (`needle_spans`, one
    (a, b) per sample). The model decodes greedily; at each step the head "copy-pastes" when the
    key its current query attends to most lies inside the needle and holds the token just
    generated, and then scores 1 / (b - a). Only samples whose generation recalls more than
    `min_recall` of the needle's tokens (ROUGE-1) count; a head's score is its mean over them.

    The attention rows of incremental decoding equal those of one teacher-forced forward over
    prompt + generation (causal attention), so all steps and heads come from one cached pass (which
    holds [n_layers, n_heads, T, T] attention maps: fine for the short haystacks of small models,
    not for 50K-token contexts). ROUGE-1 is computed on token ids, not stemmed words.
    Returns {"scores": [n_layers, n_heads], "n_samples": counted samples, "recall": per sample}.
    """
    cfg = model.config
    L, H = cfg.n_layers, cfg.n_heads
    total = np.zeros((L, H))
    counted, recalls = 0, []
    for prompt, (a, b) in zip(prompts, needle_spans):
        prompt = np.asarray(prompt)[None]
        P = prompt.shape[1]
        gen = np.asarray(model.generate(prompt, max_new_tokens, stop_at_eos=False))[0, P:]
        if stop_token is not None and (gen == stop_token).any():
            gen = gen[: int(np.argmax(gen == stop_token)) + 1]  # the stop step is scored, as in the original
        rec = rouge1_recall(gen[gen != stop_token] if stop_token is not None else gen, prompt[0, a:b])
        recalls.append(rec)
        if rec <= min_recall or len(gen) == 0:
            continue
        counted += 1
        seq = np.concatenate([prompt[0], gen])[None]
        _, cache = model.run_with_cache(seq, names=lambda n: n.endswith("attn.hook_pattern"))
        pats = np.asarray(cache.stack("attn.hook_pattern"), np.float32)[:, 0]  # [L, H, T, T]
        rows = P - 1 + np.arange(len(gen))  # the query that produced generated token t
        j = pats[:, :, rows, :].argmax(-1)  # [L, H, steps]
        hit = (j >= a) & (j < b) & (prompt[0][np.clip(j, 0, P - 1)] == gen[None, None, :]) & (j < P)
        total += hit.sum(-1) / (b - a)
    return {"scores": total / max(counted, 1), "n_samples": counted, "recall": recalls}
