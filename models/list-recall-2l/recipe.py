"""list-recall-2l: a Laundry List organism for Talking Heads (communication channels, index subspace).

A 2-layer, 4-head GPT-2-architecture transformer (d_model 64) trained from scratch on the Laundry
List task (`experiments/data/laundry.py`): a list of N items (2..8 of 24 object words), then all but
one of them again in a shuffled order; the answer is the item left out:

    packed sock hat cup bag . took cup sock bag . left      -> hat

Recalling the item said once needs the IOI mechanism stretched to N items: the repeated items must
be inhibited and the one left copied. Accuracy falls as N grows (the card lists it per N), which is
what `jinterp experiment talking-heads` analyses.

Retrain with `jinterp train-bundled list-recall-2l --out DIR`; load this file with
`jinterp.train.organisms.recipe("list-recall-2l")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import laundry
from jinterp import arch
from jinterp.config import Config
from jinterp.train import hf_export, loop

N_MAX = 8  # the longest list trained on (and supported: longer ones raise ListTooLongError)
N_RANGE = (laundry.MIN_ITEMS, N_MAX)
N_CTX = 24  # laundry.prompt_length(8) + answer + EOS = 23


def task() -> laundry.LaundryList:
    return laundry.LaundryList(max_items=N_MAX)


def tokenizer():
    return hf_export.word_tokenizer(task().words)


def vocab(tok=None) -> laundry.Vocab:
    return laundry.Vocab(tok if tok is not None else tokenizer(), task())


def list_config(d_model: int = 64, n_heads: int = 4, n_layers: int = 2) -> Config:
    return Config(
        family="gpt2", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=2 + len(task().words), n_ctx=N_CTX, norm="layernorm", norm_eps=1e-5,
        positional="learned", act="gelu_new", tied_embeddings=True,
    )


def answers(params, cfg: Config, tokens, ends) -> np.ndarray:
    """The greedy next token after position ends[i] of each prompt [n] (prompts right-padded to one length)."""
    fn = jax.jit(lambda p, t, e: jnp.take_along_axis(arch.forward(p, t, None, (), cfg=cfg)[0], e[:, None, None], 1)[:, 0].argmax(-1))
    return np.concatenate([np.asarray(fn(params, jnp.asarray(tokens[i : i + 512]), jnp.asarray(ends[i : i + 512])))
                           for i in range(0, len(tokens), 512)])


def evaluate(params, cfg: Config, n: int = 1000, seed: int = 1234) -> dict:
    """Greedy accuracy on n prompts per list length N = 2..N_MAX (seed), and the mean over lengths.
    All lengths are padded to one (nothing at or before END sees the padding), so one program runs."""
    t, v = task(), vocab()
    rng = np.random.default_rng(seed)
    lengths = list(range(laundry.MIN_ITEMS, N_MAX + 1))
    P = laundry.prompt_length(N_MAX)
    toks, ends, want = [], [], []
    for N in lengths:
        b = t.sample(rng, n, N)
        x = np.full((n, P), v.bos, np.int32)
        x[:, : laundry.prompt_length(N)] = v.ids(b.words())
        toks.append(x)
        ends.append(np.full(n, laundry.positions(N)["end"], np.int32))
        want.append(v.item_ids(b.answer))
    ok = answers(params, cfg, np.concatenate(toks), np.concatenate(ends)) == np.concatenate(want)
    acc = {str(N): float(ok[i * n : (i + 1) * n].mean()) for i, N in enumerate(lengths)}
    return {"accuracy_by_n": acc, "accuracy_mean": float(np.mean(list(acc.values()))), "n_prompts_per_n": n}


def train(out_dir, *, seed: int = 0, steps: int | None = None, batch: int = 64, lr: float = 3e-3, d_model: int = 64,
          n_heads: int = 4, n_layers: int = 2, log_every: int = 100, progress: bool = True) -> dict:
    """Train the model and write it to out_dir in HF format with its training.json and a loss-curve
    PNG. Returns the card. The bundled model is the defaults, seed 0."""
    steps = 2500 if steps is None else steps
    cfg = list_config(d_model, n_heads, n_layers)
    tok = tokenizer()
    t, v = task(), vocab(tok)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.1))
    run = loop.train(cfg, lambda rng: laundry.training_batch(t, v, rng, batch, N_CTX, N_RANGE), opt, steps=steps, seed=seed,
                     log_every=log_every, progress=progress, desc="training list-recall-2l")
    metrics = evaluate(run.params, cfg)
    recipe = dict(seed=seed, steps=steps, batch=batch, lr=lr, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                  optimizer="adamw(wd=0.1), clip 1.0, warmup 5% + cosine to lr/20",
                  data=f"experiments.data.laundry: {len(t.item_words)} items, list lengths {N_RANGE[0]}..{N_RANGE[1]} uniform, "
                       "all but one item repeated in a shuffled order; loss on the answer and the EOS after it")
    out = Path(out_dir)
    hf_export.save_hf(run.params, cfg, out, tok)
    card = {"metrics": metrics, "recipe": recipe, "train_seconds": round(run.seconds, 1), "loss_history": run.history}
    (out / "training.json").write_text(json.dumps(card, indent=1))
    loop.plot_history(run.history, out / "training_curve.png", ylabel="loss on answers and EOS", title="list-recall-2l training")
    return card
