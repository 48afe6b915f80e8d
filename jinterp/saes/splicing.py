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

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jinterp import edits as E
from jinterp import sites as S
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
                              "replaces one site with its reconstruction, so it needs an SAE; splice a transcoder with "
                              "saes.splice_transcoder")
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


# ---------------------------------------------------------------------------------------------
# transcoders: read one site, write another


class _InputBox:
    """Carries the transcoder's input from its site to its output site within one trace of a block
    (an op sees only its own site; the tap op at the input site fills the box just before the splice
    op at the output site, later in the same block, empties it)."""

    x = None


def _width(at) -> int:
    return int(np.prod([at.sizes[a] for a in at.layout[2:]]))


@struct.dataclass
class _TapInput(E.Op):
    box: _InputBox = struct.field(pytree_node=False)
    d_in: int = struct.field(pytree_node=False, default=0)

    def __call__(self, x, at):
        self.box.x = x
        return x

    def check(self, at):
        if _width(at) != self.d_in:
            at.fail(f"transcoder d_in={self.d_in} but the site has width {_width(at)}; it was trained on another model or site")


@struct.dataclass
class TranscoderSplice(E.Op):
    """At the output site of layer l, with x the input site's value and f = encode(x):

        out' = out + decode(g) - decode(f)            keep_error=True (the error term out - (decode(f) + skip) kept)
        out' = decode(g) + x @ W_skip                 keep_error=False (the transcoder replaces the MLP)

    g = f with the chosen entries set: g[p_k, f_k] = v_k for every k with layer_k == l (k indexes
    `set_features`; negative positions count from the end of the prompt). `tc` is one layer's
    transcoder or a stacked set (`slot[l]` picks layer l's row)."""

    tc: Dictionary
    slot: jax.Array  # [n_layers_model] row of tc for each model layer
    layer: jax.Array  # [K] the edits: layer, position, feature, value
    pos: jax.Array
    feature: jax.Array
    value: jax.Array
    box: _InputBox = struct.field(pytree_node=False, default=None)
    keep_error: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, out, at):
        x, self.box.x = self.box.x, None
        if x is None:
            at.fail(f"the transcoder's input site {self.tc.site} was not computed before {at.site} in this block")
        tc = self.tc
        if tc.stacked:
            tc = dataclasses.replace(jax.tree_util.tree_map(lambda a: a[self.slot[at.layer]], tc), layers=None)
        xf = x.astype(jnp.float32)
        f = tc.encode(xf)
        pos = jnp.where(self.pos < 0, self.pos + at.n_prompt, self.pos)
        cols = jnp.arange(out.shape[-2]) if at.cols is None else at.cols
        hit = cols[None, :] == pos[:, None]  # [K, rows]
        row = jnp.argmax(hit, axis=1)
        on = hit.any(axis=1) & (self.layer == at.layer)
        cur = f[..., row, self.feature]  # [..., K]
        g = f.at[..., row, self.feature].add(jnp.where(on, self.value - cur, 0.0))
        if self.keep_error:
            new = out.astype(jnp.float32) + (tc.decode(g, xf) - tc.decode(f, xf))
        else:
            new = tc.decode(g, xf) + tc.skip(xf)
        return new.astype(out.dtype)

    def check(self, at):
        if at.site != self.tc.out_site:
            at.fail(f"this transcoder writes {self.tc.out_site}, not {at.site}")
        if _width(at) != self.tc.d_out:
            at.fail(f"transcoder d_out={self.tc.d_out} but {at.site} has width {_width(at)}")


def splice_transcoder(tc: Dictionary, *, set_features=(), keep_error: bool = True, layers=None, pos=None) -> list:
    """Splice a transcoder (reads `tc.site`, writes `tc.out_site` of the same block) in place of
    what it replaces, as two edits (a tap at the input site, the splice at the output site): the
    output becomes decode(encode(x_in)) [+ skip] plus the error term (keep_error=True: unchanged
    unless a feature is set), or the transcoder's output alone (keep_error=False). Later layers see
    the result, so their own transcoders' features are recomputed from the edited stream.

    tc: one layer's transcoder, or a stacked per-layer set (spliced at each of its layers).
    set_features: (layer, pos, feature, value) tuples: feature activations to set (0 ablates; a scaled
    activation steers). layers / pos: where to splice (default: the transcoder's layers, every
    position). Use as `model(tokens, edits=splice_transcoder(tc, set_features=[(1, 4, 17, 0.0)]))`."""
    if not isinstance(tc, Dictionary) or not tc.is_transcoder:
        raise DictionaryError(f"splice_transcoder takes a transcoder (a saes.Dictionary with an out_site other than its site), "
                              f"got {tc!r}; splice an SAE with saes.splice")
    order = list(S.BLOCK_SITES)
    if tc.site not in order or tc.out_site not in order or order.index(tc.site) >= order.index(tc.out_site):
        raise DictionaryError(f"{tc!r} reads {tc.site!r} and writes {tc.out_site!r}; splicing needs a block site read "
                              "before the block site written (e.g. mlp.hook_in or hook_resid_mid -> hook_mlp_out)")
    tl = tuple(tc.layers) if tc.stacked else (tc.layer,)
    if None in tl:
        raise DictionaryError(f"{tc!r} does not say which layer it belongs to; load it with its layer (blocks.L....)")
    rows = [tuple(r) for r in set_features]
    for r in rows:
        if len(r) != 4:
            raise DictionaryError(f"set_features entries are (layer, pos, feature, value) tuples, got {r!r}")
        l, p, f, v = r
        if int(l) not in tl:
            raise DictionaryError(f"set_features entry {r!r}: no transcoder at layer {l}; this one covers layers {list(tl)}")
        if not 0 <= int(f) < tc.d_sae:
            raise DictionaryError(f"set_features entry {r!r}: feature {f} out of range 0..{tc.d_sae - 1}")
        if not np.isfinite(float(v)):
            raise DictionaryError(f"set_features entry {r!r}: the value is NaN or inf")
    keys = [(int(l), int(p), int(f)) for l, p, f, _ in rows]
    if len(keys) != len(dict.fromkeys(keys)):
        raise DictionaryError("set_features names one (layer, pos, feature) twice; give each feature one value")
    slot = np.zeros(max(tl) + 1, np.int32)
    slot[list(tl)] = np.arange(len(tl))
    # padded to a power of two (at least 4) with entries at layer -1, which match no layer: calls
    # with a similar number of edits share one compiled program
    rows = rows + [(-1, 0, 0, 0.0)] * (max(4, 1 << max(0, len(rows) - 1).bit_length()) - len(rows))
    arr = lambda i, dt: jnp.asarray(np.asarray([r[i] for r in rows], dt).reshape(-1))
    box = _InputBox()
    op = TranscoderSplice(tc, jnp.asarray(slot), arr(0, np.int32), arr(1, np.int32), arr(2, np.int32),
                          arr(3, np.float32), box=box, keep_error=keep_error)
    where = dict(layers=list(tl) if layers is None else layers, pos=pos)
    return [E.edit(tc.site, _TapInput(box, tc.d_in), layers=where["layers"]), E.edit(tc.out_site, op, **where)]
