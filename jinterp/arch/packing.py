"""Ragged rows in one product: under a vmap over cells, each cell computes only some of its rows (a
staircase sweep's cells start at different positions), and the batched call packs them all."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching


@dataclasses.dataclass(frozen=True)
class DeviceRows:
    """The rows each cell computes when the cells are split over a mesh and every device runs the same
    program: `mine` [cells, rows] (traced) is this device's, `every` [devices, cells, rows] (static
    numpy) every device's, so a product can be sized for the busiest device. Indexes like `mine`."""

    mine: jax.Array
    every: np.ndarray

    def __getitem__(self, i):
        return DeviceRows(self.mine[i], self.every[(slice(None),) + (i if isinstance(i, tuple) else (i,))])

    @property
    def shape(self):
        return self.every.shape[1:]

    def all(self) -> bool:
        return bool(self.every.all())

    def most(self) -> int:
        """The most live entries any device has."""
        return int(self.every.reshape(len(self.every), -1).sum(1).max())


def window_rows(first_pos, cols, device_first_pos=None):
    """Which window rows (positions `cols`) each cell computes, from the cells' first positions: a static
    mask [cells, rows], or on a mesh (device_first_pos: this device's, traced; first_pos: every
    device's, static [devices, cells]) DeviceRows."""
    cols = np.asarray(cols)
    if device_first_pos is None:
        return cols[None] >= np.asarray(first_pos)[:, None]
    every = cols[None, None] >= np.asarray(first_pos)[:, :, None]
    return DeviceRows(cols[None] >= jnp.asarray(device_first_pos)[:, None], every)


def this_device(rows) -> jax.Array:
    """This device's mask of `rows` (window_rows) as an array."""
    return rows.mine if isinstance(rows, DeviceRows) else jnp.asarray(rows)


def rows_run(rows, batch: int) -> int:
    """How many rows a packed product runs: every live row (a static mask), or the busiest device's
    (DeviceRows: the others pad to it)."""
    return batch * (rows.most() if isinstance(rows, DeviceRows) else int(np.sum(rows)))


def packed(fn, x, w, rows):
    """fn(x, w), row by row over x's leading (batch, position) axes, called under a vmap over cells whose
    live rows are rows [cells, positions] (a static numpy bool, or DeviceRows on a mesh), w unbatched
    (weights): the batched call gathers every cell's live rows into one [rows, 1, ...] input, runs fn
    on it once and puts the results back (other rows come out as zeros). So cells whose work starts at
    different positions share one product of exactly the rows they need, however ragged. Unbatched it
    is fn(x, w)."""
    dynamic = isinstance(rows, DeviceRows)
    f = custom_batching.custom_vmap(lambda x, w, mine: fn(x, w))

    @f.def_vmap
    def _rule(axis_size, in_batched, x, w, mine):
        xb, wb = in_batched[0], any(jax.tree.leaves(in_batched[1]))
        if not (xb or wb):
            return fn(x, w), False
        if wb or not xb or in_batched[2] or rows.shape != (axis_size, x.shape[2]) or rows.all():
            w_axes = jax.tree.map(lambda b: 0 if b else None, in_batched[1])
            return jax.vmap(fn, in_axes=(0 if xb else None, w_axes))(x, w), True
        C, B, S = x.shape[:3]
        n = rows_run(rows, B)
        if dynamic:  # this device's rows, padded with row 0 (computed in vain) to the busiest device's count
            live = jnp.broadcast_to(mine[:, None, :], (C, B, S)).reshape(-1)
            idx = jnp.nonzero(live, size=n, fill_value=0)[0]
            inv = jnp.where(live, jnp.cumsum(live) - 1, n)
        else:
            live = np.broadcast_to(rows[:, None, :], (C, B, S)).reshape(-1)
            idx = np.flatnonzero(live)
            inv = np.full(live.size, n, np.int32)
            inv[idx] = np.arange(n, dtype=np.int32)
        y = fn(x.reshape((C * B * S, 1) + x.shape[3:])[idx], w)
        y = jnp.concatenate([y, jnp.zeros((1,) + y.shape[1:], y.dtype)])[inv]
        return y.reshape((C, B, S) + y.shape[2:]), True

    return f(x, w, rows.mine if dynamic else jnp.zeros((), bool))
