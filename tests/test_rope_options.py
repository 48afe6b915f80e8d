"""Rotary scalings (dynamic, yarn, proportional) and the remaining options of existing families (issue 14 item 3).

The zoo variants (tests/hf_zoo.py) get the parity check of logits, every residual site and the patterns in
tests/test_parity.py; here: the frequencies against transformers' own functions, the per-call behaviour of
dynamic scaling (padded rows, generation with a KV cache), sliding windows in generation, GPT-2's upcast in
bf16, that each option moves HF's own output far beyond the parity tolerance (so the parity test would
catch an option ignored), and the clear errors for what is not implemented. References come from HF torch.
"""

import numpy as np
import pytest
import torch

import jinterp
from jinterp.arch.families import family_for
from jinterp.config import Config, rope_attention_factor, rope_inv_freq
from tests import hf_zoo

ATOL = 2e-5
tf = hf_zoo.tf


def _cfg_pair(cls, **kw):
    """(HF config, jinterp Config) for a config class and its keyword arguments."""
    hf = cls(**kw)
    return hf, family_for(hf.model_type).config(hf)


HEAD16 = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=8, **hf_zoo.SMALL)
YARN = dict(rope_type="yarn", rope_theta=1000.0, original_max_position_embeddings=16)


@pytest.mark.parametrize("rope", [
    dict(YARN, factor=4.0),  # defaults: beta 32 / 1, truncate, attention_factor from factor
    dict(YARN, factor=None),  # factor = max_position_embeddings / original (64 / 16)
    dict(YARN, factor=4.0, mscale=0.707, mscale_all_dim=0.707),  # DeepSeek style: attention_factor 1
    dict(YARN, factor=4.0, mscale=2.0),  # mscale without mscale_all_dim is ignored (transformers)
    dict(YARN, factor=8.0, attention_factor=0.9, beta_fast=0, beta_slow=2.0, truncate=False),  # beta 0 -> 32
    dict(YARN, factor=1.0),
    dict(rope_type="dynamic", rope_theta=500.0, factor=3.0),  # the init (short) set
    dict(rope_type="proportional", rope_theta=100.0, factor=2.0, partial_rotary_factor=0.25),
    dict(rope_type="proportional", rope_theta=100.0),
    dict(rope_type="linear", rope_theta=100.0, factor=2.5),
    dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=16),
], ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items() if k != "rope_theta"))
def test_frequencies_match_transformers(rope):
    """inv_freq and the cos/sin multiplier as transformers' rotary module computes them at load."""
    hf, cfg = _cfg_pair(tf.LlamaConfig, head_dim=16, rope_parameters=dict(rope), **HEAD16)
    ref = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
    np.testing.assert_allclose(rope_inv_freq(cfg), ref.inv_freq.numpy(), rtol=2e-7, atol=0)
    assert rope_attention_factor(cfg) == pytest.approx(ref.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("pct, dims", [(0.3125, 6), (0.375, 6), (0.5625, 10), (0.25, 4), (1.0, 16)])
def test_neox_rotary_dims_as_transformers(pct, dims):
    """int(16 * pct) = 5 (odd): transformers rotates 6 dims with exponents over 5; 6 and 9 likewise."""
    kw = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=1, intermediate_size=8, rotary_pct=pct, **hf_zoo.SMALL)
    hf, cfg = _cfg_pair(tf.GPTNeoXConfig, **kw)
    ref = tf.models.gpt_neox.modeling_gpt_neox.GPTNeoXRotaryEmbedding(hf)
    assert cfg.rotary_dim == 2 * len(ref.inv_freq) == dims
    np.testing.assert_allclose(rope_inv_freq(cfg), ref.inv_freq.numpy(), rtol=2e-7, atol=0)


# variant -> HF config changes that switch its option off (same weights: the seed and parameter shapes match)
OPTION_OFF = {
    "llama-rope-dynamic": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    "llama-rope-yarn": dict(rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    "qwen3-rope-yarn": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    "llama-rope-proportional": dict(rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    "neox-rotary5-sequential": dict(rotary_pct=0.25),  # rounding 5 rotary dims down to 4 ...
    "neox-rotary5-sequential-6": dict(rotary_pct=0.375),  # ... or rotating 6 with exponents over 6
    "neox-rotary6-parallel": dict(use_parallel_residual=False),
    "gpt2-inverse-layer-upcast": dict(scale_attn_by_inverse_layer_idx=False),
    "gemma2-softcap-alternating": dict(attn_logit_softcapping=None),
    "gemma2-softcap-alternating-final": dict(final_logit_softcapping=None),
    "mistral-sliding": dict(sliding_window=None),
}


@pytest.mark.parametrize("name", list(OPTION_OFF))
def test_each_option_moves_hf_far_beyond_the_tolerance(name):
    """HF with the option minus HF without it, on the parity test's inputs: > 100x its tolerance, so the
    parity test (jinterp within 2e-5 of HF with the option) fails if jinterp ignored the option."""
    variant = name if name in hf_zoo.VARIANTS else name.rsplit("-", 1)[0]
    cls, kw = hf_zoo.VARIANTS[variant]
    on, off = hf_zoo.build(variant), hf_zoo.build_config(cls, {**kw, **OPTION_OFF[name]})
    for a, b in zip(on.state_dict().values(), off.state_dict().values()):
        assert torch.equal(a, b)
    toks = np.random.RandomState(0).randint(0, hf_zoo.V, (3, 12))  # the parity test's tokens (SEQ 12)
    diff = np.abs(hf_zoo.capture(on, toks)["logits"] - hf_zoo.capture(off, toks)["logits"]).max()
    assert diff > 100 * ATOL, f"{name}: the option changes HF's logits by only {diff:.3g}"


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    hf = hf_zoo.build("llama-rope-dynamic")
    return hf, jinterp.load(hf_zoo.save(hf, tmp_path_factory.mktemp("dyn")))


def test_dynamic_padded_rows_match_hf_alone(dynamic):
    """Each row's base follows its own length (12 and 9 past max_position_embeddings 8, 8 at it, 5 within):
    the left-padded batch gives every row HF's logits for that row alone."""
    hf, model = dynamic
    rs = np.random.RandomState(1)
    seqs = [rs.randint(0, hf_zoo.V, n) for n in (12, 9, 8, 5)]
    toks = np.zeros((4, 12), np.int32)
    mask = np.zeros((4, 12), bool)
    for i, s in enumerate(seqs):
        toks[i, 12 - len(s):], mask[i, 12 - len(s):] = s, True
    logits = np.asarray(model(toks, attention_mask=mask))
    for i, s in enumerate(seqs):
        ref = hf_zoo.capture(hf, s[None])["logits"][0]
        err = np.abs(logits[i][mask[i]] - ref).max()
        assert err <= ATOL * max(1.0, np.abs(ref).max()), f"row of {len(s)}: {err:.3g}"


def test_dynamic_generation_matches_hf_with_its_kv_cache(dynamic):
    """A 5-token prompt generating 10 tokens crosses max_position_embeddings (8) mid-way: every step rotates its
    query and key with the base of its own length while cached keys keep theirs, as in HF's generate (which
    differs from recomputing without the cache); greedy tokens equal HF's."""
    hf, model = dynamic
    toks = np.random.RandomState(2).randint(0, hf_zoo.V, (2, 5)).astype(np.int32)
    ours = np.asarray(model.generate(toks, max_new_tokens=10))
    kw = dict(attention_mask=torch.ones(toks.shape, dtype=torch.long), max_new_tokens=10, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = hf.generate(torch.as_tensor(toks).long(), **kw)
        fresh = hf.generate(torch.as_tensor(toks).long(), use_cache=False, **kw)
    np.testing.assert_array_equal(ours, cached.sequences.numpy())
    # the quirk is real: without a cache the scores differ once the base grows
    gap = max(float((a - b).abs().max()) for a, b in zip(cached.scores, fresh.scores))
    assert gap > 100 * ATOL
    with pytest.raises(jinterp.InputError, match="context of 16"):  # n_ctx 8 x factor 2
        model.generate(toks, max_new_tokens=12)


def test_sliding_window_generation_matches_hf():
    """Mistral, window 4 on every layer, a 7-token prompt (longer than the window) and 10 new tokens: the
    KV-cached decoding sees only the last 4 keys, as HF's greedy generate does."""
    hf = hf_zoo.build("mistral-sliding")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model = jinterp.load(hf_zoo.save(hf, d))
    toks = np.random.RandomState(4).randint(0, hf_zoo.V, (2, 7)).astype(np.int32)
    ours = np.asarray(model.generate(toks, max_new_tokens=10))
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(toks).long(), attention_mask=torch.ones(toks.shape, dtype=torch.long),
                             max_new_tokens=10, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_gpt2_upcast_computes_scores_in_float32_under_bf16(tmp_path):
    """reorder_and_upcast_attn in bf16: attention scores are float32, the product of q and k times scale /
    (layer + 1) (scale_attn_by_inverse_layer_idx), as HF's eager _upcast_and_reordered_attn. (XLA may carry q and
    k at more than bf16 precision into the product, so the recorded bf16 q and k agree to bf16 rounding only.)"""
    hf = hf_zoo.build("gpt2-inverse-layer-upcast")
    model = jinterp.load(hf_zoo.save(hf, tmp_path / "m"), dtype="bfloat16")
    assert model.cfg.attn_upcast and model.cfg.attn_scale_inverse_layer
    toks = np.random.RandomState(5).randint(0, hf_zoo.V, (2, 6))
    _, cache = model.run_with_cache(toks, names=lambda n: n.endswith(("hook_q", "hook_k", "hook_attn_scores")))
    for layer in range(3):
        scores = np.asarray(cache[f"blocks.{layer}.attn.hook_attn_scores"])
        assert scores.dtype == np.float32
        q = np.asarray(cache[f"blocks.{layer}.attn.hook_q"], np.float32)
        k = np.asarray(cache[f"blocks.{layer}.attn.hook_k"], np.float32)
        want = np.einsum("bqhd,bkhd->bhqk", q, k) * (8**-0.5 / (layer + 1))
        causal = np.tril(np.ones((6, 6), bool))
        np.testing.assert_allclose(scores[..., causal], want[..., causal], rtol=3e-2, atol=3e-2)


# unsupported rotary types and a rotary_pct giving no rotary dims: tests/test_parity.py and tests/test_errors.py
# (test_unsupported_options_are_named, test_config_options_we_do_not_implement_are_named)


@pytest.mark.parametrize("over, message", [
    (dict(rotary_dim=6, rotary_base_dim=3), "rotary_base_dim 3 gives 2 frequencies, so rotary_dim must be 4, got 6"),
    (dict(rope_scaling={"rope_type": "proportional", "factor": 1.0, "partial_rotary_factor": 0.5}),
     r"proportional rotary rotates the whole head: rotary_dim must be d_head \(8\), got 4"),
    (dict(rotary_dim=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}),
     "dynamic rotary scaling needs rotary_dim > 2"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn' needs rope_scaling keys .*missing beta_fast"),
    (dict(local_rope_theta=10.0, local_rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}),
     "local_rope_scaling cannot be longrope or dynamic"),
])
def test_bad_rotary_configs_are_named(over, message):
    base = dict(family="llama", n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_head=8, d_mlp=8, d_vocab=10,
                n_ctx=16, positional="rotary", rotary_dim=4)
    with pytest.raises(ValueError, match=message):
        Config(**{**base, **over})
