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


def build(name: str, seed: int = 0):
    """A perturbed random HF model (eager attention, eval mode, fp32)."""
    cls, kw = VARIANTS[name]
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MODEL_CLASS[cls](cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


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
