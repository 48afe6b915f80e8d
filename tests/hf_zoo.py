"""Tiny random HF models for parity tests: one entry per family variant worth checking.

Every parameter is perturbed away from its default init (norm weights away from 1, biases away
from 0), so norms and biases are exercised. Models are saved with save_pretrained to a temp dir
and jinterp loads that dir, the same code path users run on hub checkpoints.
"""

from __future__ import annotations

import torch
import transformers as tf

V = 96  # vocab
SMALL = dict(vocab_size=V, max_position_embeddings=64)
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, **SMALL)

# name -> (config class, kwargs)
VARIANTS = {
    "gpt2": (tf.GPT2Config, dict(n_layer=3, n_embd=32, n_head=4, vocab_size=V, n_positions=64)),
    "gpt2-n_inner-gelu": (
        tf.GPT2Config,
        dict(n_layer=2, n_embd=32, n_head=2, n_inner=40, activation_function="gelu", vocab_size=V, n_positions=64),
    ),
    "gpt2-untied": (tf.GPT2Config, dict(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64, tie_word_embeddings=False)),
    "neox-parallel-partial-rotary": (
        tf.GPTNeoXConfig,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.25,
             rotary_emb_base=1000, use_parallel_residual=True, **SMALL),
    ),
    "neox-sequential-nobias": (
        tf.GPTNeoXConfig,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, rotary_pct=1.0,
             use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True, **SMALL),
    ),
    "llama-mha": (tf.LlamaConfig, dict(num_key_value_heads=4, **LLAMA)),
    "llama-gqa-untied-bias": (
        tf.LlamaConfig, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, **LLAMA),
    ),
    "llama-mqa-tied": (tf.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True, **LLAMA)),
    "llama-rope-linear": (
        tf.LlamaConfig,
        dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}, **LLAMA),
    ),
    "llama3-rope": (
        tf.LlamaConfig,
        dict(
            num_key_value_heads=2,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            **LLAMA,
        ),
    ),
    "mistral-sliding": (tf.MistralConfig, dict(num_key_value_heads=2, sliding_window=4, **LLAMA)),
    "qwen2-bias-sliding": (
        tf.Qwen2Config,
        dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=1, **LLAMA),
    ),
    "qwen3-qknorm-headdim": (tf.Qwen3Config, dict(num_key_value_heads=2, head_dim=16, **LLAMA)),
    "gemma-mqa": (
        tf.GemmaConfig, dict(num_key_value_heads=1, head_dim=12, hidden_activation="gelu_pytorch_tanh", **LLAMA),
    ),
    "gemma2-softcap-alternating": (
        tf.Gemma2Config,
        dict(num_key_value_heads=2, head_dim=12, sliding_window=4, query_pre_attn_scalar=10,
             attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **LLAMA),
    ),
    # 5 layers, sliding_window_pattern 3: sliding, sliding, global, sliding, sliding (window 4 < SEQ); local and
    # global rotary bases differ and only the global layers are "linear"-scaled; per-head QK-norm with (1 + w);
    # head_dim 12 != 32 / 4; GQA
    "gemma3-local-global": (
        tf.Gemma3TextConfig,
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
             head_dim=12, sliding_window=4, sliding_window_pattern=3, query_pre_attn_scalar=10,
             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
             **SMALL),
    ),
    # no pre-norms, post-norms on attention and MLP outputs, QK-norm over all heads at once, biases on q/k/v/o
    "olmo2-postnorm-qknorm": (tf.Olmo2Config, dict(num_key_value_heads=2, attention_bias=True, **LLAMA)),
    # fused qkv / gate_up, rotary on half of each head, longrope: SEQ (12) > original_max_position_embeddings
    # (8) takes the long factors, the shorter padded rows and the prefill of generation the short ones, and
    # generation crosses over mid-way
    "phi3-partial-longrope": (
        tf.Phi3Config,
        dict(num_key_value_heads=2, original_max_position_embeddings=8, pad_token_id=0, partial_rotary_factor=0.5,
             rope_parameters={"rope_type": "longrope", "rope_theta": 1000.0, "short_factor": [1.0, 1.7],
                              "long_factor": [3.0, 7.5]}, **LLAMA),
    ),
    # default rotary, every layer sliding (slow variant: the default run covers phi3 with phi3-partial-longrope)
    "phi3-sliding": (tf.Phi3Config, dict(num_key_value_heads=4, sliding_window=4, pad_token_id=0, **LLAMA)),
    # one LayerNorm feeding parallel attention and MLP, interleaved rotary on 6 of 8 dims per head, MLP and lm_head biases
    "gptj-parallel-interleaved": (
        tf.GPTJConfig, dict(n_layer=3, n_embd=32, n_head=4, rotary_dim=6, n_inner=40, vocab_size=V, n_positions=64),
    ),
    # issue 14 item 3 options (sites-only by default, tests/conftest.py SITES_ONLY_ZOO; tests/test_rope_options.py)
    # NTK-dynamic rotary: max_position_embeddings 8 < SEQ (12), so the base grows per call
    "llama-rope-dynamic": (
        tf.LlamaConfig,
        dict(LLAMA, num_key_value_heads=2, max_position_embeddings=8,
             rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000.0}),
    ),
    # YaRN with mscale / mscale_all_dim (attention_factor derived) and non-default betas, truncated range
    "llama-rope-yarn": (
        tf.LlamaConfig,
        dict(num_key_value_heads=2, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 100.0,
             "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 0.5, "mscale": 1.0,
             "mscale_all_dim": 0.5}, **LLAMA),
    ),
    # YaRN on Qwen3 (head_dim 16, QK-norm): attention_factor from factor alone, truncate=False
    "qwen3-rope-yarn": (
        tf.Qwen3Config,
        dict(num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "yarn", "factor": 2.0,
             "rope_theta": 1000.0, "original_max_position_embeddings": 8, "beta_fast": 4.0, "beta_slow": 0.25,
             "truncate": False}, **LLAMA),
    ),
    # Gemma 4's proportional rotary on a Llama: 2 of the 4 frequencies of a 16-dim head, the rest zero
    "llama-rope-proportional": (
        tf.LlamaConfig,
        dict(LLAMA, num_key_value_heads=1, hidden_size=48, num_attention_heads=3,
             rope_parameters={"rope_type": "proportional", "factor": 1.5, "rope_theta": 100.0, "partial_rotary_factor": 0.5}),
    ),
    # rotary_pct giving an odd int(16 * 0.3125) = 5: transformers rotates 6 dims with exponents over 5; sequential
    "neox-rotary5-sequential": (
        tf.GPTNeoXConfig,
        dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, rotary_pct=0.3125,
             use_parallel_residual=False, **SMALL),
    ),
    # 6 rotary dims (even, not a multiple of 4), parallel residual, untied embed_out
    "neox-rotary6-parallel": (
        tf.GPTNeoXConfig,
        dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, rotary_pct=0.375,
             use_parallel_residual=True, tie_word_embeddings=False, **SMALL),
    ),
    # scores / (layer + 1), and scores and softmax in float32 (eager attention, as build() sets)
    "gpt2-inverse-layer-upcast": (
        tf.GPT2Config,
        dict(n_layer=3, n_embd=32, n_head=4, vocab_size=V, n_positions=64, scale_attn_by_inverse_layer_idx=True,
             reorder_and_upcast_attn=True),
    ),
}

MODEL_CLASS = {
    tf.GPT2Config: tf.GPT2LMHeadModel,
    tf.GPTNeoXConfig: tf.GPTNeoXForCausalLM,
    tf.LlamaConfig: tf.LlamaForCausalLM,
    tf.MistralConfig: tf.MistralForCausalLM,
    tf.Qwen2Config: tf.Qwen2ForCausalLM,
    tf.Qwen3Config: tf.Qwen3ForCausalLM,
    tf.GemmaConfig: tf.GemmaForCausalLM,
    tf.Gemma2Config: tf.Gemma2ForCausalLM,
    tf.Gemma3TextConfig: tf.Gemma3ForCausalLM,
    tf.Olmo2Config: tf.Olmo2ForCausalLM,
    tf.Phi3Config: tf.Phi3ForCausalLM,
    tf.GPTJConfig: tf.GPTJForCausalLM,
}


# mixture-of-experts variants (tests/test_moe.py; kept out of VARIANTS, which every parity test runs): awkward
# sizes, top-k of 5 or 6 experts, GQA, sliding windows, biases, shared expert with its gate, both norm_topk_prob
MOE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **SMALL)
MOE_VARIANTS = {
    "mixtral-top2of5-sliding": (
        tf.MixtralConfig, dict(intermediate_size=20, num_local_experts=5, num_experts_per_tok=2, sliding_window=5, **MOE),
    ),
    "qwen2moe-shared-bias": (
        tf.Qwen2MoeConfig,
        dict(intermediate_size=40, moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=5,
             num_experts_per_tok=2, norm_topk_prob=False, **MOE),
    ),
    "qwen3moe-qknorm-norm-topk": (
        tf.Qwen3MoeConfig,
        dict(intermediate_size=40, moe_intermediate_size=12, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
             head_dim=12, **MOE),
    ),
    "olmoe-qknorm-bias": (
        tf.OlmoeConfig,
        dict(intermediate_size=20, num_experts=5, num_experts_per_tok=2, norm_topk_prob=False, attention_bias=True,
             pad_token_id=0, eos_token_id=None, **MOE),
    ),
}
MODEL_CLASS.update({
    tf.MixtralConfig: tf.MixtralForCausalLM,
    tf.Qwen2MoeConfig: tf.Qwen2MoeForCausalLM,
    tf.Qwen3MoeConfig: tf.Qwen3MoeForCausalLM,
    tf.OlmoeConfig: tf.OlmoeForCausalLM,
})


def build(name: str, seed: int = 0):
    """A perturbed random HF model (eager attention, eval mode, fp32)."""
    cls, kw = VARIANTS[name] if name in VARIANTS else MOE_VARIANTS[name]
    return build_config(cls, kw, seed)


def build_config(cls, kw: dict, seed: int = 0):
    """build() for a config class and its keyword arguments (tests/test_fuzz.py draws them)."""
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    # MoE experts as HF's plain loop: the default grouped_mm path needs widths whose rows are 16-byte multiples
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = MODEL_CLASS[cls](cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.register_forward_pre_hook(lambda m, a: reset_dynamic_rope(m))
    return model


def reset_dynamic_rope(model) -> None:
    """Return every dynamic-rotary module of an HF model to its freshly loaded state. transformers keeps the
    largest dynamic base it has computed until a call shorter than max_position_embeddings resets it, so a call
    depends on earlier ones; the zoo's models reset before each forward (a generation step included, where it
    changes nothing: the length only grows) and compute what a fresh model computes."""
    for mod in model.modules():
        for name in [n for n in vars(mod).get("_buffers", {}) if n.endswith("original_inv_freq")]:
            pre = name[: -len("original_inv_freq")]
            if hasattr(mod, pre + "max_seq_len_cached") or hasattr(mod, "max_seq_len_cached"):
                getattr(mod, pre + "inv_freq").copy_(getattr(mod, name))
                setattr(mod, pre + "max_seq_len_cached", mod.original_max_seq_len)


def build_gemma3_multimodal(seed: int = 0):
    """A perturbed random Gemma3ForConditionalGeneration (tiny SigLIP vision tower) whose text model is the
    gemma3-local-global variant; jinterp loads its text part only."""
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = tf.Gemma3Config(text_config=dict(VARIANTS["gemma3-local-global"][1]), vision_config=vision, mm_tokens_per_image=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def save(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def layers(model):
    """The HF decoder layers, whatever the family calls them."""
    base = getattr(model, "transformer", None) or getattr(model, "gpt_neox", None) or model.model
    return base.h if hasattr(base, "h") else base.layers


def capture(model, tokens, attention_mask=None):
    """HF reference activations via forward hooks: per-layer resid_pre/resid_post, attention and MLP
    outputs as they enter the residual stream, attention patterns, and logits."""
    rec = {"resid_pre": [], "resid_post": [], "attn_out": [], "mlp_out": []}
    hooks = []
    first = lambda o: o[0] if isinstance(o, tuple) else o
    for layer in layers(model):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, k: rec["resid_pre"].append(first(a) if a else k["hidden_states"]), with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, a, o: rec["resid_post"].append(first(o))))
        attn = getattr(layer, "attn", None) or getattr(layer, "attention", None) or layer.self_attn
        mlp = layer.mlp
        # with post-norms (Gemma 2, OLMo 2) post_attention_layernorm normalises the attention output
        post_attn = getattr(layer, "post_attention_layernorm", None) if hasattr(layer, "post_feedforward_layernorm") else None
        post_mlp = getattr(layer, "post_feedforward_layernorm", None)
        hooks.append((post_attn or attn).register_forward_hook(lambda m, a, o: rec["attn_out"].append(first(o))))
        hooks.append((post_mlp or mlp).register_forward_hook(lambda m, a, o: rec["mlp_out"].append(first(o))))
    try:
        with torch.no_grad():
            out = model(
                torch.as_tensor(tokens),
                attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask).long(),
                output_attentions=True,
            )
    finally:
        for h in hooks:
            h.remove()
    rec = {k: torch.stack(v).numpy() for k, v in rec.items()}
    rec["pattern"] = torch.stack(out.attentions).numpy()
    rec["logits"] = out.logits.numpy()
    return rec
