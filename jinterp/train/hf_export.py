"""Write a model in Hugging Face format (config.json, model.safetensors, tokenizer files), so that
both `jinterp.load` and HF `from_pretrained` read it; and a word-level tokenizer for toy vocabularies."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jinterp.config import Config


def word_tokenizer(words, *, bos: str = "<|endoftext|>", unk: str = "<unk>"):
    """A word-level HF tokenizer: id 0 = `bos` (also EOS and padding), 1 = `unk`, then `words` in
    order from id 2. Text splits on whitespace; decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(words)
    if len(set(words)) != len(words) or {bos, unk} & set(words):
        raise ValueError("words must be distinct and must not contain the bos or unk token")
    vocab = {bos: 0, unk: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=bos, pad_token=bos, unk_token=unk, clean_up_tokenization_spaces=False
    )


def save_hf(params: dict, cfg: Config, out_dir, tokenizer=None) -> Path:
    """Write a complete parameter pytree (see `loop.complete`) as an HF checkpoint in out_dir:
    config.json, model.safetensors and, when given, the tokenizer's files. Returns out_dir.

    GPT-2-family configs only for now (learned positions, LayerNorm, dense MLP): the export is
    the inverse of `jinterp/arch/families/gpt2.py`. Another family needs a `to_hf` there first.
    """
    from safetensors.numpy import save_file
    from transformers import GPT2Config

    from jinterp.arch.families import gpt2

    if cfg.family != "gpt2":
        raise ValueError(
            f"save_hf writes GPT-2-family models only; this config is family {cfg.family!r}. "
            "Export another family by adding its inverse mapping (to_hf) in jinterp/arch/families/."
        )
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if len(tokenizer) != cfg.d_vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {cfg.d_vocab}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    GPT2Config(
        vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
        n_inner=cfg.d_mlp, activation_function=cfg.act, layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tied_embeddings, architectures=["GPT2LMHeadModel"], **ids,
    ).save_pretrained(str(out))
    tensors = gpt2.to_hf(jax.tree.map(np.asarray, params), cfg)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
