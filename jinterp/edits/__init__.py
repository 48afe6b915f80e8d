"""Interventions as data.

An `Edit` is a small pytree: a `site` (which activation; static), a `Where` (which entries) and
an `Op` (what to write there). At a site with activation x::

    new  = op(x, at)                      e.g. Set: v,  Add: x + v,  StopGradient: stop_gradient(x)
    mask = layer in layers & pos in pos & head in heads & key in key_pos      (the Where)
    x'   = where(mask, new, x)

Every array (selectors, values, bases) is a leaf, so an edit with a leading axis on its leaves is
a sweep under `jax.vmap`, and `jax.grad` with respect to a value is attribution. Edits in a
sequence apply in order at each site, so later edits see earlier ones' results.

Where (`select.py`): `layers`, `heads`, `pos` and `key_pos` are each None (all), an int, a
sequence of ints (negative layers count from the last layer, negative positions from the end of
the prompt) or a boolean mask; `pos` and `key_pos` may be per example, int [batch, k] or bool
[batch, seq]. `pos` may also be "decode" (the rows that produce new tokens in `generate`: the
last prompt token and every generated one) or "generated" (generated tokens only).

Mixture-of-experts routing (`experts.py`): ablate_experts (weight 0, or rerouted), force_experts.

What (`ops.py`): Set, SetWhere, Add, Scale, Project, Knockout, Uniform, StopGradient; a new op is one small
`flax.struct.dataclass` subclassing `Op` with `__call__(self, x, at) -> new`, used with
`edit(site, MyOp(...), layers=..., pos=...)` and needing no change anywhere else.

Value shapes (`values.py`): a value is a `Value`, an array plus the names of the site axes it
carries, so no axis's meaning is guessed from its length. The constructors below name them for
you: the array is right-aligned with the site's layout (numpy broadcasting), and

    per_layer=True         the value has a leading "layer" axis: layer l reads value[l]
    pos_axis="full"        (default) its position axis is the full sequence: value[..., p, ...] is
                           written at absolute position p (size P, or 1 to broadcast); positions
                           past the prompt (generated tokens) are left unchanged
    pos_axis="selected"    its position axis has one entry per position of `pos=` (indices [k] or
                           [batch, k]): value[..., j, ...] is written at position pos[j]

A value without a position axis (a steering vector [d_model], a scalar) applies at every selected
position, generated tokens included. Give an explicit `Value(array, axes)` to any constructor to
name other layouts, e.g. Value(mask, ("layer", "head")) for attn.hook_z.

Errors: `validate` (called by the model on every edit it is handed) checks sites, selectors and
value shapes, also when values or selectors are traced (shapes are static under jit and vmap);
index ranges are checked where selectors are concrete. Value shapes are checked again when an
edit is applied inside the forward, so edits built in compiled sweeps meet the same rules.
"""

from __future__ import annotations

import jax.numpy as jnp

from jinterp import sites as S
from jinterp.edits.core import At, Edit, Edits, apply, first_col, first_layer, site_shape, validate
from jinterp.edits.experts import MaskExperts, ablate_experts, force_experts
from jinterp.edits.ops import Add, Knockout, Op, Project, Scale, Set, SetWhere, StopGradient, Uniform
from jinterp.edits.select import EditError, Where, member, selector
from jinterp.edits.values import Value

__all__ = [
    "Add", "At", "Edit", "EditError", "Edits", "Knockout", "MaskExperts", "Op", "Project", "Scale", "Set", "SetWhere",
    "StopGradient", "ablate_experts", "force_experts",
    "Value", "Where", "apply", "edit", "first_col", "first_layer", "knockout", "mean_ablate", "member", "patch",
    "resample_ablate", "scale", "selector", "site_shape", "splice", "steer", "stop_gradient", "subspace_patch",
    "uniform_attention", "Uniform", "validate", "zero_ablate",
]


# ----------------------------------------------------------------------------------------
# constructors


def _local(site: str) -> str:
    """The local site name of 'blocks.3.attn.hook_z', 'attn.hook_z' or an alias like 'z'."""
    split = S.split_name(site)
    local = S.ALIASES.get(split[1] if split else site, split[1] if split else site)
    if local not in S.BLOCK_SITES and local not in S.GLOBAL_SITES:
        raise S.SiteError(f"unknown site {local!r}." + S.suggest(local, list(S.BLOCK_SITES) + list(S.GLOBAL_SITES) + list(S.ALIASES)))
    return local


def _site_and_layers(site: str, layers):
    """Accept 'blocks.3.hook_z' (layer in the name) or a local name/alias plus `layers`."""
    split = S.split_name(site)
    if split:
        if layers is not None:
            raise ValueError(f"{site!r} already names its layer; drop layers= or use the local site name")
        layers = split[0]
    site = _local(site)
    if site in S.GLOBAL_SITES and layers is not None:
        raise ValueError(f"{site!r} is a global site; it takes no layers")
    return site, layers


def edit(site: str, op: Op, *, layers=None, pos=None, heads=None, key_pos=None) -> Edit:
    """Apply `op` at `site` where selected: the general constructor (any op, built in or your own)."""
    site, layers = _site_and_layers(site, layers)
    if not isinstance(op, Op):
        raise TypeError(f"op must be an edits.Op (Set, Add, ... or your own subclass), got {type(op).__name__}")
    decoding = None
    if isinstance(pos, str):
        from jinterp.edits.select import DECODING

        if pos not in DECODING:
            raise ValueError(f"pos given as a string must be one of {sorted(DECODING)} (decoding rows), got {pos!r}")
        decoding, pos = pos, None
    return Edit(site, op, Where(selector(layers), selector(pos), selector(heads), selector(key_pos), decoding))


def _value(site, value, per_layer=False, pos_axis="full") -> Value:
    if isinstance(value, Value):
        if per_layer or pos_axis != "full":
            raise ValueError("a Value names its own axes; drop per_layer= / pos_axis=")
        return value
    return Value.of(_local(site), value, per_layer=per_layer, pos_axis=pos_axis)


def patch(site: str, value, *, layers=None, pos=None, heads=None, key_pos=None, per_layer=False, pos_axis="full") -> Edit:
    """Replace the activation with `value` where selected (activation patching)."""
    return edit(site, Set(_value(site, value, per_layer, pos_axis)), layers=layers, pos=pos, heads=heads, key_pos=key_pos)


def zero_ablate(site: str, *, layers=None, pos=None, heads=None) -> Edit:
    return edit(site, Set(Value(jnp.zeros((), jnp.float32), ())), layers=layers, pos=pos, heads=heads)


def mean_ablate(site: str, source, *, layers=None, pos=None, heads=None, per_layer=False) -> Edit:
    """Replace with the batch mean of `source` (an activation [batch, ...], or [layer, batch, ...] with per_layer)."""
    source = jnp.asarray(source)
    value = source.mean(axis=1 if per_layer else 0, keepdims=True)
    return edit(site, Set(_value(site, value, per_layer)), layers=layers, pos=pos, heads=heads)


def resample_ablate(site: str, source, perm, *, layers=None, pos=None, heads=None, per_layer=False) -> Edit:
    """Replace example b's activation with example perm[b]'s activation from `source`."""
    source = jnp.asarray(source)
    value = jnp.take(source, jnp.asarray(perm), axis=1 if per_layer else 0)
    return edit(site, Set(_value(site, value, per_layer)), layers=layers, pos=pos, heads=heads)


def steer(site: str, vector, coeff=1.0, *, layers=None, pos=None, heads=None, per_layer=False, pos_axis="full") -> Edit:
    """Add coeff * vector (steering / activation addition)."""
    if isinstance(vector, Value):
        v = vector.replace(array=jnp.asarray(coeff) * vector.array)
    else:
        v = _value(site, jnp.asarray(coeff) * jnp.asarray(vector), per_layer, pos_axis)
    return edit(site, Add(v), layers=layers, pos=pos, heads=heads)


def scale(site: str, factor, *, layers=None, pos=None, heads=None) -> Edit:
    """Multiply the activation by `factor` where selected."""
    return edit(site, Scale(_value(site, factor)), layers=layers, pos=pos, heads=heads)


def subspace_patch(site: str, value, basis, *, layers=None, pos=None, heads=None, per_layer=False, pos_axis="full") -> Edit:
    """Replace only the component of the activation in span(basis); basis is [d, k] with orthonormal columns."""
    return edit(site, Project(_value(site, value, per_layer, pos_axis), jnp.asarray(basis)), layers=layers, pos=pos, heads=heads)


def knockout(query_pos=None, key_pos=None, *, layers=None, heads=None) -> Edit:
    """Block the chosen query positions from attending to the chosen key positions (Hopping Too Late §knockout)."""
    return edit("attn.hook_attn_scores", Knockout(), layers=layers, pos=query_pos, heads=heads, key_pos=key_pos)


def stop_gradient(site: str, *, layers=None, pos=None, heads=None, key_pos=None) -> Edit:
    """Leave the forward value unchanged but stop the gradient where selected (attribution graphs
    freeze attention patterns and norm scales this way)."""
    return edit(site, StopGradient(), layers=layers, pos=pos, heads=heads, key_pos=key_pos)


def uniform_attention(*, layers=None, heads=None, pos="decode") -> Edit:
    """Mask heads the way the Retrieval Head paper does: uniform attention over the allowed keys
    (pre-softmax scores set to 0), on decoding steps only by default (pos="decode": the last prompt
    token and every generated one; prefill rows are left alone). `pos=None` masks every row."""
    return edit("attn.hook_attn_scores", Uniform(), layers=layers, pos=pos, heads=heads)


def splice(sae, **kw) -> Edit:
    """Splice a dictionary (jinterp.saes) in at its site: its reconstruction plus the error term,
    with feature-level ablate / clamp / steer (see jinterp.saes.splicing.splice)."""
    from jinterp.saes.splicing import splice as _splice

    return _splice(sae, **kw)
