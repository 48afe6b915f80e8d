"""induction-2l: the task, its data generator, its evaluation, and the training recipe.

The model is a 2-layer GPT-2-architecture transformer trained on random words repeated
([BOS, w1..wn, w1..wn, ...]). The repeated part is predictable only by finding the earlier
occurrence of the current word and copying what followed it, the job of induction heads (a
previous-token head in layer 0 feeding, by K-composition, an induction head in layer 1).

Retrain with `jinterp train-bundled induction-2l --out DIR`; load this file with
`jinterp.train.organisms.recipe("induction-2l")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jinterp.config import Config
from jinterp.train import hf_export, loop

# A small word vocabulary so that tokens read as text: id 0 is BOS, 1 is <unk>, words from 2.
WORDS = (
    "apple river stone cloud music garden window yellow orange silver paper bottle engine forest mountain "
    "ocean pencil rabbit tiger violin winter summer spring autumn bridge castle dragon eagle feather guitar "
    "hammer island jacket kettle lemon marble needle pepper quartz rocket saddle tunnel umbrella valley wagon "
    "zebra anchor basket candle desert ember falcon glacier harbor iron jungle kernel ladder meadow nickel "
    "oyster parrot quiver raven shadow thunder velvet walnut canyon lantern copper dolphin emerald fossil "
    "granite helmet igloo jasmine koala lizard magnet nectar olive pebble quilt ribbon salmon tomato unicorn "
    "vapor whistle yogurt zephyr acorn blossom cactus daisy echo fable goblet harp ivory jewel kite lotus "
    "mango nutmeg orbit prism quail reef sapphire tulip urchin vortex willow yarn zinc amber"
).split()
VOCAB_SIZE = 2 + len(WORDS)


def tokenizer():
    """The word-level tokenizer over WORDS (id 0 = <|endoftext|>: BOS, EOS and padding; 1 = <unk>)."""
    return hf_export.word_tokenizer(WORDS)


def induction_config(d_model: int = 64, n_heads: int = 2) -> Config:
    return Config(
        family="gpt2", n_layers=2, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=VOCAB_SIZE, n_ctx=64, norm="layernorm", norm_eps=1e-5, positional="learned",
        act="gelu_new", tied_embeddings=True,
    )


def induction_batch(
    rng: np.random.Generator, batch: int, seg_len: int, vocab: int, min_len: int | None = None, max_prefix: int = 0,
    n_tokens: int | None = None,
) -> np.ndarray:
    """Repeated random words, [batch, n_tokens] (default 1 + max_prefix + 2 * seg_len).

    Each row: BOS (id 0), r random words, then a segment of s random words (ids >= 2) repeated
    until the row ends. With the defaults (evaluation) r = 0 and s = seg_len, so a row is
    [BOS, w1..wn, w1..wn]. Training draws s in [min_len, seg_len] and r in [0, max_prefix] per
    row, so where the earlier copy sits is not fixed: the model has to find it by content (the
    induction mechanism), not by position.
    """
    n = n_tokens or 1 + max_prefix + 2 * seg_len
    out = rng.integers(2, vocab, size=(batch, n), dtype=np.int32)
    out[:, 0] = 0
    lens = np.full(batch, seg_len) if min_len is None else rng.integers(min_len, seg_len + 1, size=batch)
    starts = 1 + rng.integers(0, max_prefix + 1, size=batch)
    for row, s, a in zip(out, lens, starts):
        row[a + s :] = np.resize(row[a : a + s], n - a - s)
    return out


def evaluate(params: dict, cfg: Config, seg_len: int = 20, n: int = 512, seed: int = 1234) -> dict:
    """Losses and accuracy on n rows of [BOS, w1..w_seg_len, w1..w_seg_len] (complete parameters)."""
    toks = jnp.asarray(induction_batch(np.random.default_rng(seed), n, seg_len, cfg.d_vocab))
    nll, correct = jax.jit(loop.token_losses, static_argnames="cfg")(params, cfg, toks)
    # predictions of token t+1 from position t: the repeated half is targets seg_len+1 .. 2*seg_len
    first, rep = slice(0, seg_len), slice(seg_len + 1, 2 * seg_len)
    return {
        "loss_all": float(nll.mean()),
        "loss_first_half": float(nll[:, first].mean()),
        "loss_repeated_half": float(nll[:, rep].mean()),
        "accuracy_repeated_half": float(correct[:, rep].mean()),
        "uniform_loss": float(np.log(cfg.d_vocab - 2)),
    }


def train(
    out_dir, *, seed: int = 0, steps: int | None = None, batch: int = 64, seg_len: int = 20, min_len: int = 4,
    max_prefix: int = 8, lr: float = 1e-3, d_model: int = 64, n_heads: int = 2, log_every: int = 250,
    progress: bool = True,
) -> dict:
    """Train the model and write it to out_dir in HF format with its training.json. Returns the card
    (metrics, recipe, train_seconds, loss_history). The bundled model is the defaults, seed 0."""
    steps = 3000 if steps is None else steps
    cfg = induction_config(d_model, n_heads)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=steps // 20, decay_steps=steps, end_value=lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    run = loop.train(
        cfg, lambda rng: induction_batch(rng, batch, seg_len, cfg.d_vocab, min_len, max_prefix), opt,
        steps=steps, seed=seed, log_every=log_every, progress=progress, desc="training induction-2l",
    )
    metrics = evaluate(run.params, cfg, seg_len)
    recipe = dict(seed=seed, steps=steps, batch=batch, seg_len=f"{min_len}..{seg_len}", prefix=f"0..{max_prefix}", lr=lr,
                  d_model=d_model, n_heads=n_heads, optimizer="adamw(wd=0.01), clip 1.0, warmup 5% + cosine to lr/20")
    hf_export.save_hf(run.params, cfg, out_dir, tokenizer())
    card = {"metrics": metrics, "recipe": recipe, "train_seconds": round(run.seconds, 1), "loss_history": run.history}
    (Path(out_dir) / "training.json").write_text(json.dumps(card, indent=1))
    return card
