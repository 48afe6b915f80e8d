"""Probes (jinterp.train.probes): logistic and difference-of-means probes on every layer at once.

References are independent: scikit-learn's LogisticRegression (float64, its own solver) on the
same split and objective (C = 1 / (l2 * n_train) on standardised features), and numpy class means.
Shapes are shared between tests where possible so each compiled fit is built once.
"""

import numpy as np
import pytest

import jinterp
from jinterp import sites as S
from jinterp.train import fitted, probes

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

L2 = 1e-3


def sklearn_test_acc(X, y, train_idx, test_idx, l2=L2):
    """scikit-learn's test accuracy and raw-space coefficients [d, C'] for our objective."""
    X = np.asarray(X, np.float64)
    sc = StandardScaler().fit(X[train_idx])
    clf = LogisticRegression(C=1.0 / (l2 * len(train_idx)), tol=1e-10, max_iter=10_000)
    clf.fit(sc.transform(X[train_idx]), y[train_idx])
    return clf.score(sc.transform(X[test_idx]), y[test_idx]), clf.coef_.T / sc.scale_[:, None]


def gaussian_layers(seps, N=1000, d=32, n_classes=2, seed=0):
    """[len(seps), N, d]: class means separated by `sep` along fixed directions, anisotropic noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, N)
    means = rng.normal(size=(n_classes, d))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    scales = rng.uniform(0.5, 3.0, d)
    acts = np.stack([rng.normal(size=(N, d)) * scales + 5.0 + s * means[y] for s in seps])
    return acts.astype(np.float32), y


@pytest.fixture(scope="module")
def synth():
    """Four "layers" of 3-class Gaussians, growing separability (multinomial softmax)."""
    acts, y = gaussian_layers([0.5, 1.5, 3.0, 8.0], N=1000, d=32, n_classes=3)
    return acts, y, probes.fit(acts, y, l2=L2)


@pytest.fixture(scope="module")
def real():
    """Induction model, binary label: does the last token occur earlier in the row (N=2000, 16 tokens).
    Returns (model, tokens, labels, ProbeSet from fit_model, resid_post at the last position [2, N, 64]
    read from run_with_cache independently of probes.collect)."""
    model = jinterp.load("induction-2l", tokenizer=False)
    rng = np.random.default_rng(0)
    N, P = 2000, 16
    toks = rng.integers(2, model.cfg.d_vocab, size=(N, P)).astype(np.int32)
    toks[:, 0] = 0
    rep = rng.integers(0, 2, N)
    for i in range(N):
        prev = toks[i, 1 : P - 1]
        toks[i, -1] = rng.choice(prev) if rep[i] else rng.choice(np.setdiff1d(np.arange(2, model.cfg.d_vocab), prev))
    ps = probes.fit_model(model, toks, rep, site="resid_post", pos=-1, test_frac=0.25, l2=L2)
    _, cache = model.run_with_cache(toks, names=[f"blocks.{l}.hook_resid_post" for l in range(2)])
    acts = np.asarray(cache.stack("hook_resid_post")[:, :, -1])
    return model, toks, rep, ps, acts


# ------------------------------------------------------------------------------- agreement


def test_logistic_matches_sklearn_on_gaussians(synth):
    acts, y, ps = synth
    assert ps.W.shape == (4, 32, 3) and ps.test_acc.shape == (4,) and list(ps.classes) == [0, 1, 2]
    assert (ps.n_iter < 500).all()  # converged to tol, not stopped by the step cap
    ref = []
    for l in range(4):
        acc, coef = sklearn_test_acc(acts[l], y, ps.train_idx, ps.test_idx)
        ref.append(acc)
        W = ps.W[l] - ps.W[l].mean(1, keepdims=True)  # softmax is shift-invariant; the penalty centres it
        np.testing.assert_allclose(W, coef, rtol=0, atol=2e-3 * np.abs(coef).max())
    np.testing.assert_allclose(ps.test_acc, ref, atol=0.01)
    assert np.all(np.diff(ps.test_acc) > 0) and ps.test_acc[-1] > 0.95  # separability grows by layer
    np.testing.assert_allclose(ps.accuracy(acts, y), (ps.predict(acts) == y).mean(1))
    np.testing.assert_allclose(ps.accuracy(acts[:, ps.test_idx], y[ps.test_idx]), ps.test_acc)
    assert not set(ps.test_idx) & set(ps.train_idx) and len(ps.test_idx) + len(ps.train_idx) == 1000
    for c in range(3):  # stratified: each class keeps its share in the test set
        assert abs((y[ps.test_idx] == c).sum() - 0.2 * (y == c).sum()) <= 1


def test_real_activations_every_layer_vs_sklearn(real):
    model, toks, y, ps, acts = real
    assert ps.W.shape == (2, 64, 2) and ps.directions.shape == (2, 64) and len(ps.test_idx) == 500
    for l in range(2):
        acc, coef = sklearn_test_acc(acts[l], y, ps.train_idx, ps.test_idx)
        assert abs(ps.test_acc[l] - acc) <= 0.01, (l, ps.test_acc[l], acc)
        cos = coef[:, 0] @ ps.directions[l] / np.linalg.norm(coef) / np.linalg.norm(ps.directions[l])
        assert cos > 0.999, (l, cos)
    assert ps.test_acc[1] > 0.85  # the induction layer knows whether the token was seen before
    np.testing.assert_allclose(ps.accuracy(acts[:, ps.test_idx], y[ps.test_idx]), ps.test_acc)


def test_vmapped_fit_equals_per_layer_fits(real):
    _, _, y, ps, acts = real
    for l in range(2):
        one = probes.fit(acts[l], y, l2=L2, test_frac=0.25)  # [N, d]: this layer alone
        np.testing.assert_array_equal(one.train_idx, ps.train_idx)
        np.testing.assert_allclose(one.W[0], ps.W[l], rtol=0, atol=1e-4 * np.abs(ps.W[l]).max())
        np.testing.assert_allclose(one.b[0], ps.b[l], rtol=0, atol=1e-4 * max(1.0, np.abs(ps.b[l]).max()))
        assert abs(one.test_acc[0] - ps.test_acc[l]) <= 1 / 500
        assert (one.predict(acts[l]) != ps.predict(acts[l], layer=l)).mean() <= 0.002


def test_mean_diff_is_class_mean_difference(real, synth):
    _, _, y, _, acts = real
    md = probes.fit(acts, y, kind="mean_diff", test_frac=0.25)
    tr = md.train_idx
    a = acts.astype(np.float64)
    mu0, mu1 = a[:, tr][:, y[tr] == 0].mean(1), a[:, tr][:, y[tr] == 1].mean(1)  # [L, d]
    np.testing.assert_allclose(md.directions, mu1 - mu0, rtol=0, atol=1e-4 * np.abs(mu1 - mu0).max())
    score = np.einsum("lnd,ld->ln", a, mu1 - mu0) - np.einsum("ld,ld->l", (mu0 + mu1) / 2, mu1 - mu0)[:, None]
    clear = np.abs(score) > 1e-3 * np.abs(score).max()  # away from the threshold, where float32 may tip
    assert (md.predict(acts)[clear] == (score > 0)[clear]).all()
    assert (md.n_iter == 0).all() and md.kind == "mean_diff"

    # multi-class: nearest class mean
    acts3, y3, _ = synth
    md3 = probes.fit(acts3, y3, kind="mean_diff")
    tr3 = md3.train_idx
    means = np.stack([acts3[:, tr3][:, y3[tr3] == c].astype(np.float64).mean(1) for c in range(3)], 1)  # [L, C, d]
    dist = ((acts3[:, :, None, :].astype(np.float64) - means[:, None]) ** 2).sum(-1)  # [L, N, C]
    srt = np.sort(dist, -1)
    clear = srt[..., 1] - srt[..., 0] > 1e-3 * srt[..., 0]
    assert (md3.predict(acts3)[clear] == dist.argmin(-1)[clear]).all()


# ------------------------------------------------------------------------------- collect


def test_collect_positions_and_sites(real):
    model, toks, _, _, acts = real
    np.testing.assert_allclose(np.asarray(probes.collect(model, toks, "hook_resid_post", pos=-1)), acts)
    np.testing.assert_allclose(np.asarray(probes.collect(model, toks, "resid_post", pos="last", batch_size=768)), acts)
    _, cache = model.run_with_cache(toks, names=[f"blocks.{l}.hook_resid_post" for l in range(2)])
    full = np.asarray(cache.stack("hook_resid_post"))
    pos = np.arange(len(toks)) % toks.shape[1]
    got = np.asarray(probes.collect(model, toks, "hook_resid_post", pos=pos))
    np.testing.assert_allclose(got, full[:, np.arange(len(toks)), pos])
    with pytest.raises(S.SiteError, match="unknown site 'hook_resid_psot'"):
        probes.collect(model, toks, "hook_resid_psot")
    with pytest.raises(S.SiteError, match="global site"):
        probes.collect(model, toks, "hook_embed")
    with pytest.raises(probes.ProbeError, match="one position per example"):
        probes.collect(model, toks, pos=np.zeros(3, int))
    with pytest.raises(probes.ProbeError, match="out of range for sequences of 16"):
        probes.collect(model, toks, pos=16)
    mask = np.ones(toks[:4].shape, bool)
    mask[1, 10:] = False  # right padding: position -1 of row 1 is padding
    with pytest.raises(probes.ProbeError, match="example 1 is padding.*pos='last'"):
        probes.collect(model, toks[:4], pos=-1, attention_mask=mask)


# ------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(real, tmp_path):
    model, toks, y, ps, _ = real
    prov = ps.meta["provenance"]
    assert prov["model"] == "induction-2l" and prov["site"] == "hook_resid_post" and prov["pos"] == -1
    assert prov["tokens"]["sha256"] == fitted.fingerprint(toks) and prov["layers"] == [0, 1]
    ps.save(tmp_path / "p", provenance={"note": "repeat detector"})
    back = probes.load(tmp_path / "p")
    for f in ("W", "b", "classes", "train_idx", "test_idx", "train_acc", "test_acc", "n_iter"):
        np.testing.assert_array_equal(getattr(back, f), getattr(ps, f))
    assert back.kind == "logistic" and back.meta["provenance"]["note"] == "repeat detector"
    assert back.meta["provenance"]["tokens"] == prov["tokens"]
    assert back.meta["hyperparameters"]["l2"] == pytest.approx(L2) and back.meta["layers"] == [0, 1]
    assert back.meta["hyperparameters"]["C_sklearn"] == pytest.approx(1 / (L2 * len(ps.train_idx)))
    with pytest.raises(fitted.FittedError, match="not empty"):
        ps.save(tmp_path / "p")
    with pytest.raises(fitted.FittedError, match="holds a 'probes'"):
        fitted.load(tmp_path / "p", "das")


# ------------------------------------------------------------------------------- errors


def test_bad_inputs_are_refused():
    acts, y = gaussian_layers([1.0, 2.0], N=50, d=4)
    with pytest.raises(probes.ProbeError, match="labels have 49 entries but the activations have 50"):
        probes.fit(acts, y[:49])
    with pytest.raises(probes.ProbeError, match=r"1-D class ids.*labels.argmax\(-1\)"):
        probes.fit(acts, np.eye(2)[y])
    with pytest.raises(probes.ProbeError, match="single class"):
        probes.fit(acts, np.zeros(50, int))
    with pytest.raises(probes.ProbeError, match="integer class ids"):
        probes.fit(acts, y + 0.5)
    bad = acts.copy()
    bad[1, 3, 2] = np.nan
    with pytest.raises(probes.ProbeError, match="layer 1 contain NaN or inf"):
        probes.fit(bad, y)
    bad[1, 3, 2] = np.inf
    with pytest.raises(probes.ProbeError, match="layer 7 contain NaN or inf"):
        probes.fit(bad, y, layers=[6, 7])
    with pytest.raises(probes.ProbeError, match="leaves no test examples"):
        probes.fit(acts, y, test_frac=0.001)
    with pytest.raises(probes.ProbeError, match="test_frac=0 leaves no test"):
        probes.fit(acts, y, test_frac=0)
    with pytest.raises(probes.ProbeError, match="test_frac=1.0 leaves no training"):
        probes.fit(acts, y, test_frac=1.0)
    with pytest.raises(probes.ProbeError, match="kind must be one of"):
        probes.fit(acts, y, kind="svm")
    with pytest.raises(probes.ProbeError, match=r"must be \[L, N, d\]"):
        probes.fit(acts[None], y)


def test_non_finite_weights_name_the_layer(real):
    _, _, y, _, acts = real  # the shape of an earlier fit: its compiled program is reused
    acts = acts.copy()
    acts[1] = 3e38  # finite, but the class sums overflow float32
    with pytest.raises(probes.ProbeError, match="probe at layer 1 has non-finite weights"):
        probes.fit(acts, y, kind="mean_diff", test_frac=0.25)
