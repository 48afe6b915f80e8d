"""DAS and Boundless DAS (jinterp.train.das) on the IOI organism, against naive computations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jinterp
from experiments.data import ioi as data
from jinterp import edits as E
from jinterp.train import das


@pytest.fixture(scope="module")
def model():
    return jinterp.load("ioi-4l")


def role_swap_pairs(model, n, seed):
    """Base ABB prompts; source: IO and S swapped everywhere; label: the base's S (the variable
    'which name is repeated' taken from the source). One template length, so END is shared."""
    g = data.IOIGenerator(model.tokenizer)
    b = g.sample(np.random.default_rng(seed), n, templates=np.where(g.template_lengths == 16)[0], order="ABBA")
    src, label = data.role_swap(b)
    return b.tokens, src, label


@pytest.fixture(scope="module")
def pairs(model):
    return role_swap_pairs(model, 96, 0)


def test_toy_illusion():
    """methods.md §5 toy: e1 disconnected (w.e1 = 0) carries the feature, e2 dormant (h2 = 0 always,
    w.e2 != 0). Patching along v = (e1 + e2)/sqrt(2) moves the readout by (x_s - x_b) w2 / 2; patching
    e1 alone, e2 alone, or the whole vector moves it not at all."""
    w = np.array([0.0, 2.0, 1.0])
    h = lambda x: np.array([[x, 0.0, 0.7]], np.float32)[None]  # [batch, pos, d]
    hb, hs = h(0.0), h(1.0)

    def readout(basis):
        e = E.subspace_patch("hook_resid_post", hs, np.asarray(basis, np.float32), layers=0, pos=0)
        out = E.apply(e, jnp.asarray(hb), layer=0, cols=jnp.arange(1), n_prompt=1, n_keys=1, n_layers=1)
        return float(np.asarray(out)[0, 0] @ w)

    e1, e2, e3 = np.eye(3)
    base = float(hb[0, 0] @ w)
    assert readout(e1[:, None]) == pytest.approx(base)
    assert readout(e2[:, None]) == pytest.approx(base)
    assert readout(np.eye(3)) == pytest.approx(base)  # the full patch: no effect either
    v = ((e1 + e2) / np.sqrt(2))[:, None]
    assert readout(v) == pytest.approx(base + 0.5 * (1.0 - 0.0) * w[1])


def test_patched_logits_equal_naive_edits(model, pairs):
    base, src, _ = pairs
    base, src = base[:8], src[:8]
    rng = np.random.default_rng(1)
    B = np.stack([np.linalg.qr(rng.normal(size=(64, 2)))[0] for _ in range(2)]).astype(np.float32)
    got = das.patched_logits(model, base, src, B, site="hook_resid_post", layers=[1, 2], pos=[15, 15])
    _, cache = model.run_with_cache(src, names=lambda n: n.endswith("hook_resid_post"))
    for i, l in enumerate([1, 2]):
        e = E.subspace_patch("hook_resid_post", cache[f"blocks.{l}.hook_resid_post"], B[i], layers=l, pos=15)
        want = np.asarray(model(base, edits=[e]))[:, -1]
        np.testing.assert_allclose(got[i], want, atol=2e-4)
    full = das.patched_logits(model, base, src, None, site="mlp.hook_post", layers=[2], pos=[15])[0]
    _, cm = model.run_with_cache(src, names=["blocks.2.mlp.hook_post"])
    want = np.asarray(model(base, edits=[E.patch("mlp.hook_post", cm["blocks.2.mlp.hook_post"], layers=2, pos=15)]))[:, -1]
    np.testing.assert_allclose(full, want, atol=2e-4)


@pytest.mark.slow
def test_fit_all_layers_at_once_equals_one_by_one_and_learns(model, pairs):
    base, src, lab = pairs
    kw = dict(site="hook_resid_post", pos=-1, k=1, steps=24, lr=3e-2, batch_size=32, seed=3, progress=False)
    both = das.fit(model, base, src, lab, layers=[0, 2], **kw)
    one = das.fit(model, base, src, lab, layers=[2], **kw)
    assert both.layers == (0, 2) and both.pos == (15, 15)
    np.testing.assert_allclose(both.loss[:, 1], one.loss[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(both.basis[1], one.basis[0], atol=1e-3)
    for i in range(2):
        Bi = both.subspace(i)
        np.testing.assert_allclose(Bi.T @ Bi, np.eye(1), atol=1e-5)
    # the full patch at END carries the variable (the repeated name); it is name-valued, so one
    # dimension carries only part of it: the loss falls, and the accuracies are what plain edits give
    assert both.loss[-4:].mean(0)[0] < both.loss[:4].mean(0)[0] - 1.0
    assert both.full_acc.min() == 1.0 and both.base_acc == 0.0
    # the reported accuracy is the accuracy of the saved subspace, recomputed with plain edits
    _, cache = model.run_with_cache(base, names=["blocks.2.hook_resid_post"])
    _, scache = model.run_with_cache(src, names=["blocks.2.hook_resid_post"])
    logits = np.asarray(model(base, edits=[both.edit(1, scache["blocks.2.hook_resid_post"])]))[:, -1]
    n_test = both.meta["n_test"]
    assert 0 < n_test < len(base)
    assert (logits.argmax(-1) == lab).mean() == pytest.approx(
        (both.train_acc[1] * (len(base) - n_test) + both.test_acc[1] * n_test) / len(base), abs=1e-6)


@pytest.mark.slow
def test_boundless_fit(model, pairs):
    base, src, lab = pairs
    f = das.fit(model, base, src, lab, site="mlp.hook_post", layers=1, boundless=True, max_k=8, steps=20,
                batch_size=32, progress=False)
    assert f.basis.shape == (1, 256, 8) and 1 <= f.k[0] <= 8 and f.boundary.shape == (1,)
    Bk = f.subspace(0)
    np.testing.assert_allclose(Bk.T @ Bk, np.eye(int(f.k[0])), atol=1e-5)
    assert np.abs(f.basis[0][:, int(f.k[0]):]).max() == 0.0


def test_boundary_mask():
    b, m, T = 0.3, 10, 0.5
    want = 1 / (1 + np.exp(-(b * m - np.arange(m) - 0.5) / T))
    np.testing.assert_allclose(np.asarray(das.boundary_mask(b, m, T)), want, rtol=1e-6)
    assert das.hard_k(0.3, 10) == 3 and das.hard_k(0.0, 10) == 1 and das.hard_k(1.0, 10) == 10


def test_save_load(model, pairs, tmp_path):
    base, src, lab = pairs
    f = das.fit(model, base, src, lab, layers=1, steps=3, batch_size=16, progress=False)
    f.save(tmp_path / "d")
    g = das.DASFit.load(tmp_path / "d")
    np.testing.assert_array_equal(g.basis, f.basis)
    assert (g.site, g.layers, g.pos) == (f.site, f.layers, f.pos)
    assert g.meta["model"] == "ioi-4l" and g.meta["base_tokens"]["shape"] == list(base.shape)
    with pytest.raises(ValueError, match="not empty"):
        f.save(tmp_path / "d")


def test_bad_input(model, pairs):
    base, src, lab = pairs
    fit = lambda **kw: das.fit(model, base, src, kw.pop("labels", lab), **{"steps": 2, "progress": False, **kw})
    with pytest.raises(das.DASError, match="k=65 but hook_resid_post has width 64"):
        fit(k=65)
    with pytest.raises(das.DASError, match=r"labels must be one token id per pair, int \[96\]"):
        fit(labels=lab[:5])
    with pytest.raises(das.DASError, match="unknown block site 'hook_resid_pots'.*hook_resid_post"):
        fit(site="hook_resid_pots")
    with pytest.raises(das.DASError, match="laid out"):
        fit(site="attn.hook_pattern")
    with pytest.raises(das.DASError, match="layers \\[7\\] out of range"):
        fit(layers=7)
    with pytest.raises(das.DASError, match="source_tokens has 5"):
        das.fit(model, base, src[:5], lab, steps=1, progress=False)
    with pytest.raises(das.DASError, match=r"loss became nan at step 1 for hook_resid_post at layer 1, position 15"):
        fit(layers=1, lr=float("nan"), batch_size=16)
