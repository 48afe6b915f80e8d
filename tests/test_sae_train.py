"""jinterp.saes.train: SAEs and transcoders trained on induction-2l's activations, saved in the SAELens format.

Thresholds were measured on CPU (seed 0) and set with margin below what the runs reach: 200 steps
of 8 rows x 31 tokens, d_sae=64. Explained variance reached (layer 0, layer 1): ReLU l1=1 about
(0.78, 0.96), TopK k=8 about (0.73, 0.97); layer 0's residual (token + position embedding of 120
words x 31 positions) is the harder one to compress into 64 features.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinterp
from jinterp import saes
from jinterp.saes import jumprelu, train
from jinterp.train import organisms

FIX = Path(__file__).parent / "fixtures" / "saes" / "saelens"
STEPS, D_SAE, K = 200, 64, 8


@pytest.fixture(scope="module")
def model():
    return jinterp.load("induction-2l")


@pytest.fixture(scope="module")
def ind():
    return organisms.recipe("induction-2l")


@pytest.fixture(scope="module")
def batches(ind):
    return lambda rng: ind.induction_batch(rng, 8, 15, ind.VOCAB_SIZE)


@pytest.fixture(scope="module")
def held_out(ind):
    return ind.induction_batch(np.random.default_rng(1234), 8, 15, ind.VOCAB_SIZE)  # the training shape: programs reused


@pytest.fixture(scope="module")
def relu(model, batches):
    return train.fit(model, batches, architecture="relu", d_sae=D_SAE, l1=1.0, steps=STEPS, seed=0, progress=False)


@pytest.fixture(scope="module")
def topk(model, batches):
    return train.fit(model, batches, architecture="topk", d_sae=D_SAE, k=K, steps=STEPS, seed=0, progress=False)


def _check_common(run, model):
    d = run.dictionary
    assert d.stacked and d.layers == (0, 1) and d.site == "hook_resid_post"
    assert d.W_enc.shape == (2, model.config.d_model, D_SAE) and d.W_dec.shape == (2, D_SAE, model.config.d_model)
    # decoder rows are unit norm (renormalised after every step; the normalisation is folded elsewhere)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(d.W_dec), axis=-1), 1.0, atol=1e-5)
    h = run.history
    T = len(h["step"])
    assert h["step"][0] == 1 and h["step"][-1] == STEPS
    for name in ("loss", "mse", "l0", "explained_variance", "dead_fraction"):
        assert h[name].shape == (T, 2) and np.isfinite(h[name]).all()
    assert ((h["dead_fraction"] >= 0) & (h["dead_fraction"] <= 1)).all()
    ev = h["explained_variance"]
    # explained variance rises over training: the last quarter's mean beats the first logged steps
    assert (ev[-T // 4:].mean(0) > ev[:3].mean(0) + 0.2).all(), ev
    assert run.steps_since_fired.shape == (2, D_SAE)


def test_relu_sae(relu, model, held_out):
    _check_common(relu, model)
    ev = relu.history["explained_variance"][-5:].mean(0)
    assert ev[0] > 0.65 and ev[1] > 0.9, ev
    # l1 makes it sparse: fewer active features than at the start (about half of d_sae fire at init)
    l0 = relu.history["l0"]
    assert (l0[-1] < 0.9 * l0[0]).all(), l0
    # held-out: L0 from the dictionary itself matches evaluate's; splicing the reconstruction in costs
    # less loss than zero-ablating the site
    m = relu.evaluate(model, held_out)
    _, cache = model.run_with_cache(held_out, names=["blocks.1.hook_resid_post"])
    f = relu[1].encode(cache["blocks.1.hook_resid_post"])[:, 1:]
    assert m[1]["l0"] == pytest.approx(float((f > 0).sum(-1).mean()), rel=1e-5)
    for l in (0, 1):
        r = m[l]
        assert r["ce_clean"] < r["ce_spliced"] < r["ce_zero_ablated"]
        assert 0 < r["ce_loss_recovered"] < 1
        assert r["explained_variance"] > 0.6


def test_topk_sae(topk, model, held_out):
    _check_common(topk, model)
    assert (topk.history["l0"] == K).all()
    ev = topk.history["explained_variance"][-5:].mean(0)
    assert ev[0] > 0.6 and ev[1] > 0.9, ev
    _, cache = model.run_with_cache(held_out, names=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    for l in (0, 1):
        f = np.asarray(topk[l].encode(cache[f"blocks.{l}.hook_resid_post"]))
        assert ((f > 0).sum(-1) == K).all()  # exactly k: every kept pre-activation is positive here


def test_layers_vmapped_equal_one_layer_alone(topk, model, batches):
    alone = train.fit(model, batches, architecture="topk", d_sae=D_SAE, k=K, steps=STEPS, seed=0, layers=1,
                      progress=False)
    assert alone.dictionary.layers == (1,)
    a, b = alone[1], topk[1]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=2e-4, err_msg=name)
    np.testing.assert_allclose(alone.history["explained_variance"][:, 0], topk.history["explained_variance"][:, 1],
                               atol=1e-4)


def test_save_roundtrip_saelens_layout(relu, topk, tmp_path, held_out, model):
    _, cache = model.run_with_cache(held_out, names=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    for run, fixture in ((relu, "standard"), (topk, "topk")):
        out = run.save(tmp_path / fixture)
        assert sorted(p.name for p in out.iterdir()) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                                         "metrics.json"]
        rec = json.loads((out / "metrics.json").read_text())
        assert rec["layers"] == [0, 1] and len(rec["history"]["step"]) == len(run.history["step"])
        for l in (0, 1):
            folder = out / f"blocks.{l}.hook_resid_post"
            back = saes.load(folder)
            assert back.format == "saelens" and back.site_name == f"blocks.{l}.hook_resid_post"
            assert back.architecture == run[l].architecture and back.k == run[l].k
            x = cache[f"blocks.{l}.hook_resid_post"]
            np.testing.assert_array_equal(back.encode(x), run[l].encode(x))
            np.testing.assert_array_equal(back(x), run[l](x))
            # cfg.json: SAELens's own keys, as SAELens writes them (the fixture), and the same values where fixed
            ours = json.loads((folder / "cfg.json").read_text())
            ref = json.loads((FIX / fixture / "cfg.json").read_text())
            assert set(ref) <= set(ours), set(ref) - set(ours)
            assert set(ref["metadata"]) <= set(ours["metadata"]), set(ref["metadata"]) - set(ours["metadata"])
            assert ours["architecture"] == ref["architecture"]
            assert ours["metadata"]["hook_name"] == f"blocks.{l}.hook_resid_post"
            assert ours["metadata"]["model_name"] == "induction-2l"
            assert ours["metadata"]["sae_lens_version"].startswith("6.")  # v6 layout, so SAELens skips its pre-6 fixups
            assert ours["normalize_activations"] == "none" and ours["apply_b_dec_to_input"] is True
    with pytest.raises(saes.DictionaryError, match="not empty"):
        relu.save(tmp_path / "standard")
    with pytest.raises(saes.DictionaryError, match="one layer"):
        train.save_saelens(relu.dictionary, tmp_path / "stacked")


def test_jumprelu_and_transcoder(model, batches, tmp_path):
    jr = train.fit(model, batches, architecture="jumprelu", d_sae=32, l0=0.3, init_threshold=0.3, bandwidth=0.1,
                   lr=3e-3, steps=60, layers=0, progress=False)
    d = jr[0]
    assert d.architecture == "jumprelu" and d.threshold.shape == (32,) and bool((d.threshold > 0).all())
    trained = np.asarray(d.threshold) * jr.config["scale_in"][0]  # back in the normalised units it trained in
    assert np.abs(trained - 0.3).max() > 1e-3  # the straight-through gradient reached the thresholds
    ev = jr.history["explained_variance"][:, 0]
    assert ev[-1] > ev[0] + 0.2, ev
    back = saes.load(train.save_saelens(d, tmp_path / "jr", model_name="induction-2l"))
    x = jax.random.normal(jax.random.PRNGKey(0), (5, model.config.d_model)) * 2
    np.testing.assert_array_equal(back.encode(x), d.encode(x))

    tc = train.fit(model, batches, site="ln2.hook_normalized", transcoder_out="hook_mlp_out", architecture="relu",
                   d_sae=32, steps=60, progress=False)
    t1 = tc[1]
    assert t1.is_transcoder and t1.site_name == "blocks.1.ln2.hook_normalized" and t1.out_site_name == "blocks.1.hook_mlp_out"
    assert not t1.apply_b_dec_to_input
    ev = tc.history["explained_variance"]
    assert (ev[-1] > ev[0]).all()
    folder = train.save_saelens(t1, tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder" and cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    back = saes.load(folder)
    assert back.is_transcoder and back.out_site_name == "blocks.1.hook_mlp_out"
    np.testing.assert_array_equal(back(x), t1(x))


def test_jumprelu_straight_through_gradient():
    pre = jnp.array([0.10, 0.2004, 0.1996, 0.30])
    theta = jnp.full(4, 0.2)
    eps = 0.001
    # d/dtheta sum H(pre - theta): -(1/eps) where |pre - theta| < eps/2, else 0; nothing to pre
    g_pre, g_theta = jax.grad(lambda p, t: jumprelu.heaviside(p, t, eps).sum(), argnums=(0, 1))(pre, theta)
    np.testing.assert_allclose(g_theta, [0, -1 / eps, -1 / eps, 0], rtol=1e-6)
    np.testing.assert_array_equal(g_pre, 0)
    # JumpReLU: identity gradient to pre where it fires; -(theta/eps) rect(...) to theta
    g_pre, g_theta = jax.grad(lambda p, t: jumprelu.jump(p, t, eps).sum(), argnums=(0, 1))(pre, theta)
    np.testing.assert_array_equal(g_pre, [0, 1, 0, 1])
    np.testing.assert_allclose(g_theta, [0, -0.2 / eps, -0.2 / eps, 0], rtol=1e-6)


def test_fit_checks_its_arguments(model, batches):
    with pytest.raises(ValueError, match="architecture"):
        train.fit(model, batches, architecture="gated", d_sae=8, steps=1)
    with pytest.raises(ValueError, match="k in"):
        train.fit(model, batches, architecture="topk", d_sae=8, steps=1)
    with pytest.raises(jinterp.sites.SiteError):
        train.fit(model, batches, site="hook_nope", d_sae=8, steps=1)
    with pytest.raises(ValueError, match="no batches"):
        train.fit(model, iter([]), d_sae=8, steps=1)
    with pytest.raises(ValueError, match="resample_every"):
        train.fit(model, batches, d_sae=8, steps=1, resample_every=0)
    with pytest.raises(ValueError, match="auxk_coeff"):
        train.fit(model, batches, architecture="topk", k=2, d_sae=8, steps=1, auxk_coeff=-1.0)
    with pytest.raises(ValueError, match="transcoder_out"):
        train.fit(model, batches, d_sae=8, steps=1, skip=True)
    with pytest.raises(ValueError, match="one per trained layer"):
        train.fit(model, batches, d_sae=8, steps=1, l1=[1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------------
# dead features: AuxK and resampling (jinterp/saes/dead.py)


def _naive_auxk(pre, W_dec, residual, dead, k_aux):
    """AuxK by a loop over tokens (Gao et al. 2024 App. A.2 / SAELens's calculate_topk_aux_loss)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0.0
    k = min(k_aux, n_dead)
    total = 0.0
    for n in range(pre.shape[0]):
        dead_idx = [j for j in range(pre.shape[1]) if dead[j]]
        top = sorted(dead_idx, key=lambda j: -pre[n, j])[:k]
        recon = sum(pre[n, j] * W_dec[j].astype(np.float64) for j in top)
        total += float(((recon - residual[n]) ** 2).sum())
    return min(n_dead / k_aux, 1.0) * total / pre.shape[0]


@pytest.mark.parametrize("n_dead", [0, 2, 4, 9])
def test_auxk_loss_equals_naive_computation(n_dead):
    from jinterp.saes import dead

    rng = np.random.default_rng(n_dead)
    N, d_in, d_sae = 5, 8, 12
    pre = rng.normal(size=(N, d_sae)).astype(np.float32)
    W_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    residual = rng.normal(size=(N, d_in)).astype(np.float32)
    is_dead = np.zeros(d_sae, bool)
    is_dead[rng.permutation(d_sae)[:n_dead]] = True
    k_aux = d_in // 2  # 4: fewer, as many, and more dead latents than k_aux
    ours = dead.auxk_loss(jnp.asarray(pre), jnp.asarray(W_dec), jnp.asarray(residual), jnp.asarray(is_dead), k_aux)
    assert float(ours) == pytest.approx(_naive_auxk(pre, W_dec, residual, is_dead, k_aux), rel=1e-5, abs=1e-6)
    # gradients: none to the residual (detached), and W_dec learns only on dead rows
    g_dec, g_res = jax.grad(lambda w, r: dead.auxk_loss(jnp.asarray(pre), w, r, jnp.asarray(is_dead), k_aux),
                            argnums=(0, 1))(jnp.asarray(W_dec), jnp.asarray(residual))
    np.testing.assert_array_equal(g_res, 0)
    np.testing.assert_array_equal(np.asarray(g_dec)[~is_dead], 0)
    assert n_dead == 0 or np.abs(np.asarray(g_dec)[is_dead]).sum() > 0


def test_resample_layer_and_optimizer_reset():
    import optax

    from jinterp.saes import dead

    rng = np.random.default_rng(0)
    d_in, d_sae, N = 6, 5, 40
    p = {"W_enc": jnp.asarray(rng.normal(size=(d_in, d_sae)), jnp.float32), "b_enc": jnp.ones(d_sae),
         "W_dec": jnp.asarray(rng.normal(size=(d_sae, d_in)), jnp.float32), "b_dec": jnp.zeros(d_in)}
    is_dead = jnp.array([True, False, True, False, False])
    enc_in = jnp.asarray(rng.normal(size=(N, d_in)), jnp.float32)
    loss = jnp.zeros(N).at[7].set(3.0)  # only token 7 has any loss: every dead feature must take it
    new = dead.resample_layer(p, is_dead, enc_in, 2 * enc_in, loss, jax.random.PRNGKey(0), scale=0.2)
    live = ~np.asarray(is_dead)
    for name in ("W_enc", "b_enc", "W_dec"):
        a, b = np.asarray(new[name]), np.asarray(p[name])
        np.testing.assert_array_equal(a[..., live] if name == "W_enc" else a[live], b[..., live] if name == "W_enc" else b[live])
    unit = np.asarray(enc_in[7] / jnp.linalg.norm(enc_in[7]))
    live_norm = np.linalg.norm(np.asarray(p["W_enc"])[:, live], axis=0).mean()
    for j in np.flatnonzero(~live):
        np.testing.assert_allclose(np.asarray(new["W_dec"])[j], unit, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(new["W_enc"])[:, j], 0.2 * live_norm * unit, rtol=1e-5)
        assert float(new["b_enc"][j]) == 0
    # Adam's moments of exactly the rewritten entries go back to 0
    stacked = jax.tree_util.tree_map(lambda v: v[None], p)
    opt = optax.adam(1e-3)
    _, state = opt.update(jax.tree_util.tree_map(jnp.ones_like, stacked), opt.init(stacked), stacked)
    state = dead.reset_optimizer_state(opt, state, dead.reset_masks(stacked, is_dead[None]))
    mu = state[0].mu
    np.testing.assert_array_equal(np.asarray(mu["W_enc"])[0][:, ~live], 0)
    np.testing.assert_array_equal(np.asarray(mu["W_dec"])[0][~live], 0)
    assert (np.asarray(mu["W_enc"])[0][:, live] != 0).all() and (np.asarray(mu["b_dec"]) != 0).all()
    assert int(state[0].count) == 1


def test_resampling_revives_dead_features(model, batches, held_out):
    """A 20-step burst of learning rate 3e-2 kills most of layer 1's features; resampling every 40 steps
    brings them back (measured: about 0.66 never fire on held-out tokens without, 0.06 with)."""
    import optax

    opt = optax.adam(optax.piecewise_constant_schedule(3e-2, {20: 1e-3 / 3e-2}))
    _, cache = model.run_with_cache(held_out, names=["blocks.1.hook_resid_post"])
    never = {}
    for every in (None, 40):
        run = train.fit(model, batches, architecture="relu", layers=1, d_sae=64, l1=1.0, steps=100, dead_window=20,
                        resample_every=every, optimizer=opt, progress=False)
        f = np.asarray(run[1].encode(cache["blocks.1.hook_resid_post"]))[:, 1:]
        never[every] = 1 - (f > 0).any((0, 1)).mean()
        assert run.history["explained_variance"][-1, 0] > 0.85
    assert run.history["resample_step"].tolist() == [40, 80] and run.history["resampled"][0, 0] > 10
    assert never[None] > 0.3 and never[40] < never[None] / 2, never
