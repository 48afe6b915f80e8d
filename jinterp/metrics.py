"""Metrics: JAX functions from logits [batch, pos, d_vocab] to a scalar (or one value per example).

They are frozen dataclasses holding their answer tokens as tuples, so they hash by value: a
sweep driven by an equal metric reuses the compiled program. Any hashable JAX function of the
logits works as a metric too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _at(logits, pos):
    """Logits at one position, or at a per-example position tuple -> [B, V]."""
    if isinstance(pos, tuple):
        return logits[jnp.arange(logits.shape[0]), jnp.asarray(pos)]
    return logits[:, pos]


def _positions(pos, P) -> tuple:
    return tuple(sorted({int(p) % P for p in (pos if isinstance(pos, tuple) else (pos,))}))


def _pos(pos, batch):
    if np.ndim(pos) == 0:
        return int(pos)
    p = tuple(int(x) for x in np.asarray(pos))
    if len(p) != batch:
        raise ValueError(f"per-example positions: got {len(p)} for a batch of {batch}")
    return p


@dataclasses.dataclass(frozen=True)
class LogitDiff:
    """logit[correct] - logit[incorrect] at `pos` (default the last position), averaged over the batch
    (per_example=True: one value per example)."""

    correct: tuple
    incorrect: tuple
    pos: int | tuple = -1
    per_example: bool = False

    def reads(self, P, V):
        """(positions, token ids) of the logits this metric reads, for the sweep driver."""
        return _positions(self.pos, P), tuple(sorted(set(self.correct) | set(self.incorrect)))

    def __call__(self, logits):
        lg = _at(logits, self.pos).astype(jnp.float32)
        b = jnp.arange(lg.shape[0])
        d = lg[b, jnp.asarray(self.correct)] - lg[b, jnp.asarray(self.incorrect)]
        return d if self.per_example else d.mean()


def logit_diff(answer_tokens, pos=-1, per_example: bool = False) -> LogitDiff:
    """answer_tokens: [batch, 2] (correct, incorrect) ids; pos: int or one position per example."""
    a = np.asarray(answer_tokens)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"answer_tokens must be [batch, 2] (correct, incorrect), got shape {a.shape}")
    return LogitDiff(tuple(a[:, 0].tolist()), tuple(a[:, 1].tolist()), _pos(pos, len(a)), per_example)


@dataclasses.dataclass(frozen=True)
class Normalized:
    """(metric - corrupted) / (clean - corrupted): 0 at the corrupted run, 1 at the clean run."""

    metric: Callable
    clean: float
    corrupted: float

    def __call__(self, logits):
        return (self.metric(logits) - self.corrupted) / (self.clean - self.corrupted)

    @property
    def inner(self):
        return self.metric


def normalized(metric, clean_logits, corrupted_logits) -> Normalized:
    clean = float(np.mean(np.asarray(metric(jnp.asarray(clean_logits)))))
    corrupted = float(np.mean(np.asarray(metric(jnp.asarray(corrupted_logits)))))
    if abs(clean - corrupted) < 1e-12:
        raise ValueError(f"clean and corrupted runs score the same ({clean}); the normalised metric is undefined")
    return Normalized(metric, clean, corrupted)


def normalized_logit_diff(answer_tokens, clean_logits, corrupted_logits, pos=-1) -> Normalized:
    """TransformerLens's IOI metric: logit difference rescaled to 0 (corrupted) .. 1 (clean)."""
    return normalized(logit_diff(answer_tokens, pos), clean_logits, corrupted_logits)


@dataclasses.dataclass(frozen=True)
class LogProb:
    """log p(token) at `pos`, averaged over the batch (per_example=True: one value per example)."""

    tokens: tuple
    pos: int | tuple = -1
    per_example: bool = False

    def reads(self, P, V):
        return _positions(self.pos, P), None  # the normalisation reads every token

    def __call__(self, logits):
        lp = jax.nn.log_softmax(jnp.asarray(_at(logits, self.pos), jnp.float32), axis=-1)
        v = lp[jnp.arange(lp.shape[0]), jnp.asarray(self.tokens)]
        return v if self.per_example else v.mean()


def log_prob(tokens, pos=-1, per_example: bool = False) -> LogProb:
    t = np.atleast_1d(np.asarray(tokens))
    return LogProb(tuple(t.tolist()), _pos(pos, len(t)), per_example)
