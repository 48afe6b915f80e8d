"""Token rows for dictionary training and evaluation: batches with optional attention masks, and
which positions count.

A batch is an int array [B, P] of token ids (every position real) or a pair (tokens [B, P],
attention_mask [B, P]) with 1/True on real tokens and 0/False on padding (right- or left-padded
rows of different lengths). Padded positions are left out of every loss, statistic and metric;
the model's forward sees the mask (its positions follow the real tokens, padded keys are masked).

    keep(mask, skip_bos)   the positions that count: real tokens, and with skip_bos not the first
                           real token of each row (BOS; position 0 when rows are right-padded)
"""

from __future__ import annotations

import jax
import numpy as np


def split(batch, what: str = "batch"):
    """(tokens ndarray [B, P], bool mask [B, P] or None) from tokens or a (tokens, attention_mask) pair.
    Raises ValueError for a mask whose shape is not the tokens' or whose entries are not 0/1."""
    pair = isinstance(batch, (tuple, list)) and len(batch) > 0 and np.ndim(batch[0]) == 2
    if pair and len(batch) == 2:
        tokens, mask = batch
    elif pair:
        raise ValueError(f"a {what} is a token array [B, P] or a pair (tokens [B, P], attention_mask [B, P]); "
                         f"got a tuple of {len(batch)} entries")
    else:
        tokens, mask = batch, None
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, pos], got shape {tokens.shape}")
    return tokens, check_mask(mask, tokens.shape, what)


def check_mask(mask, shape, what: str = "batch"):
    """mask as a bool ndarray of `shape`, or None; ValueError naming the problem otherwise."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"attention_mask has shape {m.shape} but the {what}'s tokens have shape {tuple(shape)}; "
                         "give one entry per token: 1 for a real token, 0 for padding")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"attention_mask entries must be 0/1 (or bool), got values {np.unique(m)[:5].tolist()}")
        m = m.astype(bool)
    if not m.any(axis=1).all():
        raise ValueError(f"attention_mask has a row with no real tokens (row {int(np.argmin(m.any(axis=1)))}); "
                         "drop that row")
    return m


def keep(mask, shape, skip_bos: bool) -> np.ndarray:
    """bool [B, P]: the positions that count (module docstring); mask None means every position is real."""
    m = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    return m & (np.cumsum(m, axis=1) > 1) if skip_bos else m


def prepare(model, tokens, mask, *, skip_bos: bool):
    """(int32 tokens, bool mask (all True when None), keep) as jax arrays, validated by the model."""
    import jax.numpy as jnp

    toks, m = model.prepare_inputs(tokens, mask)
    kp = keep(mask, toks.shape, skip_bos)
    if not kp.any():
        raise ValueError("a batch has no tokens to train on"
                         + (" (with skip_bos=True each row needs 2 real tokens for one to count)" if skip_bos else ""))
    return toks, (jnp.ones(toks.shape, bool) if m is None else m), jnp.asarray(kp)


def iterate(token_batches, batch_size, seed, attention_mask=None):
    """An iterator of (tokens [B, P], mask or None) from a generator/iterable of batches, a
    callable(rng) -> batch (rng = numpy default_rng(seed)), or an array [N, P] (with its
    `attention_mask` [N, P]) cycled through in shuffled minibatches of `batch_size`."""
    if isinstance(token_batches, (np.ndarray, jax.Array)):
        arr = np.asarray(token_batches)
        if arr.ndim != 2:
            raise ValueError(f"a token array must be [N, pos], got shape {arr.shape}")
        mask = check_mask(attention_mask, arr.shape, "token array")
        bs = batch_size or min(len(arr), 32)
        if bs > len(arr):
            raise ValueError(f"batch_size={bs} is larger than the {len(arr)} rows of tokens given")
        return _cycle(arr, mask, bs, seed)
    if attention_mask is not None:
        raise ValueError("attention_mask= goes with a token array; a generator or callable gives "
                         "(tokens, attention_mask) pairs instead")
    if callable(token_batches) and not hasattr(token_batches, "__iter__"):
        return _drawn(token_batches, seed)
    return (split(b) for b in token_batches)


def _drawn(fn, seed):
    rng = np.random.default_rng(seed)
    while True:
        yield split(fn(rng))


def _cycle(arr, mask, bs, seed):
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(len(arr))
        for i in range(0, len(arr) - bs + 1, bs):
            idx = perm[i:i + bs]
            yield arr[idx], None if mask is None else mask[idx]
