"""Learned masks (jinterp.train.masks): the masked forward against plain edits, training on the
bundled induction-2l model (its induction heads are kept, the circuit keeps the metric), the
save/load round trip, and errors at the boundary."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinterp
from jinterp import detect
from jinterp import edits as E
from jinterp.train import fitted, masks

S = 10  # repeated segment length


@pytest.fixture(scope="module")
def model():
    return jinterp.load("induction-2l")


@pytest.fixture(scope="module")
def toks(model):
    r = np.random.default_rng(0).integers(2, model.config.d_vocab, size=(16, S))
    return np.concatenate([np.zeros((16, 1), int), r, r], 1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class InductionLoss:
    """Mean next-token loss on the repeated half (hashable, so fits share one compiled step)."""

    tokens: tuple

    def __call__(self, logits):
        t = jnp.asarray(self.tokens)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return (-jnp.take_along_axis(lp[:, S + 1:-1], t[:, S + 2:, None], -1)[..., 0]).mean()


@pytest.fixture(scope="module")
def ind(toks):
    return InductionLoss(tuple(map(tuple, toks.tolist())))


def _means(model, toks, site):
    _, cache = model.run_with_cache(toks, names=lambda n: n.endswith(site))
    return np.asarray(cache.stack(site)).mean(1)  # [L, P, ...]: the per-position mean over the batch


def test_masked_forward_against_plain_edits(model, toks):
    clean = np.asarray(model(toks))
    mean = _means(model, toks, "attn.hook_z")
    a = masks._ablation_value(model, "attn.hook_z", jnp.asarray(toks), None, "mean")
    L, H = model.config.n_layers, model.config.n_heads
    # m = 1 everywhere: the clean forward
    out = model(toks, edits=masks.mask_edits("attn.hook_z", jnp.ones((L, H)), a))
    np.testing.assert_allclose(np.asarray(out), clean, atol=1e-5)
    # m = 0 everywhere: every head set to its per-position mean by ordinary patches
    out = model(toks, edits=masks.mask_edits("attn.hook_z", jnp.zeros((L, H)), a))
    ref = model(toks, edits=[E.patch("attn.hook_z", mean, per_layer=True)])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)
    # a soft gate on one layer-1 head: z' = m z + (1 - m) a, written by hand from the clean cache
    m = np.ones((L, H), np.float32)
    m[1, 0] = 0.3
    _, cache = model.run_with_cache(toks, names=lambda n: n.endswith("attn.hook_z"))
    z1 = np.asarray(cache.stack("attn.hook_z"))[1][:, :, 0]  # [B, P, dh]; layer 0 is unchanged
    out = model(toks, edits=masks.mask_edits("attn.hook_z", jnp.asarray(m), a))
    ref = model(toks, edits=[E.patch("attn.hook_z", (0.3 * z1 + 0.7 * mean[1][None, :, 0])[:, :, None], layers=[1], heads=[0])])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)
    # neurons: m = 0 is every neuron set to its per-position mean
    am = masks._ablation_value(model, "mlp.hook_post", jnp.asarray(toks), None, "mean")
    out = model(toks, edits=masks.mask_edits("mlp.hook_post", jnp.zeros((L, model.config.d_mlp)), am))
    ref = model(toks, edits=[E.patch("mlp.hook_post", _means(model, toks, "mlp.hook_post"), per_layer=True)])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)


def test_head_mask_keeps_the_induction_heads(model, toks, ind):
    clean = float(ind(model(toks)))
    mk = masks.fit(model, toks, ind, kind="sigmoid", sparsity=0.03, steps=80, progress=False)
    kept = mk.kept()
    assert kept.shape == (2, 2) and kept.dtype == bool
    assert (~kept).sum() >= 1  # at least one head ablated
    scores = np.asarray(detect.head_scores(model, toks)["induction"].values)
    assert scores[1].min() > 0.5  # the detector finds both layer-1 heads
    assert kept[scores > 0.5].all()  # the mask keeps every head the detector calls an induction head
    # the hard circuit, by ordinary edits: the heads not kept set to their per-position means
    mean = _means(model, toks, "attn.hook_z")
    drop = [E.patch("attn.hook_z", mean[l], layers=[l], heads=[int(h) for h in np.nonzero(~kept[l])[0]])
            for l in range(2) if (~kept[l]).any()]
    circ = float(ind(model(toks, edits=drop)))
    assert circ == pytest.approx(mk.info["metric_kept"], rel=1e-4)
    assert abs(circ - clean) / clean < 0.1  # measured: 0.694 vs 0.724 (L0H1 ablated)
    h = mk.history
    assert len(h["loss"]) == 80 and h["kept"][-1] == mk.n_kept and h["kept"][0] == 4


def test_neuron_mask_hard_concrete_and_round_trip(model, toks, ind, tmp_path):
    clean = float(ind(model(toks)))
    mk = masks.fit(model, toks, ind, site="mlp.hook_post", sparsity=1e-3, steps=100, progress=False)
    kept = mk.kept()
    F = model.config.d_mlp
    assert kept.shape == (2, F)
    assert (~kept).sum() >= 0.25 * kept.size  # measured: 198 of 512 neurons ablated
    # ordinary edits: SetWhere with the per-position means where a neuron is not kept
    mean = _means(model, toks, "mlp.hook_post")
    e = E.edit("mlp.hook_post", E.SetWhere(E.Value(jnp.asarray(mean), ("layer", "pos", "d_mlp")),
                                           E.Value(jnp.asarray(~kept, jnp.float32), ("layer", "d_mlp"))))
    circ = float(ind(model(toks, edits=[e])))
    assert circ == pytest.approx(mk.info["metric_kept"], rel=1e-4)
    assert float(ind(model(toks, edits=mk.edits(model, toks)))) == pytest.approx(circ, rel=1e-5)  # Mask.edits: the same
    assert abs(circ - clean) / clean < 0.15  # measured: 0.795 vs 0.724
    # save / load with provenance
    path = mk.save(tmp_path / "m")
    back = masks.Mask.load(path)
    np.testing.assert_array_equal(back.logits, mk.logits)
    np.testing.assert_array_equal(back.kept(), kept)
    assert back.site == "mlp.hook_post" and back.kind == "hard_concrete" and back.sparsity == 1e-3
    np.testing.assert_allclose(back.history["metric"], mk.history["metric"], rtol=1e-6)
    prov = back.provenance
    assert prov["model"] == model.name and prov["site"] == "mlp.hook_post"
    assert prov["tokens"]["sha256"] == fitted.fingerprint(np.asarray(toks, np.int32))
    with pytest.raises(fitted.FittedError, match="not empty"):
        mk.save(path)
    fitted.save(tmp_path / "other", "das", {"basis": np.eye(2)}, {})
    with pytest.raises(fitted.FittedError, match="not a 'mask'"):
        masks.load(tmp_path / "other")


def test_errors(model, toks, ind):
    with pytest.raises(masks.MaskError, match="attn.hook_z.*mlp.hook_post"):
        masks.fit(model, toks, ind, site="hook_resid_pre", progress=False)
    with pytest.raises(masks.MaskError, match="unknown site"):
        masks.fit(model, toks, ind, site="attn.hook_zz", progress=False)
    with pytest.raises(masks.MaskError, match="sparsity.*>= 0"):
        masks.fit(model, toks, ind, sparsity=-0.1, progress=False)
    with pytest.raises(masks.MaskError, match="answers must be \\[batch, 2\\].*batch 16"):
        masks.fit(model, toks, answers=np.zeros((3, 2), int), progress=False)
    with pytest.raises(masks.MaskError, match="kind"):
        masks.fit(model, toks, ind, kind="l1", progress=False)
    with pytest.raises(masks.MaskError, match="ablation values .* got shape \\(2, 3\\)"):
        masks.fit(model, toks, ind, ablation=np.zeros((2, 3)), progress=False)
    with pytest.raises(masks.MaskError, match="target"):
        masks.fit(model, toks, lambda logits: jnp.nan * logits.mean(), progress=False)
    # NaN ablation values (the same compiled step as the sigmoid fit above): stopped at step 0
    bad = np.full((2, toks.shape[1], 2, model.config.d_head), np.nan, np.float32)
    with pytest.raises(masks.MaskError, match="NaN at step 0"):
        masks.fit(model, toks, ind, kind="sigmoid", sparsity=0.03, ablation=bad, steps=3, progress=False)
