"""Model API behaviour: selective caching, sampling, loading variants, orbax round trip."""

import jax
import numpy as np
import pytest
import torch

import jinterp
from jinterp import sites
from tests import hf_zoo


@pytest.fixture(scope="module")
def hf_and_model(tmp_path_factory):
    hf = hf_zoo.build("llama-gqa-untied-bias")
    return hf, jinterp.load(hf_zoo.save(hf, tmp_path_factory.mktemp("llama")))


TOKS = np.random.RandomState(0).randint(0, hf_zoo.V, (2, 7)).astype(np.int32)


def test_cache_has_every_site_with_tl_shapes(hf_and_model):
    _, m = hf_and_model
    c = m.cfg
    _, cache = m.run_with_cache(TOKS)
    assert list(cache) == sites.all_names(c)
    B, P = TOKS.shape
    assert cache["blocks.1.hook_resid_pre"].shape == (B, P, c.d_model)
    assert cache["blocks.1.attn.hook_z"].shape == (B, P, c.n_heads, c.d_head)
    assert cache["blocks.1.attn.hook_k"].shape == (B, P, c.n_kv_heads, c.d_head)
    assert cache["blocks.1.attn.hook_pattern"].shape == (B, c.n_heads, P, P)
    assert cache["blocks.1.mlp.hook_post"].shape == (B, P, c.d_mlp)
    assert cache["blocks.1.ln1.hook_scale"].shape == (B, P, 1)
    assert cache["pattern", 1].shape == cache["blocks.1.attn.hook_pattern"].shape  # TL shorthand
    assert cache.stack("resid_post").shape == (c.n_layers, B, P, c.d_model)


def test_selected_names_only_and_equal_to_full(hf_and_model):
    _, m = hf_and_model
    _, full = m.run_with_cache(TOKS)
    names = ["blocks.2.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.2.attn.hook_z", "ln_final.hook_scale"]
    _, part = m.run_with_cache(TOKS, names=names)
    assert sorted(part) == sorted(names)
    for n in names:  # different programs fuse differently: equal up to float rounding
        np.testing.assert_allclose(np.asarray(part[n]), np.asarray(full[n]), atol=2e-5, rtol=1e-5)
    # only the requested layers are stored
    assert part._acts["attn.hook_z"].shape[0] == 2
    with pytest.raises(KeyError, match="not cached"):
        part["blocks.1.attn.hook_z"]
    _, pred = m.run_with_cache(TOKS, names=lambda n: n.endswith("hook_pattern"))
    assert list(pred) == [f"blocks.{l}.attn.hook_pattern" for l in range(m.cfg.n_layers)]


def test_hook_scale_semantics(hf_and_model):
    """ln hook_scale is the divisor: normalized == resid / scale (RMSNorm; before w, as in TransformerLens),
    and attention reads that times w (attn.hook_in)."""
    _, m = hf_and_model
    _, c = m.run_with_cache(TOKS)
    x = np.asarray(c["blocks.1.hook_resid_pre"])
    s = np.asarray(c["blocks.1.ln1.hook_scale"])
    ref = np.sqrt((x**2).mean(-1, keepdims=True) + m.cfg.norm_eps)
    np.testing.assert_allclose(s, ref, rtol=1e-6)
    w = np.asarray(m.params["blocks"]["ln1"]["w"][1])
    np.testing.assert_allclose(np.asarray(c["blocks.1.ln1.hook_normalized"]), x / s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(c["blocks.1.attn.hook_in"]), x / s * w, rtol=1e-5, atol=1e-6)


def test_logits_at(hf_and_model):
    _, m = hf_and_model
    full = np.asarray(m(TOKS))
    np.testing.assert_allclose(np.asarray(m(TOKS, logits_at=-1))[:, 0], full[:, -1], atol=1e-6)


def test_sampling_reproducible_and_top_k_1_is_greedy(hf_and_model):
    _, m = hf_and_model
    a = np.asarray(m.generate(TOKS, 6, do_sample=True, seed=3))
    b = np.asarray(m.generate(TOKS, 6, do_sample=True, seed=3))
    c = np.asarray(m.generate(TOKS, 6, do_sample=True, seed=4, temperature=5.0))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(
        np.asarray(m.generate(TOKS, 6, do_sample=True, top_k=1, seed=9)), np.asarray(m.generate(TOKS, 6))
    )
    np.testing.assert_array_equal(
        np.asarray(m.generate(TOKS, 6, do_sample=True, top_p=1e-6, seed=9)), np.asarray(m.generate(TOKS, 6))
    )


def test_sampling_distribution_matches_softmax(hf_and_model):
    """Sampled first tokens follow softmax(logits / T): compare frequencies over many seeds."""
    _, m = hf_and_model
    toks = TOKS[:1]
    T = 2.0
    p = torch.softmax(torch.tensor(np.asarray(m(toks))[0, -1]) / T, -1).numpy()
    draws = [int(np.asarray(m.generate(toks, 1, do_sample=True, seed=s, temperature=T))[0, -1]) for s in range(300)]
    freq = np.bincount(draws, minlength=len(p)) / len(draws)
    assert np.abs(freq - p).sum() < 0.45  # total variation ~ sampling noise at n=300


def test_sharded_checkpoint_loads(hf_and_model, tmp_path):
    hf, m = hf_and_model
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m2 = jinterp.load(tmp_path)
    for a, b in zip(jax.tree.leaves(m2.params), jax.tree.leaves(m.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_round_trip(hf_and_model, tmp_path):
    _, m = hf_and_model
    m.save(tmp_path / "saved")
    m2 = jinterp.load(tmp_path / "saved")
    assert m2.cfg == m.cfg
    for a, b in zip(jax.tree.leaves(m2.params), jax.tree.leaves(m.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(m2(TOKS)), np.asarray(m(TOKS)))
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "saved")


def test_weight_views(hf_and_model):
    _, m = hf_and_model
    c = m.cfg
    assert m.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert m.W_K.shape == (c.n_layers, c.n_kv_heads, c.d_model, c.d_head)
    assert m.W_O.shape == (c.n_layers, c.n_heads, c.d_head, c.d_model)
    assert m.W_U.shape == (c.d_model, c.d_vocab)
    with pytest.raises(AttributeError, match="no W_pos"):
        m.W_pos
