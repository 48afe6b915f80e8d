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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jinterp.results import Labelled, Results, axis_labels


def _heads(model, values, name):
    return Labelled(np.asarray(values), ("layer", "head"), (axis_labels(model, "layer"), axis_labels(model, "head")), name=name)


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


def head_scores(model, tokens, kinds=("previous_token", "duplicate_token", "induction"), attention_mask=None) -> Results:
    """Results {kind: Labelled [layer, head]} for each detector, from one forward pass."""
    _, cache = model.run_with_cache(tokens, names=lambda n: n.endswith("attn.hook_pattern"), attention_mask=attention_mask)
    pats = cache.stack("attn.hook_pattern").astype(jnp.float32)
    toks = np.asarray(tokens)
    return Results({k: _heads(model, score_patterns(pats, MASKS[k](toks), attention_mask), f"{k} score") for k in kinds},
                   name="head detectors")


def rouge1_recall(generated, reference) -> float:
    """Unigram recall of reference tokens in the generation (counts clipped), as in ROUGE-1."""
    from collections import Counter

    g, r = Counter(np.asarray(generated).tolist()), Counter(np.asarray(reference).tolist())
    return sum(min(n, g[t]) for t, n in r.items()) / max(1, sum(r.values()))


def _left_pad(prompts, pad_id=0):
    """Ragged prompts -> (int32 tokens [N, P] left-padded, bool mask [N, P], pad count per row [N])."""
    lens = np.array([len(p) for p in prompts])
    P = int(lens.max())
    toks = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        toks[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    return toks, mask, P - lens


@functools.partial(jax.jit, static_argnames=("cfg", "P"))
def _copy_hits(params, seq, mask, gen, a, b, *, cfg, P):
    """Teacher-forced forward over prompt + generation; for each decoding step g (the query at column
    P - 1 + g) and head: does the key it attends to most lie in [a, b) and hold the token generated
    at that step? -> bool [L, B, H, G]."""
    from jinterp import arch

    _, acts = arch.forward(params, seq, mask, (), cfg=cfg, record={"attn.hook_pattern": tuple(range(cfg.n_layers))})
    rows = acts["attn.hook_pattern"][:, :, :, P - 1:, :]  # [L, B, H, G, T]
    j = jnp.argmax(rows, axis=-1)  # first maximum, like torch.topk(1) on a row without ties
    held = seq[jnp.arange(seq.shape[0])[None, :, None, None], j]  # the token at that key
    inside = (j >= a[None, :, None, None]) & (j < b[None, :, None, None])
    return inside & (held == gen[None, :, None, :])


def retrieval_scores(
    model,
    prompts,
    needle_spans,
    max_new_tokens: int = 50,
    stop_token: int | None = None,
    min_recall: float = 0.5,
    *,
    memory_mb: int = 256,
    return_hits: bool = False,
) -> Results:
    """Retrieval score of every head (Wu et al. 2024; methods.md section 4), batched.

    Each prompt (token ids, one row per sample; lengths may differ) holds a needle at prompt[a:b]
    (`needle_spans`, one (a, b) per sample). The model decodes greedily; at each step the head
    "copy-pastes" when the key its current query attends to most (argmax of the attention row)
    lies inside the needle and holds the token just generated, and then scores 1 / (b - a) (the
    paper's code: a repeated token can score twice). Decoding stops after `stop_token` (that step is
    scored). Only samples whose generation recalls more than `min_recall` of the needle's tokens
    (ROUGE-1 on token ids, stop token excluded) count; a head's score is its mean over them.

    Two compiled calls over the whole batch: greedy `generate` on the left-padded prompts, then one
    teacher-forced forward over prompt + generation that records attention patterns. The rows of
    incremental decoding equal those of the teacher-forced pass (causal attention), and only the
    argmax key of each decoding row leaves the device. The forward holds [n_layers, chunk,
    n_heads, T, T] attention maps, so the batch runs in chunks of about `memory_mb` (fine for the
    short haystacks of small models, not for 50K-token contexts).
    Returns Results {"scores": Labelled [layer, head], "n_samples": counted samples,
    "recall": per sample, "n_steps": scored steps per sample, "generated": [N, max_new_tokens]}
    (and "hits": per-sample scores [N, layer, head] with return_hits).
    """
    cfg = model.config
    L, H = cfg.n_layers, cfg.n_heads
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    spans = np.asarray(needle_spans, np.int64).reshape(-1, 2)
    if len(prompts) == 0 or len(spans) != len(prompts):
        raise ValueError(f"need one needle span per prompt; got {len(prompts)} prompts and {len(spans)} spans")
    if ((spans[:, 0] < 0) | (spans[:, 1] <= spans[:, 0]) | (spans[:, 1] > [len(p) for p in prompts])).any():
        raise ValueError("each needle span (a, b) must satisfy 0 <= a < b <= len(prompt)")
    pad_id = 0
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        pad_id = model.tokenizer.pad_token_id
    toks, mask, pad = _left_pad(prompts, pad_id)
    N, P = toks.shape
    G = int(max_new_tokens)
    gen = np.asarray(model.generate(toks, G, attention_mask=mask, stop_at_eos=False))[:, P:]  # [N, G]
    n_steps = np.full(N, G)
    if stop_token is not None:
        is_stop = gen == stop_token
        n_steps = np.where(is_stop.any(1), is_stop.argmax(1) + 1, G)  # the stop step is scored
    recalls = np.array([
        rouge1_recall(g[:n][g[:n] != stop_token] if stop_token is not None else g[:n], p[a:b])
        for g, n, p, (a, b) in zip(gen, n_steps, prompts, spans)
    ])
    counted = recalls > min_recall
    # teacher-forced pass over prompt + generation (the last generated token is never a query)
    seq = np.concatenate([toks, gen[:, :-1]], 1)
    smask = np.concatenate([mask, np.ones((N, G - 1), bool)], 1)
    T = seq.shape[1]
    chunk = int(max(1, min(N, (memory_mb << 20) // max(1, L * H * T * T * 4))))
    n_pad = -N % chunk
    idx = np.concatenate([np.arange(N), np.zeros(n_pad, int)])  # pad the last chunk: one compiled shape
    a_pad, b_pad = spans[:, 0] + pad, spans[:, 1] + pad
    per = np.zeros((N, L, H))
    step_ok = np.arange(G)[None] < n_steps[:, None]  # [N, G]
    for c in range(0, len(idx), chunk):
        r = idx[c:c + chunk]
        hit = np.asarray(_copy_hits(model.params, jnp.asarray(seq[r]), jnp.asarray(smask[r]), jnp.asarray(gen[r]),
                                    jnp.asarray(a_pad[r]), jnp.asarray(b_pad[r]), cfg=cfg, P=P))  # [L, c, H, G]
        keep = slice(0, max(0, min(chunk, N - c)))
        hit = hit[:, keep] & step_ok[r[keep]][None, :, None, :]
        per[r[keep]] = hit.sum(-1).transpose(1, 0, 2) / (spans[r[keep], 1] - spans[r[keep], 0])[:, None, None]
    total = (per * counted[:, None, None]).sum(0)
    out = dict(scores=_heads(model, total / max(int(counted.sum()), 1), "retrieval score"), n_samples=int(counted.sum()),
               recall=recalls, n_steps=n_steps, generated=gen)
    if return_hits:
        out["hits"] = per
    return Results(out, name="retrieval heads")
