"""Patching recipes against naive per-cell loops of single-edit forwards, plus the driver's features."""

import dataclasses

import jax
import numpy as np
import pytest

import jinterp
from jinterp import edits as E
from jinterp import metrics, patching
from jinterp.engine import driver, store, traced
from tests import hf_zoo

B, P = 3, 8


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied-bias", "mistral-sliding"])
def setup(request, tmp_path_factory):
    hf = hf_zoo.build(request.param)
    m = jinterp.load(hf_zoo.save(hf, tmp_path_factory.mktemp(request.param)))
    rs = np.random.RandomState(0)
    clean = rs.randint(0, hf_zoo.V, (B, P))
    corr = clean.copy()
    corr[:, 2] = rs.randint(0, hf_zoo.V, B)
    corr[:, 5] = rs.randint(0, hf_zoo.V, B)
    metric = metrics.logit_diff(rs.randint(0, hf_zoo.V, (B, 2)))
    _, cache = m.run_with_cache(clean)
    return request.param, m, clean, corr, cache, metric


def naive(m, corr, cache, metric, site, shape, use_pos, use_head):
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        l = idx[0]
        pos = [idx[1]] if use_pos else None
        heads = [idx[-1]] if use_head else None
        e = E.patch(f"blocks.{l}.{site}", cache[f"blocks.{l}.{site}"], pos=pos, heads=heads)
        out[idx] = float(metric(m(corr, edits=[e])))
    return out


def check(result, ref):
    assert result.shape == ref.shape
    np.testing.assert_allclose(result.values, ref, atol=3e-5 * max(1, np.abs(ref).max()))


LAYER_POS = [("resid_pre", "hook_resid_pre"), ("resid_mid", "hook_resid_mid"), ("resid_post", "hook_resid_post"),
             ("attn_out", "hook_attn_out"), ("mlp_out", "hook_mlp_out")]


@pytest.mark.parametrize("fn,site", LAYER_POS)
def test_layer_pos_recipes(setup, fn, site):
    _, m, _, corr, cache, metric = setup
    r = getattr(patching, fn)(m, corr, cache, metric, progress=False)
    assert r.axes == ("layer", "pos")
    check(r, naive(m, corr, cache, metric, site, (m.cfg.n_layers, P), True, False))


@pytest.mark.parametrize("kind", ["out", "q", "k", "v", "pattern"])
def test_head_all_pos_recipes(setup, kind):
    _, m, _, corr, cache, metric = setup
    site = {"out": "attn.hook_z", "pattern": "attn.hook_pattern"}.get(kind, f"attn.hook_{kind}")
    nh = m.cfg.n_kv_heads if kind in ("k", "v") else m.cfg.n_heads  # GQA: k/v per key/value head
    r = getattr(patching, f"attn_head_{kind}_all_pos")(m, corr, cache, metric, progress=False)
    hax = "kv_head" if kind in ("k", "v") else "head"  # keys and values are per key/value head
    assert r.axes == ("layer", hax) and r.shape == (m.cfg.n_layers, nh)
    assert r.labels[1][0] == ("KV0" if hax == "kv_head" else "H0")
    check(r, naive(m, corr, cache, metric, site, (m.cfg.n_layers, nh), False, True))


@pytest.mark.parametrize("kind", ["out", "k", "pattern"])
def test_head_by_pos_recipes(setup, kind):
    _, m, _, corr, cache, metric = setup
    site = {"out": "attn.hook_z", "pattern": "attn.hook_pattern"}.get(kind, f"attn.hook_{kind}")
    nh = m.cfg.n_kv_heads if kind in ("k", "v") else m.cfg.n_heads
    r = getattr(patching, f"attn_head_{kind}_by_pos")(m, corr, cache, metric, progress=False)
    assert r.axes == ("layer", "pos", "kv_head" if kind in ("k", "v") else "head")
    check(r, naive(m, corr, cache, metric, site, (m.cfg.n_layers, P, nh), True, True))


def test_every_variants(setup):
    name, m, _, corr, cache, metric = setup
    L, H, kv = m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_kv_heads
    be = patching.block_every(m, corr, cache, metric, progress=False)
    assert list(be) == ["resid_pre", "attn_out", "mlp_out"]
    st = be.stack()
    assert st.shape == (3, L, P) and st.labels[0] == ("resid_pre", "attn_out", "mlp_out") and st.axes == ("component", "layer", "pos")
    np.testing.assert_allclose(st.values[1], patching.attn_out(m, corr, cache, metric, progress=False).values, atol=1e-6)
    ev = patching.attn_head_all_pos_every(m, corr, cache, metric, progress=False)
    assert ev["q"].shape == (L, H) and ev["k"].shape == (L, kv) and ev["k"].axes == ("layer", "kv_head")
    np.testing.assert_allclose(ev["k"].values, patching.attn_head_k_all_pos(m, corr, cache, metric, progress=False).values, atol=1e-6)
    assert not any(np.isnan(r.values).any() for r in ev.values())
    if kv < H:  # key/value heads do not stack with query heads
        with pytest.raises(ValueError, match="kv_head"):
            ev.stack()
    bp = patching.attn_head_by_pos_every(m, corr, cache, metric, progress=False)
    assert bp["out"].shape == (L, P, H) and bp["v"].shape == (L, P, kv)
    assert "Results(" in repr(bp) and len(repr(bp).splitlines()) == 6


def test_identity_full_patch_at_layer0_gives_clean_metric(setup):
    _, m, clean, corr, cache, metric = setup
    r = patching.resid_pre(m, corr, cache, metric, progress=False)
    clean_metric = float(metric(m(clean)))
    # patching position p at layer 0 fixes only p; patching the *differing* positions (2 and 5) together is
    # needed for the clean logits. Check the single-edit identity through the model directly, and that the
    # unchanged positions (0, 1) have exactly no effect.
    corrupted_metric = float(metric(m(corr)))
    np.testing.assert_allclose(r.values[:, :2], corrupted_metric, atol=1e-5)
    full = m(corr, edits=[E.patch("blocks.0.hook_resid_pre", cache["blocks.0.hook_resid_pre"])])
    np.testing.assert_allclose(float(metric(full)), clean_metric, atol=1e-5)


def test_driver_options_agree(setup):
    """Chunking, position buckets and metric positions give the same numbers."""
    _, m, _, corr, cache, metric = setup
    ref = patching.resid_pre(m, corr, cache, metric, progress=False).values
    # (a staircase compiles a program per chunk: small chunk sizes are tested on the per-layer path)
    for kw in (dict(chunk_size=10), dict(buckets=False), dict(metric_positions=None), dict(chunk_size=9, buckets=False),
               dict(stairs=True), dict(stairs=False), dict(stairs=False, chunk_size=3), dict(stairs=False, chunk_size=1)):
        np.testing.assert_allclose(patching.resid_pre(m, corr, cache, metric, progress=False, **kw).values, ref, atol=2e-5)


def reads_every_position(logits):
    return logits[:, :, 3].mean() - logits[:, :, 7].mean()


@pytest.mark.parametrize("bucket_rows", [None, pytest.param(0, marks=pytest.mark.slow)])
def test_packed_staircase(setup, monkeypatch, bucket_rows):
    """The staircase packs each cell's rows from its own first position into shared products (one
    bucket by default; bucket_rows=0: a bucket per first position, so keys before it come from the base
    run): against the naive loop, with a metric reading every position (rows before a cell's first
    position hold the base run's) and with a head sweep resuming from the attention mixes."""
    from jinterp.engine import stairs

    _, m, _, corr, cache, _ = setup
    if bucket_rows is not None:
        monkeypatch.setattr(stairs, "BUCKET_ROWS", bucket_rows)
    st = {}
    r = patching.resid_pre(m, corr, cache, reads_every_position, progress=False, stairs=True, stats=st)
    assert all(ch["packed"] for ch in st["chunks"]) and (len(st["chunks"]) == 1) == (bucket_rows is None)
    check(r, naive(m, corr, cache, reads_every_position, "hook_resid_pre", (m.cfg.n_layers, P), True, False))
    metric = metrics.logit_diff(np.random.RandomState(3).randint(0, hf_zoo.V, (B, 2)))
    r = patching.attn_head_out_by_pos(m, corr, cache, metric, progress=False, stairs=True)
    check(r, naive(m, corr, cache, metric, "attn.hook_z", (m.cfg.n_layers, P, m.cfg.n_heads), True, True))


def test_staircase_plan():
    """Bucket starts: the cheapest cover (rows re-run + a fixed cost per bucket), checked by brute
    force over every set of starts; chunks: every cell once, the same static counts on every device."""
    import itertools

    from jinterp.engine.stairs import bucket_starts, stair_plan

    rs = np.random.RandomState(0)
    for P, batch, per, waste in ((5, 1, 3, 1.0), (8, 2, 10, 1.0), (11, 4, 0, 1.0), (9, 1, 1000, 1.0), (8, 2, 10, 0.25),
                                 (12, 1, 6, 0.1)):
        fp = rs.randint(0, P, 40)
        # a row from the bucket's start: its own rows (from p) in full, the ones before p at `waste`
        row = lambda s, p: (P - p) + waste * (p - s)
        cost = lambda starts: sum(batch * row(max(s for s in starts if s <= p), p) for p in fp) + per * len(starts)
        got = bucket_starts(fp, P, batch, bucket_rows=per, waste=waste)
        assert got[0] == fp.min()
        cands = sorted(set(fp.tolist()) - {fp.min()})
        best = min(cost((fp.min(),) + c) for k in range(len(cands) + 1) for c in itertools.combinations(cands, k))
        assert np.isclose(cost(got), best)
    assert bucket_starts(np.arange(8), 8, 1, bucket_rows=0) == list(range(8))  # free buckets: exact starts
    fl, fp = rs.randint(0, 6, 50), rs.randint(0, 8, 50)
    for n_dev, cap in ((1, 100), (2, 16), (4, 7)):
        chunks = stair_plan(fl, fp, np.arange(50), P=8, n_layers=6, cap=cap, n_devices=n_dev)
        seen = np.concatenate([c.cells for c in chunks])
        assert sorted(seen.tolist()) == list(range(50))
        for c in chunks:
            per = c.order.reshape(n_dev, -1)
            assert per.shape[1] == sum(c.counts)
            for d in range(n_dev):  # each device's cells ordered by start layer, counts as declared
                assert np.repeat(np.arange(c.first, 6), c.counts).tolist() == fl[per[d]].tolist()
            assert all(fp[i] >= c.s0 for i in c.cells)
            # dealt back and forth by first position: at every layer, the devices' rows to re-run so far
            # (pads included) differ by at most one cell's
            rows = np.cumsum(8 - fp[per], axis=1)[:, np.cumsum(c.counts)[np.asarray(c.counts) > 0] - 1]
            assert (rows.max(0) - rows.min(0)).max() <= 8 - c.s0


def test_mesh_over_8_devices_matches_one_device(setup, monkeypatch):
    """A sweep split over the 8 CPU devices gives the single-device numbers, packed staircases included.
    In the suite's own process, late in it: this is where XLA:CPU used to abort (too many memory maps,
    see BUILD_NOTES; the sweep driver and tests/conftest.py now clear JAX's caches before the limit)."""
    from jinterp.engine import flops

    name, m, _, corr, cache, metric = setup
    assert len(jax.devices()) == 8
    mesh = jinterp.distributed.device_mesh()
    ref = patching.attn_head_out_by_pos(m, corr, cache, metric, progress=False).values
    got = patching.attn_head_out_by_pos(m, corr, cache, metric, progress=False, mesh=mesh).values
    np.testing.assert_allclose(got, ref, atol=2e-5)
    # staircases pack on the mesh too: every device its own cells' rows, its products as large as the
    # busiest device's; the count of that work agrees with XLA's (per device) and is less than every
    # cell's rows from the bucket start
    st = {}
    staired = patching.attn_head_out_by_pos(m, corr, cache, metric, progress=False, mesh=mesh, stats=st, stairs=True)
    np.testing.assert_allclose(staired.values, ref, atol=2e-5)
    assert all(ch["packed"] for ch in st["chunks"])
    performed = flops.performed_flops(m.cfg, st)
    sweep_only = performed - flops.forward_flops(m.cfg, *corr.shape)
    assert sweep_only <= 8 * sum(st["xla_flops"]) <= 1.25 * sweep_only
    from_s0 = dict(st, chunks=[dict(ch, packed=None) for ch in st["chunks"]])
    assert performed < 0.9 * flops.performed_flops(m.cfg, from_s0)
    if name != "gpt2":
        return
    r = patching.resid_pre(m, corr, cache, reads_every_position, progress=False, mesh=mesh, stairs=True).values
    np.testing.assert_allclose(r, patching.resid_pre(m, corr, cache, reads_every_position, progress=False).values, atol=2e-5)
    # split_sweeps: every sweep in the block as if given that mesh; an explicit mesh= still wins
    meshes, call = [], traced.call
    monkeypatch.setattr(traced, "call", lambda fn, args, static: meshes.append(static["mesh"]) or call(fn, args, static))
    one = jax.make_mesh((1,), ("sweep",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    with jinterp.distributed.split_sweeps():
        np.testing.assert_array_equal(patching.attn_head_out_by_pos(m, corr, cache, metric, progress=False).values, got)
        assert {mesh.devices.size for mesh in meshes} == {8}
        meshes.clear()
        patching.attn_head_out_by_pos(m, corr, cache, metric, progress=False, mesh=one)
        assert {mesh.devices.size for mesh in meshes} == {1}
    meshes.clear()
    patching.attn_head_out_by_pos(m, corr, cache, metric, progress=False)
    assert jinterp.distributed.sweep_mesh() is None and set(meshes) == {None}


def test_metric_reading_all_positions_and_per_example(setup):
    _, m, _, corr, cache, metric = setup
    mean_logit = lambda lg: lg[..., 7].mean()
    r = patching.mlp_out(m, corr, cache, mean_logit, progress=False)
    check(r, naive(m, corr, cache, mean_logit, "hook_mlp_out", (m.cfg.n_layers, P), True, False))
    per = dataclasses.replace(metric, per_example=True)
    r = patching.attn_head_out_all_pos(m, corr, cache, per, progress=False)
    assert r.shape == (m.cfg.n_layers, m.cfg.n_heads, B)
    np.testing.assert_allclose(r.values.mean(-1), patching.attn_head_out_all_pos(m, corr, cache, metric, progress=False).values, atol=1e-5)


def test_probe_positions():
    lg = np.random.RandomState(0).randn(2, 5, 7).astype(np.float32)
    assert metrics.reads(lambda x: x[:, -1, 3].mean(), lg)[0] == (4,)
    assert metrics.reads(metrics.logit_diff([[1, 2], [3, 4]], pos=(1, 3)), lg)[0] == (1, 3)
    assert metrics.reads(lambda x: x.mean(), lg)[0] is None
    # a gradient that vanishes at this point but a metric that reads every position
    assert metrics.reads(lambda x: jax.numpy.maximum(x, 100.0).sum() + x[:, 0, 0].sum(), lg)[0] is None


def test_bad_inputs(setup):
    _, m, clean, corr, cache, metric = setup
    with pytest.raises(patching.PatchingError, match="different shapes"):
        patching.resid_pre(m, corr[:, :-1], cache, metric, progress=False)
    with pytest.raises(patching.PatchingError, match="different shapes"):
        patching.attn_head_out_all_pos(m, corr[:2], cache, metric, progress=False)
    _, small = m.run_with_cache(clean, names=["blocks.0.hook_resid_pre"])
    with pytest.raises(patching.PatchingError, match="no 'hook_resid_pre' at every layer"):
        patching.resid_pre(m, corr, small, metric, progress=False)
    with pytest.raises(jinterp.sites.SiteError):
        patching._patch(m, corr, cache, metric, "hook_resid_pree", ("layer", "pos"))


def test_back_patching(setup):
    name, m, clean, _, _, _ = setup
    L = m.cfg.n_layers
    t = P - 1
    target = np.random.RandomState(9).randint(0, hf_zoo.V, B)
    metric = metrics.log_prob(target, per_example=True)
    res = patching.back_patching(m, clean, t, metric, targets=target, max_new_tokens=4, progress=False)
    assert res.metric.shape == (L, L, B) and res.generations.shape == (L, L, B, 4)
    base = np.asarray(metric(m(clean)))
    # back-patching i -> i changes nothing
    for i in range(L):
        np.testing.assert_allclose(res.metric.values[i, i], base, atol=2e-5)
    # against single edits
    _, c = m.run_with_cache(clean)
    for i, j in [(2, 0), (1, 2), (2, 1)]:
        e = E.patch(f"blocks.{j}.hook_resid_post", c[f"blocks.{i}.hook_resid_post"], pos=[t])
        np.testing.assert_allclose(res.metric.values[i, j], np.asarray(metric(m(clean, edits=[e]))), atol=2e-5)
        gen = np.asarray(m.generate(clean, 4, edits=[e]))[:, P:]
        np.testing.assert_array_equal(res.generations[i, j], gen)
        np.testing.assert_array_equal(res.success.values[i, j], [target[b] in gen[b] for b in range(B)])
    back = np.tril(np.ones((L, L), bool), -1)
    np.testing.assert_array_equal(res.fixed, (res.success.values.astype(bool) & back[:, :, None]).any((0, 1)))


def naive_path_patching(m, orig, new, metric, receivers):
    """Wang et al. Algorithm 1, one sender at a time, with plain forwards."""
    cfg = m.cfg
    _, oc = m.run_with_cache(orig)
    _, nc = m.run_with_cache(new)
    out = np.zeros((cfg.n_layers, cfg.n_heads))
    for l in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            freeze = E.patch("attn.hook_z", oc.stack("attn.hook_z"), per_layer=True)
            send = E.patch(f"blocks.{l}.attn.hook_z", nc[f"blocks.{l}.attn.hook_z"], heads=[h])
            if receivers == "resid":
                out[l, h] = float(metric(m(orig, edits=[freeze, send])))
                continue
            names = [f"blocks.{rl}.attn.hook_{k}" for rl, rh, k in receivers]
            _, rc = m.run_with_cache(orig, names=names, edits=[freeze, send])
            patched = [E.patch(f"blocks.{rl}.attn.hook_{k}", rc[f"blocks.{rl}.attn.hook_{k}"], heads=[rh]) for rl, rh, k in receivers]
            out[l, h] = float(metric(m(orig, edits=patched)))
    return out


@pytest.mark.parametrize("receivers", ["resid", [(2, 1, "q"), (2, 0, "k"), (1, 1, "v")]])
def test_path_patching_matches_algorithm(setup, receivers):
    _, m, clean, corr, _, metric = setup
    r = patching.path_patching(m, clean, corr, metric, receivers, progress=False)
    assert r.shape == (m.cfg.n_layers, m.cfg.n_heads)
    check(r, naive_path_patching(m, clean, corr, metric, receivers))


def test_resume_from_checkpoint(setup, tmp_path, monkeypatch):
    _, m, _, corr, cache, metric = setup
    ref = patching.resid_pre(m, corr, cache, metric, progress=False, checkpoint_dir=tmp_path / "ck").values
    # simulate an interrupted run: forget the second half of the cells
    like = np.zeros(ref.size, np.float32)
    st = store.SweepStore(tmp_path / "ck", (tmp_path / "ck" / "signature.txt").read_text())
    results, done = st.load(like)
    done[ref.size // 2:] = False
    results[ref.size // 2:] = np.nan
    st.save(results, done)
    calls = []
    real = driver._run_chunk
    monkeypatch.setattr(driver, "_run_chunk", lambda *a, **k: (calls.append(len(a[2]["layer"])), real(*a, **k))[1])
    again = patching.resid_pre(m, corr, cache, metric, progress=False, checkpoint_dir=tmp_path / "ck").values
    np.testing.assert_allclose(again, ref, atol=1e-6)
    assert sum(calls) < ref.size  # only the missing cells were recomputed
    with pytest.raises(ValueError, match="different sweep"):
        patching.mlp_out(m, corr, cache, metric, progress=False, checkpoint_dir=tmp_path / "ck")


def test_labelled_outputs(setup, tmp_path):
    _, m, _, corr, cache, metric = setup
    r = patching.attn_head_out_all_pos(m, corr, cache, metric, progress=False)
    df = r.to_dataframe()
    assert list(df.columns) == ["layer", "layer_index", "head", "head_index", r.name]
    assert len(df) == r.values.size
    assert r.labels[1][0] == "H0"
    png = r.heatmap(tmp_path / "h.png")
    assert png.stat().st_size > 1000
    npz, csv = r.save(tmp_path / "res")
    assert np.load(npz)["values"].shape == r.shape and csv.exists()
    (lab, v), = r.top(1)
    assert v == np.nanmax(r.values)


# ---------------------------------------------------------------- regressions from review


def test_probe_refuses_to_guess():
    """Metrics whose gradient says nothing, or that ignore NaN, must read everything."""
    lg = np.random.RandomState(0).randn(2, 6, 11).astype(np.float32)
    jnp = jax.numpy
    for f in (lambda l: jnp.nanmax(l[:, :, 3]), lambda l: (l[:, 2].argmax(-1) == 5).mean(),
              lambda l: (l[:, -1].argmax(-1) == l[:, 2].argmax(-1)).mean(), lambda l: jnp.max(l[:, :, 3])):
        assert metrics.reads(f, lg) == (None, None)
    assert metrics.reads(metrics.logit_diff([[1, 2], [3, 4]], pos=(1, 3)), lg) == ((1, 3), (1, 2, 3, 4))


def test_metric_reading_only_before_the_window(setup):
    """Cells whose edits lie after every position the metric reads change nothing there."""
    _, m, _, corr, cache, _ = setup
    metric = metrics.logit_diff(np.random.RandomState(3).randint(0, hf_zoo.V, (B, 2)), pos=1)
    r = patching.resid_pre(m, corr, cache, metric, progress=False)
    check(r, naive(m, corr, cache, metric, "hook_resid_pre", (m.cfg.n_layers, P), True, False))


def test_prefix_skipping_only_for_the_models_own_unedited_cache(setup):
    """Same tokens, but the clean cache comes from a steered run: every position must be patched."""
    _, m, clean, _, _, metric = setup
    vec = np.random.RandomState(4).randn(m.cfg.d_model).astype(np.float32)
    _, steered = m.run_with_cache(clean, edits=[E.steer("blocks.0.hook_resid_post", vec, 3.0)])
    r = patching.resid_pre(m, clean, steered, metric, progress=False)
    check(r, naive(m, clean, steered, metric, "hook_resid_pre", (m.cfg.n_layers, P), True, False))


def test_negative_layers_count_from_the_last(setup):
    _, m, clean, corr, cache, _ = setup
    L = m.cfg.n_layers
    a = m(corr, edits=[E.patch("resid_pre", cache.stack("resid_pre"), layers=[-1], per_layer=True)])
    b = m(corr, edits=[E.patch("resid_pre", cache.stack("resid_pre"), layers=[L - 1], per_layer=True)])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(E.EditError, match="out of range"):
        m(corr, edits=[E.patch("resid_pre", cache.stack("resid_pre"), layers=[-L - 1], per_layer=True)])


def test_signature_is_stable_for_code_not_addresses():
    f = lambda l: l[:, -1, 3].mean()
    g = lambda l: l[:, -1, 4].mean()
    assert store.signature(f) == store.signature(f) and store.signature(f) != store.signature(g)
    assert store.signature(np.ones(3)) != store.signature(np.zeros(3))


def test_back_patching_judge_and_ragged_targets(setup):
    _, m, clean, _, _, _ = setup
    res = patching.back_patching(m, clean, -1, targets=[[1, 2], [3], [4, 5, 6]], max_new_tokens=3, progress=False)
    assert res.success.shape == (m.cfg.n_layers, m.cfg.n_layers, B)
    seen = []
    res = patching.back_patching(m, clean, -1, judge=lambda g, b: seen.append(b) or len(g) == 3, max_new_tokens=3, progress=False)
    assert res.success.values.all() and sorted(set(seen)) == list(range(B))
