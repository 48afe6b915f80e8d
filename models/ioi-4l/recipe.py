"""ioi-4l: the task, its data generator, its evaluation, and the training recipe.

A 4-layer, 4-head GPT-2-architecture transformer trained from scratch on indirect-object
identification: the paper's fifteen BABA templates and their ABBA swaps (Wang et al. 2023;
`experiments/data/ioi.py`), over a word-level vocabulary of template words, 40 names, 8 places
and 8 objects. "When Mary and John went to the store , John gave a drink to" -> "Mary". The
answer is the name that is *not* repeated, so the model has to find which name occurs twice and
predict the other one, the job the IOI circuit does in GPT-2 small.

Retrain with `jinterp train-bundled ioi-4l --out DIR`; load this file with
`jinterp.train.organisms.recipe("ioi-4l")`:

    ioi = organisms.recipe("ioi-4l")
    gen = ioi.generator()                         # experiments.data.ioi.IOIGenerator over ioi.tokenizer()
    batch = gen.sample(np.random.default_rng(0), 64)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import ioi as data
from jinterp import arch
from jinterp.config import Config
from jinterp.train import hf_export, loop

NAMES = data.NAMES
PLACES = data.PLACES
OBJECTS = data.OBJECTS
TEMPLATE_WORDS = tuple(dict.fromkeys(
    w for t in data.BABA_TEMPLATES for w in re.findall(r"\w+|[^\w\s]", re.sub(r"\[(A|B|PLACE|OBJECT)\]", " ", t))
))
# id 0 is <|endoftext|> (BOS/EOS/pad), 1 is <unk>, then these words
WORDS = TEMPLATE_WORDS + tuple(NAMES) + tuple(PLACES) + tuple(OBJECTS)
VOCAB_SIZE = 2 + len(WORDS)
N_CTX = 32


def tokenizer():
    """Word-level tokenizer over WORDS; punctuation splits off words ("store," -> "store", ",")."""
    from tokenizers import pre_tokenizers

    tok = hf_export.word_tokenizer(WORDS)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def generator(tok=None) -> data.IOIGenerator:
    """The IOI data generator over this model's vocabulary."""
    return data.IOIGenerator(tok if tok is not None else tokenizer())


def ioi_config(d_model: int = 64, n_heads: int = 4, n_layers: int = 4) -> Config:
    return Config(
        family="gpt2", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=VOCAB_SIZE, n_ctx=N_CTX, norm="layernorm", norm_eps=1e-5, positional="learned",
        act="gelu_new", tied_embeddings=True,
    )


def training_batch(gen: data.IOIGenerator, rng: np.random.Generator, n: int, aux_weight: float = 0.1):
    """(tokens [n, P + 1], weights [n, P]): prompts with the answer (IO) appended after END, and
    loss weights 1 on predicting the answer, `aux_weight` on every other real next token, 0 on
    padding."""
    b = gen.sample(rng, n, pad_to=int(gen.template_lengths.max()))
    tokens = np.concatenate([b.tokens, np.full((n, 1), gen.pad, np.int32)], 1)
    rows = np.arange(n)
    tokens[rows, b.end + 1] = b.answers[:, 0]
    idx = np.arange(tokens.shape[1] - 1)[None]
    weights = np.where(idx < b.end[:, None], aux_weight, 0.0).astype(np.float32)
    weights[rows, b.end] = 1.0
    return tokens, weights


def evaluate(params: dict, cfg: Config, n: int = 2000, seed: int = 1234, gen: data.IOIGenerator | None = None) -> dict:
    """On n fresh prompts (seed): mean logit difference IO - S at END, the fraction with IO over S,
    mean IO probability, and top-1 accuracy (IO is the argmax over the whole vocabulary)."""
    gen = gen or generator()
    b = gen.sample(np.random.default_rng(seed), n)
    logits, _ = jax.jit(lambda p, t: arch.forward(p, t, None, (), cfg=cfg))(params, jnp.asarray(b.tokens))
    lg = np.asarray(logits, np.float32)[np.arange(n), b.end]
    io, s = lg[np.arange(n), b.answers[:, 0]], lg[np.arange(n), b.answers[:, 1]]
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return {
        "logit_diff": float(np.mean(io - s)),
        "io_over_s": float(np.mean(io > s)),
        "io_prob": float(np.mean(p[np.arange(n), b.answers[:, 0]])),
        "top1_accuracy": float(np.mean(lg.argmax(-1) == b.answers[:, 0])),
        "n_prompts": n,
    }


def train(
    out_dir, *, seed: int = 0, steps: int | None = None, batch: int = 64, lr: float = 2e-3, d_model: int = 64,
    n_heads: int = 4, n_layers: int = 4, aux_weight: float = 0.1, log_every: int = 100, progress: bool = True,
) -> dict:
    """Train the model and write it to out_dir in HF format with its training.json and a loss-curve
    PNG. Returns the card (metrics, recipe, train_seconds, loss_history). The bundled model is the
    defaults, seed 0."""
    steps = 2500 if steps is None else steps
    cfg = ioi_config(d_model, n_heads, n_layers)
    tok = tokenizer()
    gen = generator(tok)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    run = loop.train(
        cfg, lambda rng: training_batch(gen, rng, batch, aux_weight), opt,
        steps=steps, seed=seed, log_every=log_every, progress=progress, desc="training ioi-4l",
    )
    metrics = evaluate(run.params, cfg, gen=gen)
    recipe = dict(seed=seed, steps=steps, batch=batch, lr=lr, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                  aux_weight=aux_weight, optimizer="adamw(wd=0.01), clip 1.0, warmup 5% + cosine to lr/20",
                  data="experiments.data.ioi: 15 BABA templates + ABBA swaps, 40 names, 8 places, 8 objects")
    out = Path(out_dir)
    hf_export.save_hf(run.params, cfg, out, tok)
    card = {"metrics": metrics, "recipe": recipe, "train_seconds": round(run.seconds, 1), "loss_history": run.history}
    (out / "training.json").write_text(json.dumps(card, indent=1))
    loop.plot_history(run.history, out / "training_curve.png", ylabel="weighted loss (answer + 0.1 x other tokens)",
                      title="ioi-4l training")
    return card
