"""Where an edit acts: a `Where` of layers, positions, heads and key positions.

Each selector is None (everything), a list of indices, or a boolean mask:

    layers   int [k] | bool [n_layers]                 negative layers count from the last layer
    pos      int [k] | int [B, k] | bool [P] | bool [B, P]   negative positions count from the prompt's end
    heads    int [k] | bool [n_heads]                  query heads, or key/value heads at hook_k/v
    key_pos  like pos, on the key axis of attention maps

`[B, k]` and `[B, P]` select per example (rows: the batch, or 1). An entry of the site is
selected when it is selected on every axis; `member` evaluates one selector at a set of indices.

Decoding rows (`decoding`, static; set by `pos="decode"` or `pos="generated"` in the constructors):

    "decode"     rows at columns >= P - 1: the last prompt token and every generated token, i.e. the
                 queries that produce new tokens in `generate` (the Retrieval Head paper's masked
                 steps: prefill on prompt[:-1], decoding from the last prompt token)
    "generated"  rows at columns >= P: the generated tokens only

In a plain forward (no generation) "decode" is the last position and "generated" selects nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class EditError(ValueError):
    """An edit that does not fit the model or the input; the message says what to change."""


def selector(x) -> jax.Array | None:
    """A selector in canonical form: None, int32 [k] / [B, k] indices, or a boolean mask.

    Accepts None, an int, a range, a sequence of ints, a numpy/jax int array or a boolean mask
    (traced arrays too). Rejects a bare bool, an empty list and non-integer dtypes."""
    if x is None:
        return None
    if isinstance(x, range):
        x = list(x)
    if isinstance(x, (bool, np.bool_)):
        raise TypeError("a selector is None (all), an int, a list of ints or a boolean mask, not a bare bool")
    a = x if isinstance(x, jax.Array) else np.asarray(x)
    if a.size == 0:
        raise ValueError("an empty selector selects nothing; pass None for all, or a boolean mask of False")
    if a.dtype == bool:
        return jnp.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"selectors are ints, sequences of ints or boolean masks, got dtype {a.dtype}")
    return jnp.atleast_1d(jnp.asarray(a, jnp.int32))


def member(sel, idx, n):
    """Selector `sel` evaluated at indices idx [m] -> bool [m] (or [B, m] for a per-example selector).

    Negative indices in `sel` count from n."""
    if sel.dtype == jnp.bool_:
        return jnp.take(sel, idx, axis=-1, mode="fill", fill_value=False)
    sel = jnp.where(sel < 0, sel + n, sel)
    return (sel[..., :, None] == idx).any(axis=-2)


def concrete(a):
    """a as a numpy array, or None for a traced value (only shapes are known then)."""
    if a is None or isinstance(a, jax.core.Tracer):
        return None
    try:
        return np.asarray(a)
    except Exception:  # any other abstract value
        return None


DECODING = {"decode": 1, "generated": 0}  # rows at columns >= n_prompt - DECODING[kind]


@struct.dataclass
class Where:
    """The entries of a site an edit writes: the intersection of its selectors (None = all)."""

    layers: jax.Array | None = None
    pos: jax.Array | None = None
    heads: jax.Array | None = None
    key_pos: jax.Array | None = None
    decoding: str | None = struct.field(pytree_node=False, default=None)  # None, "decode" or "generated"

    # ------------------------------------------------------------------ inside the forward
    def mask(self, at):
        """Boolean mask broadcastable to the activation at site context `at`, or None (everything)."""
        lay = at.layout
        masks = []
        if self.layers is not None and at.layer is not None:
            if self.layers.dtype == jnp.bool_:
                masks.append(self.layers[at.layer])
            else:
                masks.append(member(self.layers, jnp.asarray(at.layer)[None], at.n_layers)[0])
        if self.pos is not None and "pos" in lay:
            pm = member(self.pos, at.cols, at.n_prompt)
            masks.append(at.place(pm, ("batch", "pos") if pm.ndim == 2 else ("pos",)))
        if self.decoding is not None and "pos" in lay:
            masks.append(at.place(at.cols >= at.n_prompt - DECODING[self.decoding], ("pos",)))
        if self.heads is not None:
            hax = "kv_head" if "kv_head" in lay else "head"
            masks.append(at.place(member(self.heads, jnp.arange(at.sizes[hax]), 0), (hax,)))
        if self.key_pos is not None and "key" in lay:
            km = member(self.key_pos, jnp.arange(at.sizes["key"]), at.n_prompt)
            masks.append(at.place(km, ("batch", "key") if km.ndim == 2 else ("key",)))
        if not masks:
            return None
        m = masks[0]
        for extra in masks[1:]:
            m = m & extra
        return m

    def slot(self, cols, n_prompt):
        """For a value with a "selected" axis: which entry j of `pos` each column is, [m] or [B, m]
        (0 for columns that are not selected; the mask leaves those alone)."""
        p = jnp.where(self.pos < 0, self.pos + n_prompt, self.pos)
        return jnp.argmax(p[..., :, None] == cols, axis=-2)

    def first_layer(self, n_layers):
        if self.layers is None:
            return jnp.int32(0)
        if self.layers.dtype == jnp.bool_:
            return jnp.argmax(self.layers).astype(jnp.int32)
        return jnp.min(jnp.where(self.layers < 0, self.layers + n_layers, self.layers)).astype(jnp.int32)

    def first_col(self, n_prompt):
        if self.decoding is not None:
            return jnp.int32(n_prompt - DECODING[self.decoding])  # pos, if given as well, can only narrow it
        if self.pos is None:
            return jnp.int32(0)
        p = self.pos
        if p.dtype == jnp.bool_:
            anyp = p.reshape(-1, p.shape[-1]).any(0)
            return jnp.where(anyp.any(), jnp.argmax(anyp), n_prompt).astype(jnp.int32)
        return jnp.min(jnp.where(p < 0, p + n_prompt, p)).astype(jnp.int32)

    # ------------------------------------------------------------------ at the boundary
    def check(self, at):
        """Shapes always (they are static under jit and vmap); index ranges when concrete."""
        lay = at.layout
        if at.is_global and self.layers is not None:
            at.fail(f"{at.site!r} is a global site; it takes no layers")
        if self.layers is not None and np.ndim(self.layers) != 1:
            at.fail(f"layers must be a list of layer indices or a [n_layers] mask, got shape {np.shape(self.layers)}")
        _check_sel(at, "layers", self.layers, at.n_layers, "layer", per_example=False)
        hax = "kv_head" if "kv_head" in lay else "head"
        if self.heads is not None and hax not in lay:
            at.fail(f"heads= given but {at.site} has no head axis")
        _check_sel(at, "heads", self.heads, at.sizes.get(hax, 0), "head", per_example=False)
        if self.pos is not None and "pos" not in lay:
            at.fail(f"pos= given but {at.site} has no position axis")
        _check_sel(at, "pos", self.pos, at.n_prompt, "position", per_example=True)
        if self.decoding is not None:
            if self.decoding not in DECODING:
                at.fail(f"decoding must be one of {sorted(DECODING)}, got {self.decoding!r}")
            if "pos" not in lay:
                at.fail(f"pos={self.decoding!r} given but {at.site} has no position axis")
        if self.key_pos is not None and "key" not in lay:
            at.fail(f"key_pos= given but {at.site} has no key axis")
        _check_sel(at, "key_pos", self.key_pos, at.n_prompt, "key position", per_example=True)

    def __repr__(self):
        return f"Where({self.summary() or 'all'})"

    def summary(self) -> str:
        parts = []
        for name in ("layers", "pos", "heads", "key_pos"):
            a = getattr(self, name)
            if a is not None:
                parts.append(f"{name}={describe(a)}")
        if self.decoding is not None:
            parts.append(f"pos={self.decoding!r}")
        return ", ".join(parts)


def describe(a) -> str:
    """'int32[3]': dtype and shape, for one-line reprs (works on tracers)."""
    return f"{getattr(a, 'dtype', type(a).__name__)}[{','.join(map(str, np.shape(a)))}]"


def _check_sel(at, name, sel, n, what, per_example):
    if sel is None:
        return
    batch = at.sizes.get("batch")
    shape = tuple(np.shape(sel))
    if len(shape) > (2 if per_example else 1):
        at.fail(f"{name} has shape {shape}; expected a list of indices" + (" or one per example [batch, k]" if per_example else ""))
    if len(shape) == 2 and shape[0] not in (1, batch):
        at.fail(f"per-example {name} has {shape[0]} rows but the batch has {batch}")
    if sel.dtype == jnp.bool_:
        if shape[-1] != n:
            at.fail(f"{name} mask has shape {shape}, expected [{n}]" + (f" or [{batch}, {n}]" if per_example else ""))
        return
    a = concrete(sel)
    if a is None:  # traced indices: the shape is checked, the range cannot be
        return
    lo = 0 if name == "heads" else -n
    if a.size and (a.min() < lo or a.max() >= n):
        bad = a[(a < lo) | (a >= n)].ravel()[0]
        at.fail(f"{what} {bad} is out of range; valid {name} are {lo}..{n - 1}")
