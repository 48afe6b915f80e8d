"""Dictionary splicing (jinterp.saes.splicing) against naive patches computed from the cache."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jinterp
from jinterp import edits as E
from jinterp import metrics, saes
from jinterp.saes import splicing as SP
from jinterp.train import organisms


@pytest.fixture(scope="module")
def model():
    return jinterp.load("induction-2l")


@pytest.fixture(scope="module")
def tokens():
    return organisms.recipe("induction-2l").induction_batch(np.random.default_rng(0), 3, 5, 121)


def make_sae(d=64, n=96, seed=0, layer=0, site="hook_resid_post", arch="standard"):
    r = np.random.default_rng(seed)
    return saes.Dictionary(W_enc=jnp.asarray(r.normal(0, 0.3, (d, n)), jnp.float32),
                           W_dec=jnp.asarray(r.normal(0, 0.1, (n, d)), jnp.float32),
                           b_dec=jnp.asarray(r.normal(0, 0.1, d), jnp.float32),
                           b_enc=jnp.asarray(r.normal(-0.2, 0.1, n), jnp.float32),
                           architecture=arch, apply_b_dec_to_input=True, site=site, layer=layer)


def naive(model, tokens, sae, fn):
    """Logits with the site replaced by fn(x, f) computed in numpy from the cached activation."""
    _, cache = model.run_with_cache(tokens, names=[sae.site_name])
    x = np.asarray(cache[sae.site_name], np.float64)
    We, Wd, bd, be = (np.asarray(a, np.float64) for a in (sae.W_enc, sae.W_dec, sae.b_dec, sae.b_enc))
    f = np.maximum((x - bd) @ We + be, 0)
    new = fn(x, f, Wd, bd).astype(np.float32)
    return np.asarray(model(tokens, edits=[E.patch(sae.site, new, layers=sae.layer)]))


def test_splice_with_error_term_is_the_identity(model, tokens):
    sae = make_sae()
    clean = np.asarray(model(tokens))
    np.testing.assert_allclose(np.asarray(model(tokens, edits=[SP.splice(sae)])), clean, atol=2e-5)


def test_reconstruction_ablation_clamp_and_steer_match_naive(model, tokens):
    sae = make_sae()
    got = np.asarray(model(tokens, edits=[SP.splice(sae, keep_error=False)]))
    want = naive(model, tokens, sae, lambda x, f, Wd, bd: f @ Wd + bd)
    np.testing.assert_allclose(got, want, atol=2e-4)

    def edited(x, f, Wd, bd):
        g = f.copy()
        g[..., [3, 7]] = 0.0
        g[..., 11] = 2.5
        g[..., 5] += 1.5
        return x + (g - f) @ Wd  # the error term cancels everything but the edit
    got = np.asarray(model(tokens, edits=[SP.splice(sae, ablate=[3, 7], clamp={11: 2.5}, steer={5: 1.5})]))
    np.testing.assert_allclose(got, naive(model, tokens, sae, edited), atol=2e-4)
    # only at the selected position
    got = np.asarray(model(tokens, edits=[SP.splice(sae, clamp={11: 2.5}, pos=[4])]))
    np.testing.assert_allclose(got[:, :4], np.asarray(model(tokens))[:, :4], atol=2e-5)


def test_features_attribution_and_sweep(model, tokens):
    sae = make_sae(layer=1, site="hook_resid_pre")
    _, feats = SP.run_with_features(model, tokens, [sae])
    f = feats["blocks.1.hook_resid_pre.sae.hook_sae_acts_post"]
    _, cache = model.run_with_cache(tokens, names=["blocks.1.hook_resid_pre"])
    np.testing.assert_allclose(np.asarray(f), np.asarray(sae.encode(cache["blocks.1.hook_resid_pre"])), atol=1e-6)

    target = tokens[:, -1]
    metric = metrics.log_prob(target, pos=-2)
    attr = np.asarray(SP.feature_attribution(model, sae, tokens, metric))
    assert attr.shape == f.shape
    b_, p_, j = np.unravel_index(np.argmax(np.abs(attr)), attr.shape)
    # the gradient, by central differences on that one feature activation
    eps = 1e-2
    def at(c):
        add = np.zeros(f.shape, np.float32)
        add[b_, p_, j] = c
        return float(metric(model(tokens, edits=[SP.splice(sae, add=add)])))
    fd = (at(eps) - at(-eps)) / (2 * eps)
    assert attr[b_, p_, j] == pytest.approx(-fd * float(f[b_, p_, j]), rel=3e-2, abs=1e-4)

    feats_ = [2, 9, 30]
    sweep = SP.ablation_sweep(model, sae, tokens, metric, feats_)
    loop = [float(metric(model(tokens, edits=[SP.splice(sae, ablate=[k])]))) for k in feats_]
    np.testing.assert_allclose(sweep, loop, atol=1e-5)


def test_bad_input(model, tokens):
    with pytest.raises(E.EditError, match="d_in=32 but the site has width 64"):
        model(tokens, edits=[SP.splice(make_sae(d=32))])
    with pytest.raises(saes.DictionaryError, match="out of range"):
        E.splice(make_sae(), ablate=[500])
    with pytest.raises(saes.DictionaryError, match="transcoder"):
        SP.splice(make_sae().replace(out_site="hook_mlp_out"))
    with pytest.raises(saes.DictionaryError, match="NaN"):
        SP.splice(make_sae(), steer=np.full(96, np.nan, np.float32))
