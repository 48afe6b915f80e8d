"""The tuned lens (Belrose et al. 2023): per-layer affine translators trained to the final distribution.

On the bundled ioi-4l organism, translators fitted on 256 IOI prompts (streamed in minibatches of
32) must read every layer but the last closer to the model's output than the logit lens does, on
held-out prompts; identity translators must give exactly the logit lens; the KL must be the
textbook one; and translators must round-trip through orbax with a record of what they were fitted on.
"""

import numpy as np
import pytest

import jax.numpy as jnp

import jinterp
from jinterp import lens
from jinterp.model import InputError
from jinterp.train import fitted, organisms
from jinterp.train import tuned_lens as T

STEPS, LR = 100, 3e-3


def _ioi(gen, seed, n):
    b = gen.sample(np.random.default_rng(seed), n, pad_to=int(gen.template_lengths.max()))
    mask = np.arange(b.tokens.shape[1])[None] <= b.end[:, None]  # real tokens: BOS .. END
    return b.tokens, mask


@pytest.fixture(scope="module")
def setup():
    model = jinterp.load("ioi-4l")
    gen = organisms.recipe("ioi-4l").generator(model.tokenizer)
    train_toks, train_mask = _ioi(gen, 0, 256)
    held_toks, held_mask = _ioi(gen, 1, 64)
    tr = T.train(model, train_toks, attention_mask=train_mask, steps=STEPS, lr=LR, batch_size=32, progress=False)
    return model, tr, (train_toks, train_mask), (held_toks, held_mask)


def test_tuned_beats_logit_lens_on_held_out(setup):
    model, tr, _, (toks, mask) = setup
    assert len(tr.history) == STEPS and tr.history[-1] < tr.history[0] / 3
    res = lens.tuned_lens(model, toks, tr, positions=None, attention_mask=mask)
    assert res.labels == ["0_pre", "1_pre", "2_pre", "3_pre", "final_post"]
    assert res.logits.shape == (5, 64, toks.shape[1], model.cfg.d_vocab)
    tuned, logit = res.kl.values, res.logit_kl.values
    # every layer but the last: the tuned lens is closer to the output (measured: about 10x closer)
    assert (tuned[:-1] < 0.5 * logit[:-1]).all(), (tuned, logit)
    assert tuned[-1] == 0 and logit[-1] == 0  # the final residual is the output itself
    # lens_kl computes the same numbers, for the logit lens (no translators) and the tuned lens
    np.testing.assert_allclose(lens.lens_kl(model, toks, None, positions=None, attention_mask=mask).values, logit, rtol=1e-6)
    np.testing.assert_allclose(lens.lens_kl(model, toks, tr, positions=None, attention_mask=mask).values, tuned, rtol=1e-6)
    assert "final_post" in repr(res)


def test_identity_translators_are_the_logit_lens(setup):
    model, _, _, (toks, mask) = setup
    ident = T.Translators.identity(model)
    res = lens.tuned_lens(model, toks, ident, positions=[4, -1], attention_mask=mask)
    ref, labels = lens.layer_logits(model, toks, positions=[4, -1], attention_mask=mask)
    assert res.labels == list(labels)
    np.testing.assert_array_equal(np.asarray(res.logits), np.asarray(ref))
    np.testing.assert_array_equal(res.kl.values, res.logit_kl.values)


def test_kl_is_the_textbook_kl(setup):
    model, tr, _, (toks, mask) = setup
    res = lens.tuned_lens(model, toks, tr, positions=None, attention_mask=mask)
    lg = np.asarray(res.logits, np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    p = np.exp(logp[-1])
    kl = (p * (logp[-1] - logp)).sum(-1)  # [n, batch, pos]
    want = (kl * mask).sum((1, 2)) / mask.sum()
    np.testing.assert_allclose(res.kl.values, want, rtol=1e-4, atol=1e-6)
    # selected positions: the last column is padding for most rows here, and weighted out
    sel = lens.tuned_lens(model, toks, tr, positions=[4, -1], attention_mask=mask)
    w = mask[:, [4, -1]]
    assert 0 < w[:, 1].sum() < len(w)
    np.testing.assert_allclose(sel.kl.values, (kl[:, :, [4, -1]] * w).sum((1, 2)) / w.sum(), rtol=1e-4, atol=1e-6)


def test_save_load_round_trip(setup, tmp_path):
    model, tr, (train_toks, train_mask), (toks, mask) = setup
    path = tr.save(tmp_path / "tl")
    back = T.Translators.load(path)
    np.testing.assert_array_equal(np.asarray(back.A), np.asarray(tr.A))
    np.testing.assert_array_equal(np.asarray(back.b), np.asarray(tr.b))
    np.testing.assert_allclose(back.history, tr.history, rtol=1e-6)
    m = back.meta
    assert m["model"] == "ioi-4l" and m["n_layers"] == 4 and m["d_model"] == 64
    assert m["site"] == T.SITE and m["steps"] == STEPS and m["batch_size"] == 32 and m["n_examples"] == 256
    assert m["tokens"] == {"shape": [256, train_toks.shape[1]], "sha256": fitted.fingerprint(train_toks.astype(np.int32))}
    a = lens.tuned_lens(model, toks, tr, positions=None, attention_mask=mask)
    b = lens.tuned_lens(model, toks, back, positions=None, attention_mask=mask)
    np.testing.assert_array_equal(a.kl.values, b.kl.values)
    with pytest.raises(fitted.FittedError, match="not empty"):
        tr.save(tmp_path / "tl")
    with pytest.raises(fitted.FittedError, match="tuned_lens"):
        fitted.load(path, "das")


def test_translators_of_another_model_are_refused(setup):
    model, _, (train_toks, train_mask), (toks, _) = setup
    # what Translators.load gives for translators fitted on induction-2l (2 layers, d_model 64)
    other = T.Translators(jnp.zeros((2, 64, 64)), jnp.zeros((2, 64)), [], {"model": "induction-2l", "n_layers": 2, "d_model": 64})
    with pytest.raises(InputError, match=r"induction-2l with n_layers=2, d_model=64.*ioi-4l has n_layers=4, d_model=64"):
        lens.tuned_lens(model, toks[:4], other)
    with pytest.raises(InputError, match="n_layers=2"):
        lens.lens_kl(model, toks[:4], other)
    with pytest.raises(InputError, match="n_layers=2"):
        T.train(model, train_toks[:32], init=other, steps=1, progress=False)
    with pytest.raises(InputError, match="needs translators"):
        lens.tuned_lens(model, toks[:4], None)


def test_nan_loss_names_the_step(setup):
    model, _, (train_toks, train_mask), _ = setup
    bad = T.Translators.identity(model)
    bad.A = bad.A.at[1, 0, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match=f"at step 1 of {STEPS}"):
        T.train(model, train_toks, attention_mask=train_mask, steps=STEPS, lr=LR, init=bad, progress=True)
