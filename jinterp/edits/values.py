"""What shape a value has, and how it is read at a site.

A `Value` is an array plus the names of the site axes it carries, in the site's layout order
(`jinterp.sites.layout`). Nothing is inferred from lengths: the names say what each axis means.

    "layer"      first, block sites only: layer l reads value[l]             size n_layers (or 1)
    "pos"        the full sequence: entry p is absolute position p            size P (the prompt length, or 1)
    "selected"   one entry per selected position, in the order of `pos=`      size k of pos=[k] / [B, k] (or 1)
    "key"        the key axis of attention maps, absolute key positions       size P or n_keys (or 1)
    any other    the site's axis of that name ("batch", "head", "d_model", ...)   its size (or 1)

An axis of size 1 broadcasts, as in numpy; an axis the value does not name broadcasts too. A
"pos" axis covers the prompt: positions past it (tokens made by `generate`) are left unchanged,
while a value without a "pos" axis (or with one of size 1) applies to generated tokens as well.
"selected" needs `pos=` as indices (not a mask, not None); with pos=[B, k] entry [b, j] goes to
position pos[b, j].

`Value.of(site, array, per_layer=..., pos_axis=...)` names the axes of an array right-aligned
with the site's layout, as numpy broadcasting would align it: per_layer=True adds a leading
"layer" axis, pos_axis="selected" names the position axis "selected" instead of "pos".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jinterp import sites as S
from jinterp.edits.select import EditError, describe

POS_AXES = ("full", "selected")


@struct.dataclass
class Value:
    """An array and the site axes it carries (see the module docstring)."""

    array: jax.Array
    axes: tuple[str, ...] = struct.field(pytree_node=False)

    @classmethod
    def of(cls, site: str, array, *, per_layer: bool = False, pos_axis: str = "full") -> "Value":
        """Name the axes of `array` right-aligned with the layout of `site` (a local name)."""
        if pos_axis not in POS_AXES:
            raise EditError(f"pos_axis must be one of {POS_AXES}, got {pos_axis!r}")
        a = array if isinstance(array, jax.Array) else jnp.asarray(array)
        lay = S.layout(site)
        if per_layer and site in S.GLOBAL_SITES:
            raise EditError(f"{site!r} is a global site; its value has no layer axis (per_layer=False)")
        nd = a.ndim - bool(per_layer)
        if nd < 0:
            raise EditError(f"a per_layer value needs a leading layer axis, got a scalar")
        if nd > len(lay):
            raise EditError(f"value has shape {tuple(a.shape)}, more axes than the site {site} {list(lay)}")
        axes = lay[len(lay) - nd:]
        if pos_axis == "selected":
            if "pos" not in axes:
                raise EditError(f"pos_axis='selected' but a value of shape {tuple(a.shape)} has no position axis at {site} {list(lay)}")
            axes = tuple("selected" if ax == "pos" else ax for ax in axes)
        return cls(a, ("layer",) * bool(per_layer) + tuple(axes))

    def __repr__(self):
        return f"{describe(self.array)}({','.join(self.axes)})"


def check(name: str, v, at) -> None:
    """Raise EditError (via at.fail) unless Value v fits the site context `at`. Shapes only."""
    if not isinstance(v, Value):
        at.fail(f"{name} must be an edits.Value (an array and the site axes it carries), got {type(v).__name__}; "
                f"make one with edits.Value.of(site, array)")
    lay = at.layout
    shape = tuple(np.shape(v.array))
    axes = tuple(v.axes)
    if len(axes) != len(shape):
        at.fail(f"{name} has shape {shape} but declares {len(axes)} axes {list(axes)}")
    body = axes[1:] if axes[:1] == ("layer",) else axes
    if "layer" in body:
        at.fail(f"{name}: 'layer' can only be a value's first axis")
    if axes[:1] == ("layer",) and at.is_global:
        at.fail(f"{at.site!r} is a global site; its value has no layer axis (per_layer=False)")
    if "selected" in body and "pos" in body:
        at.fail(f"{name} has both a 'pos' and a 'selected' axis; it can have one")
    names = ["pos" if ax == "selected" else ax for ax in body]
    unknown = [ax for ax in names if ax not in lay]
    if unknown:
        at.fail(f"{name} names axes {unknown} that {at.site} does not have; its axes are {list(lay)}")
    if [lay.index(ax) for ax in names] != sorted(lay.index(ax) for ax in names) or len(set(names)) != len(names):
        at.fail(f"{name} axes {list(axes)} must follow the site's layout order {list(lay)}")
    if "selected" in body:
        p = at.where.pos
        if p is None or p.dtype == jnp.bool_:
            at.fail(f"{name} has a 'selected' axis, which needs pos= as a list of position indices")
    for ax, got in zip(axes, shape):
        ok = {1, _size(ax, at)}
        if ax == "key":
            ok.add(at.n_prompt)
        if got not in ok:
            want = " or ".join(str(n) for n in sorted(ok, reverse=True))
            at.fail(
                f"{name} has shape {shape} with axes {list(axes)}, but the site is "
                f"{[at.sizes[a] for a in lay]} ({', '.join(lay)}); axis {ax!r} must be {want}"
                + (" (e.g. clean and corrupted inputs of different shapes?)" if ax in ("pos", "batch", "key") else "")
            )


def _size(ax, at):
    if ax == "layer":
        return at.n_layers
    if ax == "pos":
        return at.n_prompt
    if ax == "selected":
        return at.where.pos.shape[-1]
    return at.sizes[ax]


def read(v: Value, at):
    """v's array aligned with the activation at site context `at`: the layer row taken, positions
    gathered at the columns being computed, and every other axis in place (size 1 where absent)."""
    a = v.array
    axes = list(v.axes)
    if axes[:1] == ["layer"]:
        a = a[0] if a.shape[0] == 1 else a[at.layer]
        axes = axes[1:]
    lay = at.layout
    name = lambda ax: "pos" if ax == "selected" else ax
    present = {name(ax): ax for ax in axes}
    a = a.reshape(tuple(a.shape[axes.index(present[ax])] if ax in present else 1 for ax in lay))
    if "pos" in present and a.shape[lay.index("pos")] > 1:
        ax = lay.index("pos")
        if present["pos"] == "pos":
            a = jnp.take(a, at.cols, axis=ax, mode="clip")  # columns past the prompt: masked by `cover`
        else:
            a = _take_slots(a, at.where.slot(at.cols, at.n_prompt), ax)
    if "key" in present and a.shape[lay.index("key")] not in (1, at.sizes["key"]):
        a = jnp.take(a, jnp.arange(at.sizes["key"]), axis=lay.index("key"), mode="clip")
    return a


def cover(v: Value, at):
    """Mask of the entries v covers (broadcastable to the activation), or None for all: a "pos"
    axis covers the prompt's columns, a prompt-length "key" axis the prompt's keys."""
    m = None
    shape = dict(zip(v.axes, np.shape(v.array)))
    if shape.get("pos", 1) > 1:
        m = at.place(at.cols < shape["pos"], ("pos",))
    if "key" in shape and shape["key"] not in (1, at.sizes["key"]):
        k = at.place(jnp.arange(at.sizes["key"]) < shape["key"], ("key",))
        m = k if m is None else m & k
    return m


def _take_slots(a, idx, ax):
    """a[..., idx, ...] along axis ax, with idx [m] or per example [B, m] (batch is axis 0)."""
    if idx.ndim == 1 or idx.shape[0] == 1:
        return jnp.take(a, idx.reshape(-1), axis=ax, mode="clip")
    a = jnp.broadcast_to(a, (idx.shape[0],) + a.shape[1:])
    return jax.vmap(lambda ab, ib: jnp.take(ab, ib, axis=ax - 1, mode="clip"))(a, idx)
