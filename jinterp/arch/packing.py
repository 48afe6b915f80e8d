"""Ragged rows in one product: under a vmap over cells, each cell computes only some of its rows (a
staircase sweep's cells start at different positions), and the batched call packs them all."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching


def packed(fn, x, w, rows):
    """fn(x, w), row by row over x's leading (batch, position) axes, called under a vmap over cells whose
    live rows are rows [cells, positions] (static numpy bool), w unbatched (weights): the batched call
    gathers every cell's live rows into one [rows, 1, ...] input, runs fn on it once and puts the
    results back (other rows come out as zeros). So cells whose work starts at different positions
    share one product of exactly the rows they need, however ragged. Unbatched it is fn(x, w)."""
    f = custom_batching.custom_vmap(fn)

    @f.def_vmap
    def _rule(axis_size, in_batched, x, w):
        xb, wb = in_batched[0], any(jax.tree.leaves(in_batched[1]))
        if not (xb or wb):
            return fn(x, w), False
        if wb or not xb or rows.shape != (axis_size, x.shape[2]) or rows.all():
            w_axes = jax.tree.map(lambda b: 0 if b else None, in_batched[1])
            return jax.vmap(fn, in_axes=(0 if xb else None, w_axes))(x, w), True
        C, B, S = x.shape[:3]
        live = np.broadcast_to(rows[:, None, :], (C, B, S)).reshape(-1)
        idx = np.flatnonzero(live)
        inv = np.full(live.size, len(idx), np.int32)
        inv[idx] = np.arange(len(idx), dtype=np.int32)
        y = fn(x.reshape((C * B * S, 1) + x.shape[3:])[idx], w)
        y = jnp.concatenate([y, jnp.zeros((1,) + y.shape[1:], y.dtype)])[inv]
        return y.reshape((C, B, S) + y.shape[2:]), True

    return f(x, w)
