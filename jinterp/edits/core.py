"""The Edit (site + where + op), the site context `At`, and `apply` / `validate`."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jinterp import sites as S
from jinterp.config import Config
from jinterp.edits import values
from jinterp.edits.ops import Op
from jinterp.edits.select import EditError, Where


@struct.dataclass
class Edit:
    """At `site` (static: it decides the program), write `op(x, at)` where `where` selects.

    The op's class and static fields are static too; every array (selectors, values) is a leaf,
    so a leading axis on the leaves is a sweep under `jax.vmap` and `jax.grad` reaches them."""

    site: str = struct.field(pytree_node=False)  # block-local or global TL name, e.g. "attn.hook_z"
    op: Op
    where: Where = struct.field(default_factory=Where)

    def apply(self, x, **ctx):
        """This edit applied to activation x at its site (see `apply`)."""
        return apply(self, x, **ctx)

    def __repr__(self):
        w = self.where.summary() if isinstance(self.where, Where) else repr(self.where)
        op = self.op.summary() if isinstance(self.op, Op) else repr(self.op)
        return f"Edit({op} at {self.site}" + (f", {w}" if w else "") + ")"


Edits = Sequence[Edit]


@dataclasses.dataclass(frozen=True)
class At:
    """Where an op runs: the site, its axes and their sizes, and (inside the forward) the layer and
    the absolute column of each row on the position axis. Ops read values through it."""

    site: str
    sizes: dict  # size of each layout axis ("pos": the rows present; "key": every key column)
    n_layers: int
    n_prompt: int  # the prompt length P: absolute positions are 0..P-1; negative ones count from P
    where: Where
    label: str = "edit"
    layer: Any = None  # layer index (traced); None at global sites and at validation
    cols: Any = None  # [m] absolute column of each row on the position axis

    @property
    def layout(self) -> tuple[str, ...]:
        return S.layout(self.site)

    @property
    def is_global(self) -> bool:
        return self.site in S.GLOBAL_SITES

    def fail(self, msg):
        raise EditError(f"{self.label}: {msg}")

    def read(self, v):
        """Value v aligned with the activation (see jinterp.edits.values)."""
        if not isinstance(v, values.Value):
            self.fail(f"ops read edits.Value objects (an array and the site axes it carries), got {type(v).__name__}")
        return values.read(v, self)

    def place(self, m, axes):
        """Reshape a mask over `axes` (a subsequence of the layout) to broadcast against x."""
        it = iter(m.shape)
        return m.reshape(tuple(next(it) if ax in axes else 1 for ax in self.layout))


def _values_in(op):
    return [v for v in jax.tree_util.tree_leaves(op, is_leaf=lambda a: isinstance(a, values.Value)) if isinstance(v, values.Value)]


def apply(e: Edit, x, *, layer, cols, n_prompt, n_keys, n_layers):
    """Apply one edit to activation x at a site with layout S.layout(e.site).

    layer: traced or static layer index (None for global sites); cols: absolute column index of
    each row on x's position axis [m]; n_prompt: prompt length (negative positions count from it);
    n_keys: length of the key axis for attention maps; n_layers: negative layers count from it.
    Value shapes are checked here too (statically, at trace time), so edits built inside a
    compiled sweep are held to the same rules as those validated at the boundary.
    """
    at = At(e.site, dict(zip(S.layout(e.site), x.shape)), n_layers, n_prompt, e.where,
            label=f"edit ({type(e.op).__name__} at {e.site})", layer=layer, cols=cols)
    e.op.check(at)
    new = jnp.broadcast_to(jnp.asarray(e.op(x, at)).astype(x.dtype), x.shape)
    m = e.where.mask(at)
    for v in _values_in(e.op):
        c = values.cover(v, at)
        if c is not None:
            m = c if m is None else m & c
    return new if m is None else jnp.where(m, new, x)


def site_shape(cfg: Config, site: str, batch: int, seq: int) -> dict[str, int]:
    sizes = dict(
        batch=batch, pos=seq, key=seq, d_model=cfg.d_model, head=cfg.n_heads, kv_head=cfg.n_kv_heads,
        d_head=cfg.d_head, d_mlp=cfg.d_mlp, expert=cfg.n_experts, one=1,
    )
    return {ax: sizes[ax] for ax in S.layout(site)}


def _arrays_in(op):
    """(field name, array) of the op's values and array fields (a basis, a splice's scales), one
    level deep: nested pytrees such as a dictionary's weights are checked where they are loaded."""
    out = []
    for f in dataclasses.fields(op):
        v = getattr(op, f.name)
        if isinstance(v, values.Value):
            out.append((f"{type(op).__name__}.{f.name}", v.array))
        elif isinstance(v, (jax.Array, np.ndarray)):
            out.append((f"{type(op).__name__}.{f.name}", v))
    return out


@jax.jit
def _count_nonfinite(a):
    return jnp.sum(~jnp.isfinite(a))


def check_finite(label: str, name: str, a) -> None:
    """Raise EditError if the concrete array `a` holds NaN or inf. Traced arrays (values built inside
    a compiled sweep or under jax.grad) have no values to check and pass."""
    if isinstance(a, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(a), jnp.inexact):
        return
    if isinstance(a, jax.Array):
        try:
            if not int(_count_nonfinite(a)):  # on the device: one scalar comes back, not the array
                return
        except jax.errors.ConcretizationTypeError:  # a constant inside someone's jit trace: checked where it was built
            return
    elif np.isfinite(a).all():
        return
    h = np.asarray(a, np.float32)
    bad = ~np.isfinite(h)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise EditError(
        f"{label}: {name} holds {int(bad.sum())} NaN or inf value(s) (of {h.size}), the first at index {first}. "
        "A steering vector or patch value computed from a NaN activation, a division by zero (e.g. normalising "
        "a zero vector), or an overflow in float16? Fix the value before building the edit."
    )


def validate(cfg: Config, edits, batch: int, seq: int) -> tuple[Edit, ...]:
    """Check edits against the model and the input shape; raise EditError naming the fix.

    Shapes are checked for traced edits too (under jit and vmap they are static); index ranges
    only where the selectors are concrete. Values, bases and other array fields of an op are
    checked for NaN and inf where they are concrete (one reduction each, on the device that holds
    them); values built inside a compiled sweep are traced and cannot be checked here: a NaN there
    shows as a NaN result, which the sweep driver reports by cell (engine.driver.sweep)."""
    if isinstance(edits, Edit):
        edits = (edits,)
    edits = tuple(edits or ())
    for i, e in enumerate(edits):
        if not isinstance(e, Edit):
            raise EditError(f"edits[{i}] is a {type(e).__name__}, not an Edit; build edits with jinterp.edits.patch/steer/...")
        label = f"edits[{i}] ({type(e.op).__name__} at {e.site})"
        if not isinstance(e.op, Op):
            raise EditError(f"{label}: op is a {type(e.op).__name__}, not an edits.Op")
        if not isinstance(e.where, Where):
            raise EditError(f"{label}: where is a {type(e.where).__name__}, not an edits.Where")
        if e.site in S.GLOBAL_SITES:
            if e.site not in S.global_sites(cfg):
                raise EditError(f"{label}: this {cfg.family} model has no site {e.site!r}")
        elif e.site not in S.block_sites(cfg):
            raise EditError(
                f"{label}: this {cfg.family} model has no site {e.site!r}." + S.suggest(e.site, S.block_sites(cfg))
            )
        at = At(e.site, site_shape(cfg, e.site, batch, seq), cfg.n_layers, seq, e.where, label=label)
        e.where.check(at)
        e.op.check(at)
        for name, a in _arrays_in(e.op):
            check_finite(label, name, a)
    return edits


def first_layer(e: Edit, n_layers: int):
    """Smallest layer an edit touches (traceable); 0 for global sites."""
    if e.site in S.GLOBAL_SITES:
        return jnp.int32(0)
    return e.where.first_layer(n_layers)


def first_col(e: Edit, n_prompt: int):
    """Smallest position whose activations an edit can change (traceable)."""
    return e.where.first_col(n_prompt)
