"""Parity with the HF torch implementation on tiny random configs of every family, fp32.

Reference values come from HF (eager attention) via forward hooks, never from jinterp itself.
"""

import jax
import numpy as np
import pytest
import torch

import jinterp
from tests import hf_zoo

ATOL = 2e-5
SEQ = 12  # longer than the sliding windows in the zoo (4 and 5)


@pytest.fixture(scope="module", params=list(hf_zoo.VARIANTS))
def pair(request, tmp_path_factory):
    hf = hf_zoo.build(request.param)
    path = hf_zoo.save(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, jinterp.load(path)


def _tokens(n_batch=3, n=SEQ, seed=0):
    return np.random.RandomState(seed).randint(0, hf_zoo.V, (n_batch, n)).astype(np.int32)


def _close(ours, ref, what, atol=ATOL):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs HF {ref.shape}"
    err = np.abs(ours - ref).max()
    scale = max(1.0, np.abs(ref).max())
    assert err <= atol * scale, f"{what}: max |diff| {err:.3g} (HF magnitude {scale:.3g})"


def test_logits_and_every_residual_site(pair):
    name, hf, model = pair
    toks = _tokens()
    ref = hf_zoo.capture(hf, toks)
    logits, cache = model.run_with_cache(toks)
    _close(logits, ref["logits"], f"{name} logits")
    for l in range(model.cfg.n_layers):
        _close(cache[f"blocks.{l}.hook_resid_pre"], ref["resid_pre"][l], f"{name} resid_pre {l}")
        _close(cache[f"blocks.{l}.hook_attn_out"], ref["attn_out"][l], f"{name} attn_out {l}")
        _close(cache[f"blocks.{l}.hook_mlp_out"], ref["mlp_out"][l], f"{name} mlp_out {l}")
        _close(cache[f"blocks.{l}.hook_resid_post"], ref["resid_post"][l], f"{name} resid_post {l}")
        if not model.cfg.parallel_residual:
            mid = ref["resid_pre"][l] + ref["attn_out"][l]
            _close(cache[f"blocks.{l}.hook_resid_mid"], mid, f"{name} resid_mid {l}")
        _close(cache[f"blocks.{l}.attn.hook_pattern"], ref["pattern"][l], f"{name} pattern {l}")


def test_padding_left_and_right_match_unpadded(pair):
    """Every real token of a padded batch gets the logits of its unpadded sequence (HF, unpadded)."""
    name, hf, model = pair
    rs = np.random.RandomState(1)
    lengths = [SEQ, SEQ - 3, SEQ - 5]
    seqs = [rs.randint(0, hf_zoo.V, n) for n in lengths]
    refs = [hf_zoo.capture(hf, s[None])["logits"][0] for s in seqs]
    for side in ("left", "right"):
        toks = np.zeros((len(seqs), SEQ), np.int32)
        mask = np.zeros((len(seqs), SEQ), bool)
        for i, s in enumerate(seqs):
            sl = slice(SEQ - len(s), SEQ) if side == "left" else slice(0, len(s))
            toks[i, sl], mask[i, sl] = s, True
        logits = np.asarray(model(toks, attention_mask=mask))
        for i, s in enumerate(seqs):
            _close(logits[i][mask[i]], refs[i], f"{name} {side}-padded row {i}")


def test_greedy_generation_matches_hf(pair):
    name, hf, model = pair
    toks = _tokens(2, 6, seed=2)
    ours = np.asarray(model.generate(toks, max_new_tokens=8))
    with torch.no_grad():
        theirs = hf.generate(
            torch.as_tensor(toks).long(), attention_mask=torch.ones(toks.shape, dtype=torch.long),
            max_new_tokens=8, do_sample=False,
        ).numpy()
    np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} greedy generation")


def test_left_padded_generation_matches_unpadded(pair):
    name, hf, model = pair
    rs = np.random.RandomState(3)
    seqs = [rs.randint(0, hf_zoo.V, n) for n in (7, 4)]
    toks = np.zeros((2, 7), np.int32)
    mask = np.zeros((2, 7), bool)
    for i, s in enumerate(seqs):
        toks[i, 7 - len(s):], mask[i, 7 - len(s):] = s, True
    batched = np.asarray(model.generate(toks, max_new_tokens=6, attention_mask=mask))
    for i, s in enumerate(seqs):
        single = np.asarray(model.generate(s[None], max_new_tokens=6))[0]
        np.testing.assert_array_equal(batched[i, 7:], single[len(s):], err_msg=f"{name} row {i}")


def test_bf16_close_to_fp32(pair, tmp_path):
    """bf16 parameters (norms and softmax in fp32): logits within 0.1 of fp32, top-1 mostly agrees."""
    name, hf, model = pair
    path = hf_zoo.save(hf, tmp_path / "m")
    m16 = jinterp.load(path, dtype="bfloat16")
    assert str(m16.dtype) == "bfloat16"
    toks = _tokens()
    a = np.asarray(model(toks), np.float32)
    b = np.asarray(m16(toks), np.float32)
    err = np.abs(a - b).max()
    assert err < 0.1 * max(1.0, np.abs(a).max()), f"{name} bf16 max |diff| {err}"
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_param_shapes_and_sites_from_the_config_alone(pair):
    """arch.param_shapes(cfg) describes exactly what the loader built from the HF checkpoint, and
    every site the decoder reports exists in a full cache with its layout's rank."""
    from jinterp import arch, sites

    name, _, m = pair
    want = jax.tree.map(lambda a: (a.shape, a.dtype), m.params)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), arch.param_shapes(m.cfg, m.dtype))
    assert jax.tree.structure(got) == jax.tree.structure(want), name
    assert jax.tree.leaves(got) == jax.tree.leaves(want), name
    _, cache = m.run_with_cache(_tokens(1, 5))
    assert set(cache) == set(sites.all_names(m.cfg))
    for n in cache:
        assert np.ndim(cache[n]) == len(sites.layout(sites.parse(m.cfg, n)[1])), n
    # sites a family lacks are absent: rotary sites only for rotary models, the gated MLP's
    # linear branch only for gated MLPs, resid_mid only without a parallel residual
    local = sites.block_sites(m.cfg)
    assert ("attn.hook_rot_q" in local) == (m.cfg.positional == "rotary")
    assert ("mlp.hook_pre_linear" in local) == ("W_gate" in m.params["blocks"]["mlp"])
    assert ("hook_resid_mid" in local) == (not m.cfg.parallel_residual)


@pytest.mark.parametrize("cls,kw,match", [
    # every rotary scaling transformers computes frequencies for is implemented (tests/test_rope_options.py);
    # a rotary type jinterp does not implement is named, never replaced by another
    (hf_zoo.tf.LlamaConfig, dict(rope_parameters={"rope_type": "axial", "rope_theta": 1e4}, **hf_zoo.LLAMA),
     "rotary scaling 'axial' is not supported"),
    # Gemma 3's rotary settings by layer type: a scaling type on either kind of layer is named with that kind
    (hf_zoo.tf.Gemma3TextConfig,
     dict(rope_parameters={"sliding_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                           "full_attention": {"rope_type": "default", "rope_theta": 10.0}},
          hidden_size=32, num_attention_heads=4, head_dim=8, num_hidden_layers=2, **hf_zoo.SMALL),
     "rotary scaling 'dynamic' on sliding_attention layers is not supported"),
])
def test_unsupported_options_are_named(tmp_path, cls, kw, match):
    cls(**kw).save_pretrained(str(tmp_path))
    with pytest.raises(jinterp.UnsupportedArchitecture, match=match):
        jinterp.load(str(tmp_path))


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint loads as its language model (a warning names what is left
    out), with HF's text-only logits and hidden states."""
    hf = hf_zoo.build_gemma3_multimodal()
    path = hf_zoo.save(hf, tmp_path / "m")
    with pytest.warns(UserWarning, match="text model only"):
        model = jinterp.load(path)
    assert model.cfg.family == "gemma3" and model.cfg.n_layers == 5
    toks = _tokens()
    with torch.no_grad():
        out = hf(torch.as_tensor(toks).long(), output_hidden_states=True)
    logits, cache = model.run_with_cache(toks, names=[f"blocks.{l}.hook_resid_pre" for l in range(5)])
    _close(logits, out.logits.numpy(), "gemma3 multimodal logits")
    for l in range(5):
        _close(cache[f"blocks.{l}.hook_resid_pre"], out.hidden_states[l].numpy(), f"gemma3 multimodal resid_pre {l}")
