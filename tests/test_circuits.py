"""Weight-space circuits against numpy on materialised d_model x d_model matrices, head by head."""

import numpy as np
import pytest

import jinterp
from jinterp import circuits, patching, metrics
from jinterp import edits as E
from tests import hf_zoo


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied-bias"])
def model(request, tmp_path_factory):
    return jinterp.load(hf_zoo.save(hf_zoo.build(request.param), tmp_path_factory.mktemp(request.param)))


def np_heads(m, fold):
    """Independent numpy version of the folded head matrices: per (l, h), with h -> h // group for K/V."""
    c, a = m.config, {k: np.asarray(v, np.float64) for k, v in m.params["blocks"]["attn"].items() if k.startswith("W")}
    w = np.asarray(m.params["blocks"]["ln1"]["w"], np.float64)
    G = c.n_heads // c.n_kv_heads
    out = {}
    for l in range(c.n_layers):
        for h in range(c.n_heads):
            Wq, Wk, Wv, Wo = a["W_Q"][l, h], a["W_K"][l, h // G], a["W_V"][l, h // G], a["W_O"][l, h]
            if fold:
                Wq, Wk, Wv = (np.diag(w[l]) @ x for x in (Wq, Wk, Wv))
                if c.norm == "layernorm":  # centring matrix C = I - 11^T/D on both sides
                    C = np.eye(c.d_model) - 1.0 / c.d_model
                    Wq, Wk, Wv, Wo = C @ Wq, C @ Wk, C @ Wv, Wo @ C
            out[l, h] = dict(OV=Wv @ Wo, QK=Wq @ Wk.T)
    return out


def test_factored_matrix_against_numpy():
    rs = np.random.RandomState(0)
    A, B = rs.randn(3, 10, 4), rs.randn(3, 4, 10)
    fm = circuits.FactoredMatrix(A, B)
    full = A @ B
    np.testing.assert_allclose(fm.AB, full, rtol=1e-5, atol=1e-5)
    u, s, vh = fm.svd()
    np.testing.assert_allclose(s, np.linalg.svd(full)[1][:, :4], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(u) * np.asarray(s)[:, None] @ np.asarray(vh), full, atol=1e-4)
    np.testing.assert_allclose(fm.norm(), np.linalg.norm(full, axis=(1, 2)), rtol=1e-5)
    ev = np.sort_complex(np.asarray(fm.eigenvalues()[0]))
    ref = np.linalg.eigvals(full[0])
    ref = np.sort_complex(ref[np.argsort(-np.abs(ref))[:4]])
    np.testing.assert_allclose(ev, ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fm.T.AB, np.swapaxes(full, -1, -2), atol=1e-5)
    C = rs.randn(3, 10, 7)
    np.testing.assert_allclose((fm @ C).AB, full @ C, atol=1e-4)
    np.testing.assert_allclose((fm @ fm).AB, full @ full, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(fm[1].AB, full[1], atol=1e-5)
    np.testing.assert_allclose(fm.collapse_l(), np.asarray(s)[..., None] * np.asarray(vh), atol=1e-5)


@pytest.mark.parametrize("fold", [False, True])
def test_ov_qk_and_svd_every_head(model, fold):
    ref = np_heads(model, fold)
    ov, qk = circuits.OV(model, fold), circuits.QK(model, fold)
    _, S, _ = circuits.svd(model, "OV", fold)
    for (l, h), r in ref.items():
        np.testing.assert_allclose(ov[l, h].AB, r["OV"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(qk[l, h].AB, r["QK"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(S[l, h], np.linalg.svd(r["OV"])[1][: model.cfg.d_head], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_composition_scores_against_numpy(model, kind):
    ref = np_heads(model, True)
    c = model.config
    got = np.asarray(circuits.composition_scores(model, kind))
    assert got.shape == (c.n_layers, c.n_heads, c.n_layers, c.n_heads)
    for (l1, h1), w in ref.items():
        for (l2, h2), r in ref.items():
            if l1 >= l2:
                assert np.isnan(got[l1, h1, l2, h2])
                continue
            M = {"Q": r["QK"], "K": r["QK"].T, "V": r["OV"]}[kind]
            want = np.linalg.norm(w["OV"] @ M) / (np.linalg.norm(w["OV"]) * np.linalg.norm(M))
            np.testing.assert_allclose(got[l1, h1, l2, h2], want, rtol=2e-4)


def test_component_composition(model):
    ref = np_heads(model, True)
    cs = np.asarray(circuits.component_composition(model, "K"))
    full = np.asarray(circuits.composition_scores(model, "K"))
    (l1, h1), (l2, h2) = (0, 1), (2, 0)
    U, S, Vh = np.linalg.svd(ref[l1, h1]["OV"])
    M = ref[l2, h2]["QK"].T
    want = np.linalg.norm(Vh[: model.cfg.d_head] @ M, axis=1) / np.linalg.norm(M)
    np.testing.assert_allclose(cs[l1, h1, :, l2, h2], want, rtol=2e-4, atol=1e-6)
    # ||OV M||^2 = sum_r s_r^2 ||v_r M||^2: components recombine into the head's score
    s = S[: model.cfg.d_head]
    np.testing.assert_allclose(np.sqrt((s**2 * cs[l1, h1, :, l2, h2] ** 2).sum() / (s**2).sum()), full[l1, h1, l2, h2], rtol=2e-4)
    df = circuits.channels(model, kinds=("K",), top=5)
    assert list(df.score) == sorted(df.score, reverse=True) and len(df) == 5
    assert df.score[0] == pytest.approx(np.nanmax(cs), rel=1e-5)


def test_svd_tokens_reads_out_through_unembedding(model):
    res = circuits.svd_tokens(model, 1, 0, "OV", n_vectors=2, k=3)
    _, _, vh = circuits.svd(model, "OV")
    logits = np.asarray(vh[1, 0, 0]) @ (np.asarray(model.params["ln_final"]["w"])[:, None] * np.asarray(model.params["unembed"]["W_U"]))
    assert [t for t, _ in res[0]["top"]] == [str(i) for i in np.argsort(logits)[::-1][:3]]
    assert res[0]["singular_value"] >= res[1]["singular_value"]
    q = circuits.svd_tokens(model, 1, 0, "QK", n_vectors=1, k=2)
    assert set(q[0]) >= {"query", "key"}


@pytest.mark.parametrize("kind,fold", [("OV", True), ("OV", False), ("QK", True)])
def test_rescale_components(model, kind, fold):
    ref = np_heads(model, fold)[1, 1][kind]
    U, S, Vh = np.linalg.svd(ref)
    edited = model.with_params(circuits.rescale_components(model, 1, 1, [0, 2], 0.25, kind, fold))
    new = np_heads(edited, fold)[1, 1][kind]
    # exactly components 0 and 2 scaled by 0.25, everything else the same
    want = ref + (0.25 - 1) * (S[0] * np.outer(U[:, 0], Vh[0]) + S[2] * np.outer(U[:, 2], Vh[2]))
    np.testing.assert_allclose(new, want, atol=1e-4 * np.abs(ref).max())
    others = {k: v for k, v in np_heads(edited, fold).items() if k != (1, 1)}
    for k, v in others.items():
        np.testing.assert_allclose(v[kind], np_heads(model, fold)[k][kind], atol=1e-6)
    removed = np_heads(model.with_params(circuits.remove_components(model, 1, 1, [0, 0], kind, fold)), fold)[1, 1][kind]
    np.testing.assert_allclose(np.linalg.svd(removed)[1][: model.cfg.d_head - 1], S[1 : model.cfg.d_head], rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="components must be in"):
        circuits.remove_components(model, 1, 1, [model.cfg.d_head], kind, fold)


def test_zero_head_equals_ablating_it_and_runs_through_sweeps(model):
    toks = np.random.RandomState(0).randint(0, hf_zoo.V, (2, 7))
    edited = model.with_params(circuits.zero_head(model, 2, 1))
    ablated = model(toks, edits=[E.zero_ablate("blocks.2.attn.hook_z", heads=[1])])
    np.testing.assert_allclose(np.asarray(edited(toks)), np.asarray(ablated), atol=2e-5)
    # the edited model goes through caches and compiled sweeps; patching a head that writes nothing does nothing
    clean = np.random.RandomState(1).randint(0, hf_zoo.V, (2, 7))
    _, cache = edited.run_with_cache(clean)
    metric = metrics.logit_diff([[1, 2], [3, 4]])
    r = patching.attn_head_out_all_pos(edited, toks, cache, metric, progress=False)
    np.testing.assert_allclose(r.values[2, 1], float(metric(edited(toks))), atol=1e-5)
    assert np.abs(r.values - float(metric(edited(toks)))).max() > 1e-4
