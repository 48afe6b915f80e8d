"""What an edit does: one small pytree class per op.

The protocol (optax-style: one method, composed by the caller)::

    @struct.dataclass
    class MyOp(Op):
        value: Value                      # array fields are leaves: vmap, grad, jit see them
        def __call__(self, x, at):        # x: the activation at the site, in its layout
            return ...                    # the new activation, broadcastable to x

`Edit` writes `new` only where its `Where` selects (`where(mask, new, x)`), so an op computes
the whole candidate and never deals with selection. `at` is the site context (`core.At`):
`at.read(v)` reads a `Value` aligned with x (layer row, positions at the computed columns),
`at.layout` / `at.sizes` name x's axes, `at.layer` is the layer index (traced; None at global
sites). `check(self, at)` validates the op against the site (shapes only: values may be traced);
the default checks every `Value` field, so most ops never override it. `sites`, when set,
restricts the sites the op may target.

    Set(v):             new = v                                  patching, ablation
    SetWhere(v, m):     new = v where m > 0.5, else x            ablating a set of heads given as data
    Add(v):             new = x + v                              steering
    Scale(v):           new = x * v
    Project(v, B):      new = x + ((v - x) @ B) @ B.T            subspace patch; B [d, k] orthonormal columns
    Knockout():         new = finfo(dtype).min                   attention knockout, on attention scores
    Uniform():          new = 0 on allowed keys                  uniform attention (Retrieval Head masking),
                        (masked keys stay finfo.min)             on attention scores
    StopGradient():     new = stop_gradient(x)                   same forward value; no gradient flows
                                                                 through the selected entries
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jinterp.edits.select import describe
from jinterp.edits.values import Value, check as check_value


class Op:
    """Base of the edit ops; subclasses are `flax.struct.dataclass`es defining `__call__(x, at)`."""

    sites: ClassVar[tuple[str, ...] | None] = None  # the sites this op may target; None = any

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "__repr__" not in cls.__dict__:  # set before @dataclass runs, which then keeps it
            cls.__repr__ = Op.summary

    def __call__(self, x, at):
        raise NotImplementedError

    def check(self, at) -> None:
        """Validate against the site (shapes only). Default: every Value field fits the site; a
        field without a default is not None."""
        if self.sites is not None and at.site not in self.sites:
            at.fail(f"{type(self).__name__} applies to {', '.join(self.sites)} only")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                at.fail(f"{type(self).__name__} needs a {f.name}")
            if isinstance(v, Value):
                check_value(f"{type(self).__name__}.{f.name}", v, at)

    def summary(self) -> str:
        """'Set(value=float32[3,9,64](batch,pos,d_model))': for one-line reprs."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                parts.append(f"{f.name}={v!r}" if isinstance(v, Value) or not hasattr(v, "shape") else f"{f.name}={describe(v)}")
        return f"{type(self).__name__}({', '.join(parts)})"


@struct.dataclass
class Set(Op):
    value: Value

    def __call__(self, x, at):
        return at.read(self.value)


@struct.dataclass
class SetWhere(Op):
    """Set where a data mask holds: the mask (e.g. a [layer, head] set of heads) is an array leaf, so
    every set shares one compiled program and a sweep can vmap over sets."""

    value: Value
    mask: Value

    def __call__(self, x, at):
        return jnp.where(at.read(self.mask) > 0.5, at.read(self.value), x)


@struct.dataclass
class Add(Op):
    value: Value

    def __call__(self, x, at):
        return x + at.read(self.value)


@struct.dataclass
class Scale(Op):
    value: Value

    def __call__(self, x, at):
        return x * at.read(self.value)


@struct.dataclass
class Project(Op):
    """Replace the component of x in span(basis) by the value's: basis [d, k], orthonormal columns."""

    value: Value
    basis: jax.Array

    def __call__(self, x, at):
        b = self.basis.astype(x.dtype)
        return x + ((at.read(self.value) - x) @ b) @ b.T

    def check(self, at):
        super().check(at)
        shape = tuple(np.shape(self.basis))
        d = at.sizes[at.layout[-1]]
        if len(shape) != 2:
            at.fail(f"Project needs a basis [d, k] with orthonormal columns, got shape {shape}")
        if shape[0] != d:
            at.fail(f"basis has {shape[0]} rows but the site's last axis ({at.layout[-1]}) has size {d}")


@struct.dataclass
class Knockout(Op):
    """Attention knockout: the selected scores become the dtype's minimum, so softmax gives ~0."""

    sites: ClassVar = ("attn.hook_attn_scores",)

    def __call__(self, x, at):
        return jnp.full_like(x, jnp.finfo(x.dtype).min)


@struct.dataclass
class Uniform(Op):
    """Uniform attention, as the Retrieval Head paper masks a head (Wu et al. 2024; methods.md §4):
    the pre-softmax scores of the keys the query may attend to become 0, so softmax spreads the
    query evenly over them and the head outputs the mean of their values (not zero ablation).
    Keys already removed (causal mask, padding, sliding window, an earlier Knockout) hold
    finfo(dtype).min and stay removed. The paper masks decoding steps only: use pos="decode"."""

    sites: ClassVar = ("attn.hook_attn_scores",)

    def __call__(self, x, at):
        return jnp.where(x <= jnp.finfo(x.dtype).min, x, jnp.zeros_like(x))


@struct.dataclass
class StopGradient(Op):
    """Forward value unchanged; the gradient does not flow through the selected entries."""

    def __call__(self, x, at):
        return jax.lax.stop_gradient(x)
