"""Gemma 3 (text): Gemma 2's norms around attention and MLP, embedding scale and query_pre_attn_scalar, plus
per-head QK-norm with (1 + w) weights, sliding-window and global layers interleaved by layer_types (or
sliding_window_pattern), and separate rotary settings for the two: the sliding layers rotate with
rope_local_base_freq, the global ones with rope_theta and possibly rotary scaling (Config.local_rope_*).
Soft-capping is read where set (None by default in Gemma 3).

Multimodal checkpoints (Gemma3ForConditionalGeneration, model_type "gemma3") load their text model: the
language model's weights (model.language_model.* as transformers 5 saves them, language_model.model.* as
the hub's original checkpoints hold them) and its config (text_config). The vision tower and projector are
not loaded (a warning says so); jinterp runs the model on text tokens only, which is what
Gemma3ForConditionalGeneration computes for inputs without images.
"""

import warnings

from jinterp.arch.families import llama
from jinterp.arch.families.common import unembedding
from jinterp.io.hf import hf_attr

MODEL_TYPES = ("gemma3_text", "gemma3")
# the multimodal wrapper's language model first: the Reader takes the first prefix any tensor carries
PREFIXES = ("model.language_model.", "language_model.model.") + llama.PREFIXES
# where a multimodal checkpoint keeps an (untied) output matrix
LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def text_config(hf):
    """The text model's HF config: a multimodal Gemma3Config holds it as text_config."""
    return getattr(hf, "text_config", None) or hf


def config(hf):
    hf = text_config(hf)
    return llama.base_config(
        hf,
        "gemma3",
        act=hf_attr(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
        embed_scale=hf.hidden_size**0.5,
        post_norms=True,
        qk_norm=True,
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        attn_softcap=hf_attr(hf, "attn_logit_softcapping"),
        final_softcap=hf_attr(hf, "final_logit_softcapping"),
    )


def params(r, c, hf):
    text = text_config(hf)
    norms = {
        "ln1": "input_layernorm",
        "ln1_post": "post_attention_layernorm",
        "ln2": "pre_feedforward_layernorm",
        "ln2_post": "post_feedforward_layernorm",
    }
    out = llama.params(r, c, text, norm_offset=1.0, norms=norms)  # QK-norm weights get the (1 + w) too
    head = next((n for n in LM_HEADS if r.has(n)), LM_HEADS[0])
    out["unembed"] = unembedding(r, head, "embed_tokens.weight", c)
    if text is not hf:  # multimodal: say what is left out, once, instead of the loader's unused-tensor warning
        other = [n for n in r.names() if not n.startswith(r.prefix) and n not in LM_HEADS]
        if other:
            warnings.warn(
                f"{type(hf).__name__} checkpoint: jinterp loads its text model only (the language model, "
                f"{r.prefix}*); the {len(other)} vision-tower and projector tensors are not loaded, so inputs "
                "are text tokens only (no images).",
                stacklevel=3,
            )
            r.used.update(other)
    return out
