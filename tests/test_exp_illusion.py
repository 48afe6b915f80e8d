"""subspace-illusion: the pair generator, the directions, and (slow) the whole quick run."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jinterp
from experiments import subspace_illusion as si
from jinterp import edits as E


@pytest.fixture(scope="module")
def model():
    return jinterp.load("ioi-4l")


def test_pairs_follow_the_paper_design(model):
    g_tr, g_te, t_tr, t_te = si.generators(model.tokenizer)
    assert not set(g_tr.names) & set(g_te.names) and not set(t_tr) & set(t_te)
    combos = [("ABBA", "ABBA"), ("ABBA", "BABA"), ("BABA", "ABBA"), ("BABA", "BABA")]
    base, src, lab, io, s, abb = si.pairs(g_tr, t_tr, combos, 6, seed=0)
    assert base.shape == src.shape == (24, base.shape[1])
    for i in range(24):
        b, c = base[i], src[i]
        assert sorted(b[b == io[i]].tolist() + b[b == s[i]].tolist()) == sorted(c[c == io[i]].tolist() + c[c == s[i]].tolist())
        io_first_b = np.flatnonzero(b == io[i])[0] < np.flatnonzero(b == s[i])[0]
        io_first_c = np.flatnonzero(c == io[i])[0] < np.flatnonzero(c == s[i])[0]
        assert io_first_b == abb[i]
        # flipped S position -> the base's S is the answer; same order -> the base's IO
        assert lab[i] == (s[i] if io_first_b != io_first_c else io[i])
        # only the two name slots differ
        assert ((b != c).sum() == 0) if io_first_b == io_first_c else ((b != c).sum() == 2)


def test_gradient_direction_matches_finite_differences(model):
    g_tr, _, t_tr, _ = si.generators(model.tokenizer)
    base, _, _, io, s, _ = si.pairs(g_tr, t_tr, [("ABBA", "BABA")], 8, seed=1)
    P = base.shape[1]
    grad = si.gradient_direction(model, base, io, s, 2, P - 1)
    u = np.random.default_rng(0).normal(size=grad.shape).astype(np.float32)
    eps = 1e-2

    def ld(c):
        lg = np.asarray(model(base, edits=[E.steer("hook_resid_post", c * u, layers=2, pos=P - 1)]), np.float64)[:, -1]
        return float(np.mean(si._ld(lg, io, s)))

    fd = (ld(eps) - ld(-eps)) / (2 * eps)
    assert float(grad @ u) == pytest.approx(fd, rel=2e-2, abs=2e-2)


@pytest.mark.slow
def test_quick_run(tmp_path):
    from experiments import run

    out = run("subspace-illusion", tmp_path / "si", quick=True)
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["claims"]) == 5
    import pandas as pd

    t = pd.read_csv(out / "patches.csv").set_index("patch")
    assert set(t.index) == set(si.PAPER)
    # the full residual patch row, recomputed with plain edits on the same test pairs
    m = jinterp.load("ioi-4l")
    g_tr, g_te, t_tr, t_te = si.generators(m.tokenizer)
    base, src, lab, io, s, _ = si.pairs(g_te, t_te, [("ABBA", "BABA"), ("BABA", "ABBA")], 32, 1)
    layer = rep["numbers"]["layer"]
    _, cache = m.run_with_cache(src, names=[f"blocks.{layer}.hook_resid_post"])
    e = E.patch("hook_resid_post", cache[f"blocks.{layer}.hook_resid_post"], layers=layer, pos=base.shape[1] - 1)
    lg = np.asarray(m(base, edits=[e]))[:, -1]
    assert t.loc["full resid", "IA"] == pytest.approx(float((lg.argmax(-1) == lab).mean()), abs=1e-6)
    npz = np.load(out / "subspace_illusion.npz")
    np.testing.assert_allclose(npz["v_row"] + npz["v_null"], npz["v_mlp"], atol=1e-6)
    W_out = np.asarray(m.W_out[layer], np.float64)
    assert np.linalg.norm(npz["v_null"] @ W_out) < 1e-4
