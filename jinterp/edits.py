"""Interventions as data.

An `Edit` is a small pytree. Its `site` (which activation) and `op` (what it does) are static:
they decide the program. Everything else is an array leaf: which layers, positions, heads and
key positions it touches, and the value it uses. So an edit with a leading axis on its leaves
is a sweep under `jax.vmap`, and `jax.grad` with respect to `value` is attribution.

At a site with activation `x`, an edit computes a candidate `new` and writes it where its mask
holds::

    mask = layer in layers  &  pos in pos  &  head in heads  &  key in key_pos
    set:       new = value                          (activation patching, ablations)
    add:       new = x + value                      (steering)
    scale:     new = x * value
    project:   new = x + ((value - x) @ B) @ B.T    (subspace patch: B has orthonormal columns)
    knockout:  new = dtype min                      (attention knockout, on attention scores)
    x' = where(mask, new, x)

Selectors: `layers`, `heads`, `pos` and `key_pos` are each None (all), an int or a sequence of
ints (indices; negative layers count from the last layer, negative positions from the end of
the prompt), or a boolean mask. `pos`
and `key_pos` may be per example: int [batch, k] or bool [batch, seq]. A `value` is broadcast
against the site's shape (right-aligned, as numpy does); if it has the position axis at full
sequence length it is read at the positions being computed. With `per_layer=True` the value
has a leading layer axis and layer l reads `value[l]`.

Edits in a sequence apply in order at each site, so later edits see earlier ones' results.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jinterp import sites as S
from jinterp.config import Config

OPS = ("set", "add", "scale", "project", "knockout")


@struct.dataclass
class Edit:
    site: str = struct.field(pytree_node=False)  # block-local or global TL name, e.g. "attn.hook_z"
    op: str = struct.field(pytree_node=False)
    layers: jax.Array | None = None
    pos: jax.Array | None = None
    heads: jax.Array | None = None
    key_pos: jax.Array | None = None
    value: jax.Array | None = None
    basis: jax.Array | None = None
    per_layer: bool = struct.field(pytree_node=False, default=False)

    def __repr__(self):
        def d(a):
            return "all" if a is None else f"{getattr(a, 'dtype', '')}{list(np.shape(a))}"

        return (
            f"Edit({self.op} {self.site}, layers={d(self.layers)}, pos={d(self.pos)}, heads={d(self.heads)}"
            + (f", key_pos={d(self.key_pos)}" if self.key_pos is not None else "")
            + (f", value={d(self.value)}" if self.value is not None else "")
            + (", per_layer" if self.per_layer else "")
            + ")"
        )


Edits = Sequence[Edit]


# ----------------------------------------------------------------------------------------
# constructors


def _sel(x):
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


def _site_and_layers(site: str, layers):
    """Accept 'blocks.3.hook_z' (layer in the name) or a local name/alias plus `layers`."""
    split = S.split_name(site)
    if split:
        if layers is not None:
            raise ValueError(f"{site!r} already names its layer; drop layers= or use the local site name")
        layers, site = split
    return S.ALIASES.get(site, site), _sel(layers)


def _make(op, site, value=None, *, layers=None, pos=None, heads=None, key_pos=None, basis=None, per_layer=False):
    site, layers = _site_and_layers(site, layers)
    if site not in S.BLOCK_SITES and site not in S.GLOBAL_SITES:
        raise S.SiteError(f"unknown site {site!r}." + S.suggest(site, list(S.BLOCK_SITES) + list(S.GLOBAL_SITES) + list(S.ALIASES)))
    if site in S.GLOBAL_SITES and layers is not None:
        raise ValueError(f"{site!r} is a global site; it takes no layers")
    if value is not None and not isinstance(value, jax.Array):
        value = jnp.asarray(value)
    return Edit(
        site=site,
        op=op,
        layers=layers,
        pos=_sel(pos),
        heads=_sel(heads),
        key_pos=_sel(key_pos),
        value=value,
        basis=None if basis is None else jnp.asarray(basis),
        per_layer=per_layer,
    )


def patch(site: str, value, *, layers=None, pos=None, heads=None, key_pos=None, per_layer=False) -> Edit:
    """Replace the activation with `value` where selected (activation patching)."""
    return _make("set", site, value, layers=layers, pos=pos, heads=heads, key_pos=key_pos, per_layer=per_layer)


def zero_ablate(site: str, *, layers=None, pos=None, heads=None) -> Edit:
    return _make("set", site, jnp.zeros((), jnp.float32), layers=layers, pos=pos, heads=heads)


def mean_ablate(site: str, source, *, layers=None, pos=None, heads=None, per_layer=False) -> Edit:
    """Replace with the batch mean of `source` (an activation [batch, ...], or [layer, batch, ...] with per_layer)."""
    source = jnp.asarray(source)
    value = source.mean(axis=1 if per_layer else 0, keepdims=True)
    return _make("set", site, value, layers=layers, pos=pos, heads=heads, per_layer=per_layer)


def resample_ablate(site: str, source, perm, *, layers=None, pos=None, heads=None, per_layer=False) -> Edit:
    """Replace example b's activation with example perm[b]'s activation from `source`."""
    source = jnp.asarray(source)
    value = jnp.take(source, jnp.asarray(perm), axis=1 if per_layer else 0)
    return _make("set", site, value, layers=layers, pos=pos, heads=heads, per_layer=per_layer)


def steer(site: str, vector, coeff=1.0, *, layers=None, pos=None, heads=None) -> Edit:
    """Add coeff * vector (steering / activation addition)."""
    return _make("add", site, jnp.asarray(coeff) * jnp.asarray(vector), layers=layers, pos=pos, heads=heads)


def scale(site: str, factor, *, layers=None, pos=None, heads=None) -> Edit:
    return _make("scale", site, factor, layers=layers, pos=pos, heads=heads)


def subspace_patch(site: str, value, basis, *, layers=None, pos=None, heads=None, per_layer=False) -> Edit:
    """Replace only the component of the activation in span(basis); basis is [d, k] with orthonormal columns."""
    return _make("project", site, value, layers=layers, pos=pos, heads=heads, basis=basis, per_layer=per_layer)


def knockout(query_pos=None, key_pos=None, *, layers=None, heads=None) -> Edit:
    """Block the chosen query positions from attending to the chosen key positions (Hopping Too Late §knockout)."""
    return _make("knockout", "attn.hook_attn_scores", None, layers=layers, pos=query_pos, heads=heads, key_pos=key_pos)


# ----------------------------------------------------------------------------------------
# validation at the boundary


class EditError(ValueError):
    pass


def _concrete(a):
    try:
        return np.asarray(a)
    except Exception:  # a tracer: recipes build edits under vmap; values are checked by the recipe
        return None


def site_shape(cfg: Config, site: str, batch: int, seq: int) -> dict[str, int]:
    sizes = dict(
        batch=batch, pos=seq, key=seq, d_model=cfg.d_model, head=cfg.n_heads, kv_head=cfg.n_kv_heads,
        d_head=cfg.d_head, d_mlp=cfg.d_mlp, one=1,
    )
    return {ax: sizes[ax] for ax in S.layout(site)}


def validate(cfg: Config, edits, batch: int, seq: int) -> tuple[Edit, ...]:
    """Check edits against the model and the input shape; raise EditError naming the fix."""
    if isinstance(edits, Edit):
        edits = (edits,)
    edits = tuple(edits or ())
    for i, e in enumerate(edits):
        if not isinstance(e, Edit):
            raise EditError(f"edits[{i}] is a {type(e).__name__}, not an Edit; build edits with jinterp.edits.patch/steer/...")
        where = f"edits[{i}] ({e.op} at {e.site})"
        if e.op not in OPS:
            raise EditError(f"{where}: unknown op {e.op!r}; one of {OPS}")
        if e.site in S.GLOBAL_SITES:
            if e.site not in S.global_sites(cfg):
                raise EditError(f"{where}: this {cfg.family} model has no site {e.site!r}")
        elif e.site not in S.block_sites(cfg):
            raise EditError(
                f"{where}: this {cfg.family} model has no site {e.site!r}." + S.suggest(e.site, S.block_sites(cfg))
            )
        lay = S.layout(e.site)
        if e.op == "knockout" and e.site != "attn.hook_attn_scores":
            raise EditError(f"{where}: knockout applies to attn.hook_attn_scores only")
        if e.op in ("set", "add", "scale", "project") and e.value is None:
            raise EditError(f"{where}: needs a value")
        if e.op == "project":
            b = e.basis
            if b is None or b.ndim != 2:
                raise EditError(f"{where}: project needs a basis [d, k] with orthonormal columns")
            d_last = site_shape(cfg, e.site, batch, seq)[lay[-1]]
            if b.shape[0] != d_last:
                raise EditError(f"{where}: basis has {b.shape[0]} rows but the site's last axis has size {d_last}")
        if e.site in S.GLOBAL_SITES and e.per_layer:
            raise EditError(f"{where}: {e.site!r} is a global site; its value has no layer axis (per_layer=False)")
        if e.layers is not None and np.ndim(e.layers) != 1:
            raise EditError(f"{where}: layers must be a list of layer indices or a [n_layers] mask, got shape {np.shape(e.layers)}")
        _check_sel(where, "layers", e.layers, cfg.n_layers, "layer", batch=None)
        head_n = cfg.n_kv_heads if "kv_head" in lay else cfg.n_heads
        if e.heads is not None and "head" not in lay and "kv_head" not in lay:
            raise EditError(f"{where}: heads= given but {e.site} has no head axis")
        _check_sel(where, "heads", e.heads, head_n, "head", batch=None)
        if e.pos is not None and "pos" not in lay:
            raise EditError(f"{where}: pos= given but {e.site} has no position axis")
        _check_sel(where, "pos", e.pos, seq, "position", batch=batch)
        if e.key_pos is not None and "key" not in lay:
            raise EditError(f"{where}: key_pos= given but {e.site} has no key axis")
        _check_sel(where, "key_pos", e.key_pos, seq, "key position", batch=batch)
        if e.value is not None:
            _check_value(cfg, where, e, batch, seq)
    return edits


def _check_sel(where, name, sel, n, what, batch):
    if sel is None:
        return
    a = _concrete(sel)
    if a is None:
        return
    if a.dtype == bool:
        if a.shape[-1] != n or (a.ndim == 2 and batch is not None and a.shape[0] not in (1, batch)) or a.ndim > 2:
            raise EditError(f"{where}: {name} mask has shape {a.shape}, expected [{n}]" + (f" or [{batch}, {n}]" if batch else ""))
        return
    lo = -n if name in ("pos", "key_pos", "layers") else 0
    if a.size and (a.min() < lo or a.max() >= n):
        bad = a[(a < lo) | (a >= n)].ravel()[0]
        raise EditError(f"{where}: {what} {bad} is out of range; valid {name} are {lo}..{n - 1}")
    if a.ndim == 2 and batch is not None and a.shape[0] not in (1, batch):
        raise EditError(f"{where}: per-example {name} has {a.shape[0]} rows but the batch has {batch}")
    if a.ndim > 2 or (a.ndim == 2 and batch is None):
        raise EditError(f"{where}: {name} has shape {a.shape}; expected a list of indices")


def _check_value(cfg, where, e, batch, seq):
    want = site_shape(cfg, e.site, batch, seq)
    shape = tuple(e.value.shape)
    if e.per_layer:
        if not shape or shape[0] != cfg.n_layers:
            raise EditError(f"{where}: per_layer value needs a leading axis of {cfg.n_layers} layers, got shape {shape}")
        shape = shape[1:]
    full = tuple(want.values())
    if len(shape) > len(full):
        raise EditError(f"{where}: value has shape {shape}, more axes than the site {dict(want)}")
    for got, (ax, n) in zip(shape[::-1], list(want.items())[::-1]):
        if got not in (1, n):
            raise EditError(
                f"{where}: value has shape {shape} but the site is {list(full)} ({', '.join(want)}); "
                f"axis {ax!r} must be {n} or 1 (e.g. clean and corrupted inputs of different shapes?)"
            )


# ----------------------------------------------------------------------------------------
# application inside the forward


def _member(sel, idx, n_prompt):
    """sel (None | int [k] | int [B,k] | bool [n] | bool [B,n]) evaluated at indices idx [m] -> [m] or [B,m]."""
    if sel is None:
        return None
    if sel.dtype == jnp.bool_:
        return jnp.take(sel, idx, axis=-1, mode="fill", fill_value=False)
    sel = jnp.where(sel < 0, sel + n_prompt, sel)
    return (sel[..., :, None] == idx).any(axis=-2)


def _place(m, lay, axes):
    """Reshape a mask over `axes` (subset of layout, in order, batch optional leading) to broadcast in layout."""
    shape = []
    it = iter(m.shape)
    for ax in lay:
        shape.append(next(it) if ax in axes else 1)
    return m.reshape(shape)


def apply(e: Edit, x, *, layer, cols, n_prompt, n_keys, n_layers):
    """Apply one edit to activation x at a site with layout S.layout(e.site).

    layer: traced or static layer index (None for global sites); cols: absolute column index of
    each row on x's position axis [m]; n_prompt: prompt length (negative positions count from it);
    n_keys: length of the key axis for attention maps; n_layers: negative layers count from it.
    """
    lay = S.layout(e.site)
    n = len(lay)
    masks = []
    if e.layers is not None:
        lm = _member(e.layers, jnp.asarray(layer)[None], n_layers)[0] if e.layers.dtype != jnp.bool_ else e.layers[layer]
        masks.append(lm)
    if "pos" in lay and e.pos is not None:
        pm = _member(e.pos, cols, n_prompt)
        axes = ("batch", "pos") if pm.ndim == 2 else ("pos",)
        masks.append(_place(pm, lay, axes))
    if e.heads is not None:
        hax = "kv_head" if "kv_head" in lay else "head"
        hm = _member(e.heads, jnp.arange(x.shape[lay.index(hax)]), 0)
        masks.append(_place(hm, lay, (hax,)))
    kcols = jnp.arange(n_keys)
    if "key" in lay and e.key_pos is not None:
        km = _member(e.key_pos, kcols, n_prompt)
        masks.append(_place(km, lay, ("batch", "key") if km.ndim == 2 else ("key",)))

    v = e.value
    if v is not None:
        if e.per_layer:
            v = v[layer]
        v = v.reshape((1,) * (n - v.ndim) + v.shape)
        if "pos" in lay:
            ax = lay.index("pos")
            if v.shape[ax] > 1:
                masks.append(_place(cols < v.shape[ax], lay, ("pos",)))
                v = jnp.take(v, cols, axis=ax, mode="clip")
        if "key" in lay:
            ax = lay.index("key")
            if v.shape[ax] > 1 and v.shape[ax] != n_keys:
                masks.append(_place(kcols < v.shape[ax], lay, ("key",)))
                v = jnp.take(v, kcols, axis=ax, mode="clip")

    if e.op == "set":
        new = jnp.broadcast_to(v, x.shape)
    elif e.op == "add":
        new = x + v
    elif e.op == "scale":
        new = x * v
    elif e.op == "project":
        b = e.basis.astype(x.dtype)
        new = x + ((v - x) @ b) @ b.T
    else:  # knockout
        new = jnp.full_like(x, jnp.finfo(x.dtype).min)
    new = new.astype(x.dtype)
    if not masks:
        return new
    m = masks[0]
    for extra in masks[1:]:
        m = m & extra
    return jnp.where(m, new, x)


def first_layer(e: Edit, n_layers: int):
    """Smallest layer an edit touches (traceable); 0 for global sites."""
    if e.site in S.GLOBAL_SITES or e.layers is None:
        return jnp.int32(0)
    if e.layers.dtype == jnp.bool_:
        return jnp.argmax(e.layers).astype(jnp.int32)
    return jnp.min(jnp.where(e.layers < 0, e.layers + n_layers, e.layers)).astype(jnp.int32)


def first_col(e: Edit, n_prompt: int):
    """Smallest position whose activations an edit can change (traceable)."""
    if e.pos is None:
        return jnp.int32(0)
    p = e.pos
    if p.dtype == jnp.bool_:
        anyp = p.reshape(-1, p.shape[-1]).any(0)
        return jnp.where(anyp.any(), jnp.argmax(anyp), n_prompt).astype(jnp.int32)
    p = jnp.where(p < 0, p + n_prompt, p)
    return jnp.min(p).astype(jnp.int32)
