"""Fuzz: random valid configs per family and random edits, against HF torch and against naive loops.

Each case draws a family, then its shapes (layers, heads, GQA ratio, head width not tied to d_model
where the family allows it, odd MLP widths) and its options (biases, tying, rotary fraction, windows,
soft-caps) from a fixed seed. Checked for each: the logits and every layer's resid_post against HF
eager fp32; a random pair of edits (a steering vector added to one layer's resid_post at random
positions, and one head zeroed at attn.hook_z) against HF with the same change made by torch hooks.
One case also runs a patching sweep against its naive loop of single-edit forwards.

By default a few cases run (one compile each); `pytest -m slow tests/test_fuzz.py` runs every family
several times. The seeds are fixed, so a failure names a reproducible case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import jinterp
from jinterp import edits as E
from jinterp import metrics, patching
from tests import hf_zoo

V = hf_zoo.V
SEQ = 10


def _heads(rs, max_heads=4):
    h = int(rs.randint(1, max_heads + 1))
    kv = int(rs.choice([d for d in range(1, h + 1) if h % d == 0]))
    return h, kv


def _even(rs, lo=2, hi=8):
    return int(rs.choice(range(lo, hi + 1, 2)))


def _llama_like(rs, rotary=True):
    h, kv = _heads(rs)
    dh = _even(rs, 4, 10)
    return dict(hidden_size=int(rs.choice([h * dh, 4 * _even(rs, 4, 8)])), intermediate_size=int(rs.randint(9, 40)),
                num_hidden_layers=int(rs.randint(1, 4)), num_attention_heads=h, num_key_value_heads=kv, head_dim=dh,
                tie_word_embeddings=bool(rs.rand() < 0.5), vocab_size=V, max_position_embeddings=64)


def _gpt2(rs):
    h = int(rs.randint(1, 5))
    return tf.GPT2Config, dict(n_layer=int(rs.randint(1, 4)), n_head=h, n_embd=h * _even(rs, 4, 10),
                               n_inner=int(rs.randint(9, 40)), vocab_size=V, n_positions=64,
                               activation_function=str(rs.choice(["gelu_new", "gelu", "relu"])),
                               tie_word_embeddings=bool(rs.rand() < 0.5))


def _neox(rs):
    h = int(rs.randint(1, 5))
    dh = _even(rs, 4, 12)
    return tf.GPTNeoXConfig, dict(hidden_size=h * dh, intermediate_size=int(rs.randint(9, 40)),
                                  num_hidden_layers=int(rs.randint(1, 4)), num_attention_heads=h,
                                  rotary_pct=float(rs.choice([0.25, 0.5, 1.0])), use_parallel_residual=bool(rs.rand() < 0.5),
                                  attention_bias=bool(rs.rand() < 0.5), tie_word_embeddings=bool(rs.rand() < 0.5),
                                  vocab_size=V, max_position_embeddings=64)


def _llama(rs):
    kw = _llama_like(rs)
    return tf.LlamaConfig, dict(kw, attention_bias=bool(rs.rand() < 0.5), mlp_bias=bool(rs.rand() < 0.5))


def _mistral(rs):
    return tf.MistralConfig, dict(_llama_like(rs), sliding_window=int(rs.randint(2, SEQ)))


def _qwen2(rs):
    kw = _llama_like(rs)
    kw.pop("head_dim")
    kw["hidden_size"] = kw["num_attention_heads"] * _even(rs, 4, 10)
    return tf.Qwen2Config, kw


def _qwen3(rs):
    return tf.Qwen3Config, _llama_like(rs)


def _gemma(rs):
    return tf.GemmaConfig, dict(_llama_like(rs), hidden_activation="gelu_pytorch_tanh")


def _gemma2(rs):
    return tf.Gemma2Config, dict(_llama_like(rs), sliding_window=int(rs.randint(2, SEQ)),
                                 query_pre_attn_scalar=int(rs.randint(4, 20)),
                                 attn_logit_softcapping=float(rs.uniform(2, 10)), final_logit_softcapping=float(rs.uniform(2, 10)))


def _gemma3(rs):
    kw = _llama_like(rs)
    kw["num_hidden_layers"] = int(rs.randint(2, 5))
    return tf.Gemma3TextConfig, dict(kw, sliding_window=int(rs.randint(2, SEQ)), sliding_window_pattern=int(rs.randint(2, 4)),
                                     query_pre_attn_scalar=int(rs.randint(4, 20)),
                                     rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                                      "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})


def _olmo2(rs):
    kw = _llama_like(rs)
    kw.pop("head_dim")
    kw["hidden_size"] = kw["num_attention_heads"] * _even(rs, 4, 10)
    return tf.Olmo2Config, dict(kw, attention_bias=bool(rs.rand() < 0.5))


def _phi3(rs):
    kw = _llama_like(rs)
    kw.pop("head_dim")
    dh = 4 * int(rs.randint(1, 4))
    kw["hidden_size"] = kw["num_attention_heads"] * dh
    return tf.Phi3Config, dict(kw, partial_rotary_factor=float(rs.choice([0.5, 1.0])), pad_token_id=0)


def _gptj(rs):
    h = int(rs.randint(1, 5))
    dh = _even(rs, 4, 12)
    return tf.GPTJConfig, dict(n_layer=int(rs.randint(1, 4)), n_head=h, n_embd=h * dh, rotary_dim=_even(rs, 2, dh),
                               n_inner=int(rs.randint(9, 40)), vocab_size=V, n_positions=64,
                               tie_word_embeddings=bool(rs.rand() < 0.5))


def _moe(rs):
    """Shared shapes of the mixture-of-experts draws: e experts, top k of them."""
    kw = _llama_like(rs)
    kw.pop("head_dim")
    kw["hidden_size"] = kw["num_attention_heads"] * _even(rs, 4, 10)
    e = int(rs.randint(2, 7))
    return kw, e, int(rs.randint(1, e + 1))


def _mixtral(rs):
    kw, e, k = _moe(rs)
    return tf.MixtralConfig, dict(kw, num_local_experts=e, num_experts_per_tok=k, sliding_window=int(rs.randint(2, SEQ)))


def _qwen2_moe(rs):
    kw, e, k = _moe(rs)
    return tf.Qwen2MoeConfig, dict(kw, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=int(rs.randint(5, 20)),
                                   shared_expert_intermediate_size=int(rs.randint(5, 30)), norm_topk_prob=bool(rs.rand() < 0.5))


def _olmoe(rs):
    kw, e, k = _moe(rs)
    return tf.OlmoeConfig, dict(kw, num_experts=e, num_experts_per_tok=k, norm_topk_prob=bool(rs.rand() < 0.5),
                                attention_bias=bool(rs.rand() < 0.5), pad_token_id=0, eos_token_id=None)


FAMILIES = {"gpt2": _gpt2, "neox": _neox, "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
            "gemma": _gemma, "gemma2": _gemma2, "gemma3": _gemma3, "olmo2": _olmo2, "phi3": _phi3, "gptj": _gptj,
            "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe}

# the default run: three fixed draws (a sweep, odd rotary dims, experts; about 5 s each); slow: every family, 3 seeds
DEFAULT = [("llama", 0), ("neox", 3), ("qwen2_moe", 4)]
SLOW = [("gpt2", 1), ("gemma2", 2)] + [(f, s) for f in FAMILIES for s in range(10, 13)]
CASES = [pytest.param(f, s, id=f"{f}-{s}") for f, s in DEFAULT] + [
    pytest.param(f, s, id=f"{f}-{s}", marks=pytest.mark.slow) for f, s in SLOW]


def _o_proj(layer):
    """The HF module that reads the concatenated heads (attn.hook_z) of one decoder layer."""
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None) or layer.attn
    for name in ("o_proj", "c_proj", "dense", "out_proj"):
        if hasattr(attn, name):
            return getattr(attn, name)
    raise AssertionError(f"no output projection in {type(attn).__name__}")


def _hf_with_edits(hf, tokens, steer_layer, steer_pos, vec, ablate_layer, head, d_head):
    """HF logits with vec added to layer steer_layer's output at steer_pos and head `head` of layer
    ablate_layer zeroed before its output projection (torch hooks: the independent reference)."""
    layers = hf_zoo.layers(hf)
    v = torch.as_tensor(np.asarray(vec, np.float32))

    def add(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, steer_pos] += v
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def zero(module, args):
        z = args[0].clone()
        z[..., head * d_head:(head + 1) * d_head] = 0
        return (z,) + tuple(args[1:])

    hooks = [layers[steer_layer].register_forward_hook(add), _o_proj(layers[ablate_layer]).register_forward_pre_hook(zero)]
    try:
        with torch.no_grad():
            return hf(torch.as_tensor(tokens).long()).logits.numpy()
    finally:
        for h in hooks:
            h.remove()


def _close(ours, ref, what, atol=3e-5):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    err = np.abs(ours - ref).max()
    assert err <= atol * max(1.0, np.abs(ref).max()), f"{what}: max |diff| {err:.3g}"


@pytest.mark.parametrize("family,seed", CASES)
def test_random_config_and_edits_match_hf(family, seed, tmp_path):
    rs = np.random.RandomState(seed)
    cls, kw = FAMILIES[family](rs)
    case = f"{family} seed {seed}: {cls.__name__}({kw})"
    hf = hf_zoo.build_config(cls, kw, seed=seed)
    model = jinterp.load(hf_zoo.save(hf, tmp_path / "hf"))
    cfg = model.cfg
    tokens = rs.randint(0, V, (2, SEQ)).astype(np.int32)

    ref = hf_zoo.capture(hf, tokens)
    logits, cache = model.run_with_cache(tokens)
    _close(logits, ref["logits"], f"{case}: logits")
    for l in range(cfg.n_layers):
        _close(cache[f"blocks.{l}.hook_resid_post"], ref["resid_post"][l], f"{case}: resid_post {l}")

    steer_layer, ablate_layer = int(rs.randint(cfg.n_layers)), int(rs.randint(cfg.n_layers))
    head = int(rs.randint(cfg.n_heads))
    steer_pos = sorted(rs.choice(SEQ, size=int(rs.randint(1, SEQ)), replace=False).tolist())
    vec = rs.randn(cfg.d_model).astype(np.float32)
    edits = [E.steer(f"blocks.{steer_layer}.hook_resid_post", vec, pos=steer_pos),
             E.zero_ablate(f"blocks.{ablate_layer}.attn.hook_z", heads=[head])]
    ours = model(tokens, edits=edits)
    theirs = _hf_with_edits(hf, tokens, steer_layer, steer_pos, vec, ablate_layer, head, cfg.d_head)
    _close(ours, theirs, f"{case}: steer layer {steer_layer} pos {steer_pos} + zero head {ablate_layer}.{head}")

    if (family, seed) == DEFAULT[0]:  # one sweep against its naive loop (a sweep compiles several programs)
        corrupted = tokens.copy()
        corrupted[:, 3] = (corrupted[:, 3] + 1) % V
        metric = metrics.logit_diff(rs.randint(0, V, (2, 2)))
        swept = patching.resid_pre(model, corrupted, cache, metric, progress=False).values
        for l in range(cfg.n_layers):
            for p in range(SEQ):
                e = E.patch(f"blocks.{l}.hook_resid_pre", cache[f"blocks.{l}.hook_resid_pre"], pos=[p])
                np.testing.assert_allclose(swept[l, p], float(metric(model(corrupted, edits=[e]))), atol=3e-5,
                                           err_msg=f"{case}: resid_pre sweep cell ({l}, {p})")
