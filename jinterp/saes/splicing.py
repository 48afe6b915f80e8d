"""Splicing a dictionary into the forward pass, as an edit.

At the dictionary's site, with f = encode(x) and x_hat = decode(f):

    x' = decode(g) + (x - x_hat)        keep_error=True (default): unchanged unless a feature is edited
    x' = decode(g)                      keep_error=False: the model runs on the reconstruction
    g  = where(clamp_mask, clamp_value, f * scale + add)

so `scale` 0 ablates a feature, `clamp_*` pins it, `add` steers it. Every array is a leaf of the
edit: a leading axis on `scale` is an ablation sweep under `jax.vmap`, and the gradient with
respect to a zero `add` of shape [batch, pos, d_sae] is d metric / d feature activation at every
position (`feature_attribution`). The edit's `pos=` selects where the splice applies; elsewhere
the activation is untouched.

    e = saes.splice(sae, ablate=[12, 40], pos=[-1])
    model(tokens, edits=[e])
    logits, feats = saes.run_with_features(model, tokens, [sae])
    feats["blocks.3.hook_resid_post.sae.hook_sae_acts_post"]       # [batch, pos, d_sae]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jinterp import edits as E
from jinterp.saes.dictionary import Dictionary
from jinterp.saes.formats import DictionaryError


@struct.dataclass
class Splice(E.Op):
    """The splice op (module docstring). `add` is [d_sae] or [batch, P, d_sae] (P: every prompt position)."""

    sae: Dictionary
    scale: jax.Array
    add: jax.Array
    clamp_mask: jax.Array
    clamp_value: jax.Array
    keep_error: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, x, at):
        flat = x.reshape(x.shape[: len(at.layout) - 2] + (-1,)) if x.ndim == 4 else x  # hook_z: heads flattened
        xf = flat.astype(jnp.float32)
        f = self.sae.encode(xf)
        add = self.add
        if add.ndim == 3 and at.cols is not None:  # [batch, P, d_sae]: the rows this pass computes
            add = jnp.take(add, at.cols, axis=1)
        g = jnp.where(self.clamp_mask, self.clamp_value, f * self.scale + add)
        out = self.sae.decode(g, xf)
        if self.keep_error:
            out = out + (xf - self.sae.decode(f, xf))
        return out.reshape(x.shape).astype(x.dtype)

    def check(self, at):
        if at.site != self.sae.site:
            at.fail(f"this dictionary reads {self.sae.site}, not {at.site}")
        width = int(np.prod([at.sizes[a] for a in at.layout[2:]]))
        if width != self.sae.d_in:
            at.fail(f"dictionary d_in={self.sae.d_in} but the site has width {width}; it was trained on another model or site")


def _features(d_sae: int, which, name: str) -> np.ndarray:
    idx = np.atleast_1d(np.asarray(which))
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DictionaryError(f"{name} must be feature indices (ints), got {which!r}")
    bad = idx[(idx < 0) | (idx >= d_sae)]
    if bad.size:
        raise DictionaryError(f"{name}: features {bad.tolist()} out of range 0..{d_sae - 1}")
    return idx


def splice(sae: Dictionary, *, ablate=None, clamp: dict | None = None, steer=None, scale=None, add=None,
           keep_error: bool = True, pos=None, layers=None) -> E.Edit:
    """An edit that splices `sae` in at its own site and layer (module docstring).

    ablate: feature indices set to 0. clamp: {feature: value} pinned. steer: {feature: amount} or a
    [d_sae] vector added to the activations. scale / add: the raw [d_sae] multiplier and addend
    (add may be [batch, P, d_sae]). pos: positions to splice at (default all)."""
    if not isinstance(sae, Dictionary):
        raise DictionaryError(f"splice takes a saes.Dictionary (saes.load), got {type(sae).__name__}")
    if sae.is_transcoder:
        raise DictionaryError(f"{sae!r} is a transcoder (reads {sae.site}, writes {sae.out_site}); splicing "
                              "replaces one site with its reconstruction, so it needs an SAE")
    if sae.stacked:
        raise DictionaryError("splice one layer's dictionary at a time: sae[layer]")
    if sae.site is None:
        raise DictionaryError(f"{sae!r} does not say which site it reads; load it with hook_name=...")
    n = sae.d_sae
    sc = np.ones(n, np.float32) if scale is None else scale
    ad = np.zeros(n, np.float32) if add is None else add
    if ablate is not None:
        sc = jnp.asarray(sc).at[_features(n, ablate, "ablate")].set(0.0)
    if steer is not None:
        if isinstance(steer, dict):
            vec = np.zeros(n, np.float32)
            vec[_features(n, list(steer), "steer")] = list(steer.values())
        else:
            vec = np.asarray(steer, np.float32)
            if vec.shape != (n,):
                raise DictionaryError(f"steer must be {{feature: amount}} or a [{n}] vector, got shape {vec.shape}")
        ad = jnp.asarray(ad) + vec
    cm, cv = np.zeros(n, bool), np.zeros(n, np.float32)
    if clamp:
        idx = _features(n, list(clamp), "clamp")
        cm[idx], cv[idx] = True, list(clamp.values())
    for name, a in (("steer/add", ad), ("clamp", cv), ("scale", sc)):
        if not isinstance(a, jax.core.Tracer) and not np.isfinite(np.asarray(a)).all():
            raise DictionaryError(f"{name} values contain NaN or inf")
    if layers is None:
        layers = sae.layer
    op = Splice(sae, jnp.asarray(sc, jnp.float32), jnp.asarray(ad, jnp.float32), jnp.asarray(cm), jnp.asarray(cv),
                keep_error)
    return E.edit(sae.site, op, layers=layers, pos=pos)


def acts_name(sae: Dictionary) -> str:
    """The cache name of its feature activations, as SAELens names them."""
    return f"{sae.site_name}.sae.hook_sae_acts_post"


def run_with_features(model, tokens, dictionaries, attention_mask=None, edits=()):
    """(logits, {acts_name(sae): feature activations [batch, pos, d_sae]}) for each dictionary,
    read from one run (with `edits`, if given)."""
    ds = list(dictionaries)
    logits, cache = model.run_with_cache(tokens, names=[d.site_name for d in ds], attention_mask=attention_mask, edits=edits)
    return logits, {acts_name(d): d.encode(cache[d.site_name]) for d in ds}


def feature_attribution(model, sae: Dictionary, tokens, metric, attention_mask=None):
    """Gradient x activation for every feature at every position: [batch, pos, d_sae], the
    first-order effect on metric(logits) of removing each feature's activation (with the error
    term kept, as attribution graphs do), from one forward and one backward pass."""
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    B, P = tokens.shape
    _, feats = run_with_features(model, tokens, [sae], attention_mask=mask)
    f = feats[acts_name(sae)]

    def m(delta):
        return jnp.asarray(metric(model(tokens, mask, edits=[splice(sae, add=delta)])), jnp.float32)

    g = jax.grad(m)(jnp.zeros((B, P, sae.d_sae), jnp.float32))
    return -g * f  # removing a feature changes it by -f


def ablation_sweep(model, sae: Dictionary, tokens, metric, features, *, pos=None, attention_mask=None,
                   chunk: int = 64) -> np.ndarray:
    """metric(logits) with each of `features` ablated in turn (one compiled program, vmapped over
    features in chunks): [len(features)] (or [len(features), ...] for a per-example metric)."""
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    idx = _features(sae.d_sae, features, "features")
    scales = np.ones((len(idx), sae.d_sae), np.float32)
    scales[np.arange(len(idx)), idx] = 0.0
    base = splice(sae, pos=pos)

    @jax.jit
    def run(sc):
        def one(s):
            e = base.replace(op=base.op.replace(scale=s))
            return jnp.asarray(metric(model(tokens, mask, edits=[e])), jnp.float32)

        return jax.vmap(one)(sc)

    out = [np.asarray(run(jnp.asarray(scales[i:i + chunk]))) for i in range(0, len(idx), chunk)]
    return np.concatenate(out)
