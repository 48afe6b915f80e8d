"""Metrics: JAX functions from logits [batch, pos, d_vocab] to a scalar (or one value per example).

They are frozen dataclasses holding their answer tokens as tuples, so they hash by value: a
sweep driven by an equal metric reuses the compiled program. Any hashable JAX function of the
logits works as a metric too.

Two optional attributes tell the sweep driver more: `reads(P, V)` -> (positions, token ids) of
the logits the metric reads (so only those are computed; `reads(metric, logits)` below finds
them by probing for metrics that do not say), and `axes`, the names of the axes the metric's
output adds to a result (("example",) for per-example metrics).
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
    ps = pos if isinstance(pos, tuple) else (pos,)
    bad = [int(p) for p in ps if not -P <= int(p) < P]
    if bad:
        raise ValueError(f"metric position {bad[0]} is outside the sequence of {P} positions (valid: "
                         f"{-P}..{P - 1}); pass pos= within the prompt")
    return tuple(sorted({int(p) % P for p in ps}))


def _pos(pos, batch):
    if np.ndim(pos) == 0:
        if not np.issubdtype(np.asarray(pos).dtype, np.integer):
            raise ValueError(f"pos must be an integer position (or one per example), got {pos!r}")
        return int(pos)
    a = np.asarray(pos)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"pos must be an int or one integer position per example, got {a.dtype} of shape {a.shape}")
    p = tuple(int(x) for x in a)
    if len(p) != batch:
        raise ValueError(f"per-example positions: got {len(p)} for a batch of {batch}")
    return p


def _token_ids(a, what: str) -> np.ndarray:
    """Integer, non-negative token ids (the vocabulary size is checked when logits are seen)."""
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be integer token ids, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{what} holds token id {int(a.min())}; ids are 0..d_vocab-1 (a negative id would "
                         "silently read from the end of the vocabulary)")
    return a.astype(np.int64)


def _check_reads(name, ids, pos, P, V):
    """Raise ValueError unless every answer id is in 0..V-1 and every position in -P..P-1."""
    if ids:
        hi = max(ids)
        if hi >= V:
            raise ValueError(f"{name}: answer token id {hi} is outside the vocabulary of {V} tokens (0..{V - 1}); "
                             "were the answers made by another model's tokenizer?")
    _positions(pos, P)


def _check_call(name, n_rows, pos, logits):
    """Check a metric against the logits it is given ([batch, pos, vocab]; static shapes, so this
    also holds under jit and vmap): answer ids, positions and the batch size."""
    shape = np.shape(logits)
    if len(shape) != 3:
        raise ValueError(f"{name} reads logits [batch, pos, d_vocab], got shape {tuple(shape)}")
    B, P, _ = shape
    if n_rows not in (1, B):
        raise ValueError(f"{name} has answers for {n_rows} examples but the logits have a batch of {B}; "
                         "give one answer row per example (or one for all)")
    if isinstance(pos, tuple) and len(pos) != B:
        raise ValueError(f"{name} has {len(pos)} per-example positions but the logits have a batch of {B}")


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
        ids = tuple(sorted(set(self.correct) | set(self.incorrect)))
        _check_reads("logit_diff", ids, self.pos, P, V)
        return _positions(self.pos, P), ids

    @property
    def axes(self):
        return ("example",) if self.per_example else ()

    def __call__(self, logits):
        _check_call("logit_diff", len(self.correct), self.pos, logits)
        self.reads(*np.shape(logits)[1:])
        lg = _at(logits, self.pos).astype(jnp.float32)
        b = jnp.arange(lg.shape[0])
        d = lg[b, jnp.asarray(self.correct)] - lg[b, jnp.asarray(self.incorrect)]
        return d if self.per_example else d.mean()


def logit_diff(answer_tokens, pos=-1, per_example: bool = False) -> LogitDiff:
    """answer_tokens: [batch, 2] (correct, incorrect) ids; pos: int or one position per example."""
    a = np.asarray(answer_tokens)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"answer_tokens must be [batch, 2] (correct, incorrect), got shape {a.shape}")
    a = _token_ids(a, "answer_tokens")
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

    @property
    def axes(self):
        return getattr(self.metric, "axes", ())


def normalized(metric, clean_logits, corrupted_logits) -> Normalized:
    clean = float(np.mean(np.asarray(metric(jnp.asarray(clean_logits)))))
    corrupted = float(np.mean(np.asarray(metric(jnp.asarray(corrupted_logits)))))
    for name, v in (("clean", clean), ("corrupted", corrupted)):
        if not np.isfinite(v):
            raise ValueError(f"the metric scores the {name} logits {v}; the normalised metric would be NaN "
                             f"everywhere. Check the {name} logits (and the metric) for NaN or inf")
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
        _check_reads("log_prob", tuple(set(self.tokens)), self.pos, P, V)
        return _positions(self.pos, P), None  # the normalisation reads every token

    @property
    def axes(self):
        return ("example",) if self.per_example else ()

    def __call__(self, logits):
        _check_call("log_prob", len(self.tokens), self.pos, logits)
        self.reads(*np.shape(logits)[1:])
        lp = jax.nn.log_softmax(jnp.asarray(_at(logits, self.pos), jnp.float32), axis=-1)
        v = lp[jnp.arange(lp.shape[0]), jnp.asarray(self.tokens)]
        return v if self.per_example else v.mean()


def log_prob(tokens, pos=-1, per_example: bool = False) -> LogProb:
    t = np.atleast_1d(np.asarray(tokens))
    if t.ndim != 1:
        raise ValueError(f"tokens must be one token id per example (or one id for all), got shape {t.shape}")
    t = _token_ids(t, "tokens")
    return LogProb(tuple(t.tolist()), _pos(pos, len(t)), per_example)


# ----------------------------------------------------------------------------------------
# what a metric reads


def reads(metric, logits) -> tuple[tuple | None, tuple | None]:
    """Which positions and which token ids of logits [B, P, V] the metric reads: (positions, vocab),
    each a sorted tuple or None (all / unknown). Computing logits only there is exact only if the
    answer is right, so this errs towards None.

    A metric that declares `reads(P, V)` (jinterp.metrics do) is taken at its word. Otherwise the
    candidates are the entries with a non-zero gradient, confirmed by re-running the metric with
    every other entry replaced by NaN and by random values at several scales: each must leave the
    result unchanged. A gradient that is zero everywhere (argmax, accuracy) means "all".
    """
    logits = jnp.asarray(logits, jnp.float32)
    _, P, V = logits.shape
    if hasattr(metric, "reads"):
        return metric.reads(P, V)
    if hasattr(metric, "inner"):  # an affine rescaling (metrics.Normalized) reads what its metric reads
        return reads(metric.inner, logits)
    try:
        ref = np.asarray(metric(logits))
        g = np.abs(np.asarray(jax.grad(lambda lg: jnp.sum(jnp.asarray(metric(lg), jnp.float32)))(logits)))
    except Exception:
        return None, None
    pos = np.nonzero(g.sum((0, 2)) > 0)[0]
    voc = np.nonzero(g.sum((0, 1)) > 0)[0]
    if pos.size == 0:
        return None, None
    rng = np.random.default_rng(0)

    def confirmed(keep_pos, keep_voc):
        kp, kv = np.zeros(P, bool), np.zeros(V, bool)
        kp[keep_pos], kv[keep_voc] = True, True
        keep = jnp.asarray(kp)[None, :, None] & jnp.asarray(kv)[None, None, :]
        fills = [jnp.nan] + [jnp.asarray(rng.standard_normal(logits.shape) * sc, jnp.float32) for sc in (1.0, 30.0, 1e4)]
        for fill in fills:
            try:
                out = np.asarray(metric(jnp.where(keep, logits, fill)))
            except Exception:
                return False
            if not (np.all(np.isfinite(out)) and np.allclose(out, ref, rtol=1e-6, atol=1e-6)):
                return False
        return True

    as_tuple = lambda a, n: None if len(a) == n else tuple(int(i) for i in a)
    if voc.size and confirmed(pos, voc):
        return as_tuple(pos, P), as_tuple(voc, V)
    if confirmed(pos, np.arange(V)):
        return as_tuple(pos, P), None
    return None, None
