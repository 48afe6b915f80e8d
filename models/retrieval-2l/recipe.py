"""retrieval-2l: a 2-layer GPT-2-architecture transformer that finds a needle in a haystack.

The task (experiments/data/needles.py): a context of random filler words holds one or more needles
`KEY V1 .. Vn .` (keys, values and filler are disjoint word pools); after the context, `? KEY` asks for
one of them and the model must reproduce `V1 .. Vn .`. The answer tokens can only come from the
needle, so the model learns to copy them from there: heads whose current query attends to the value
it is about to emit (retrieval heads; Wu et al. 2024), built like induction heads (a previous-token
head in layer 0, a copying head in layer 1).

Model: GPT-2 architecture, 2 layers x 4 heads, d_model 64, learned positions (started at scaled
sinusoids), n_ctx 256, tied embeddings, a 247-word vocabulary. Training rows hold 1-4 needles of 2-4
values each at uniformly random depths, then a query for each, answered; the loss is on the answer
tokens only. Half the rows are copying practice (a run of filler words repeated; loss on the
repeats), which forms the copying circuit much faster than the sparse answers alone. Two phases
fit a few CPU minutes: 64-token rows, then 256-token rows (the later positions and long-range search).
Evaluation contexts are at most 256 tokens (prompt + answer).

Retrain with `jinterp train-bundled retrieval-2l --out DIR`; load this file with
`jinterp.train.organisms.recipe("retrieval-2l")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optax

from experiments.data import needles
from jinterp.config import Config
from jinterp.train import hf_export, loop

WORDS = (".", "?") + needles.FILLER + needles.KEYS + needles.VALUES  # ids 2.. (0 = BOS/EOS/pad, 1 = <unk>)
VOCAB_SIZE = 2 + len(WORDS)
N_CTX = 256


def tokenizer():
    """The word-level tokenizer over WORDS (id 0 = <|endoftext|>: BOS, EOS and padding; 1 = <unk>)."""
    return hf_export.word_tokenizer(WORDS)


def vocab(tok=None) -> needles.Vocab:
    """The task's token ids under this model's tokenizer (needle `KEY VALUES .`, query `? KEY`)."""
    return needles.Vocab.from_tokenizer(tok or tokenizer())


def config(d_model: int = 64, n_heads: int = 4, n_layers: int = 2) -> Config:
    return Config(
        family="gpt2", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=VOCAB_SIZE, n_ctx=N_CTX, norm="layernorm", norm_eps=1e-5, positional="learned",
        act="gelu_new", tied_embeddings=True,
    )


def induction_rows(rng: np.random.Generator, v: needles.Vocab, batch: int, seq_len: int, seg=(5, 24)):
    """Copying practice: BOS then a random run of filler words repeated to the end of the row; the loss
    is on the repeats ([batch, seq_len], weights [batch, seq_len - 1]). Dense signal for the
    previous-token + copying heads that the sparse needle answers alone form slowly."""
    toks = np.empty((batch, seq_len), np.int32)
    w = np.zeros((batch, seq_len - 1), np.float32)
    toks[:, 0] = v.bos
    for r in range(batch):
        n = int(rng.integers(seg[0], seg[1] + 1))
        toks[r, 1:] = np.resize(rng.choice(v.filler, n), seq_len - 1)
        w[r, n:] = 1.0  # predicting token t >= n + 1 (a repeat)
    return toks, w


def batches(v: needles.Vocab, batch: int, seq_len: int, copy_frac: float = 0.25):
    """The training mixture: needle rows (loss on the answers) and a fraction of copying rows."""
    n_copy = int(round(batch * copy_frac))

    def draw(rng):
        t1, w1 = needles.training_batch(rng, v, batch - n_copy, seq_len)
        if not n_copy:
            return t1, w1
        t2, w2 = induction_rows(rng, v, n_copy, seq_len)
        return np.concatenate([t1, t2]), np.concatenate([w1, w2])

    return draw


def evaluate(model, *, lengths=(32, 64, 128, 192, 248), depths=(0.0, 0.25, 0.5, 0.75, 1.0), n_per_cell: int = 8,
             n_values: int = 3, seed: int = 1234) -> dict:
    """Needle accuracy of a jinterp Model on fresh prompts (greedy decoding, one batched call):
    exact match of the answer (values then '.') and the mean ROUGE-1 recall of the values."""
    import jinterp.detect  # noqa: F401  (keeps the import light for the training path)

    v = vocab(model.tokenizer)
    data = needles.grid(v, lengths, depths, n_per_cell, n_values=n_values, seed=seed)
    gen = generate(model, data.prompts, n_values + 1)
    exact = np.array([np.array_equal(g, a) for g, a in zip(gen, data.answers)])
    rec = np.array([needles.recall(g, a, v.stop) for g, a in zip(gen, data.answers)])
    by_len = {int(n): float(exact[data.length == n].mean()) for n in lengths}
    return {"needle_exact": float(exact.mean()), "needle_recall": float(rec.mean()), "exact_by_length": by_len,
            "n_prompts": len(data), "n_values": n_values}


def generate(model, prompts, n_new: int, edits=()) -> np.ndarray:
    """Greedy continuations [N, n_new] of ragged prompts, left-padded into one batch."""
    toks, mask = needles.left_pad(prompts, model.tokenizer.pad_token_id or 0)
    P = toks.shape[1]
    out = model.generate(toks, n_new, attention_mask=mask, edits=edits, stop_at_eos=False)
    return np.asarray(out)[:, P:]


def sinusoidal_init(cfg: Config, seed: int, scale: float = 0.03) -> dict:
    """`loop.init_params`, with W_pos started at sinusoidal position codes (Vaswani et al. 2017) scaled
    to about the norm of a token embedding. Still learned; the structure lets a previous-token head
    form in a few hundred steps and carries it to positions the short training rows never reach."""
    import jax

    params = loop.init_params(cfg, jax.random.PRNGKey(seed))
    pos = np.arange(cfg.n_ctx)[:, None]
    freq = 1.0 / (10000 ** (np.arange(0, cfg.d_model, 2) / cfg.d_model))
    table = np.zeros((cfg.n_ctx, cfg.d_model), np.float32)
    table[:, 0::2], table[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
    params["pos_embed"]["W_pos"] = np.asarray(scale * table, np.float32)
    return params


def _optimizer(steps: int, lr: float):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=lr / 20)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))


def train(out_dir, *, seed: int = 0, steps: int | None = None, long_steps: int | None = None, batch: int = 32,
          short_len: int = 64, long_batch: int = 8, lr: float = 3e-3, long_lr: float = 1e-3, copy_frac: float = 0.5, d_model: int = 64,
          n_heads: int = 4, n_layers: int = 2, log_every: int = 50, progress: bool = True) -> dict:
    """Train the model and write it to out_dir in HF format with its training.json. Returns the card
    (metrics, recipe, train_seconds, loss_history). The bundled model is the defaults, seed 0.

    Two phases, to fit a few CPU minutes: `steps` on short rows (`short_len` tokens, `batch` rows),
    where the copying circuit forms quickly, then `long_steps` on rows of the full context (N_CTX
    tokens, `long_batch` rows), which teach the later learned positions and the long-range search.
    Both phases draw `copy_frac` of their rows from `induction_rows` and the rest from the needle task.
    """
    import jinterp

    steps = 2500 if steps is None else steps
    long_steps = max(1, steps * 3 // 5) if long_steps is None else long_steps
    cfg = config(d_model, n_heads, n_layers)
    tok = tokenizer()
    v = vocab(tok)
    run1 = loop.train(cfg, batches(v, batch, short_len, copy_frac), _optimizer(steps, lr), steps=steps, seed=seed,
                      params=sinusoidal_init(cfg, seed),
                      log_every=log_every, progress=progress, desc=f"retrieval-2l, {short_len}-token rows")
    trainable = loop._prune(run1.params, lambda name: name == "b_U" or (cfg.tied_embeddings and name == "W_U"))
    run2 = loop.train(cfg, batches(v, long_batch, N_CTX, copy_frac), _optimizer(long_steps, long_lr), steps=long_steps,
                      seed=seed + 1, params=trainable, log_every=log_every, progress=progress,
                      desc=f"retrieval-2l, {N_CTX}-token rows")
    hf_export.save_hf(run2.params, cfg, out_dir, tok)
    model = jinterp.load(str(out_dir))
    metrics = evaluate(model)
    recipe = dict(seed=seed, phase1=dict(steps=steps, batch=batch, seq_len=short_len),
                  phase2=dict(steps=long_steps, batch=long_batch, seq_len=N_CTX, lr=long_lr), copy_frac=copy_frac,
                  needles="1..4 per row, 2..4 values each, all queried", lr=lr, d_model=d_model, n_heads=n_heads,
                  n_layers=n_layers, optimizer="adamw(wd=0.01), clip 1.0, warmup 5% + cosine to lr/20 (per phase)",
                  loss="answer tokens (needle rows) and repeats (copying rows) only")
    history = run1.history + [(steps + s, l) for s, l in run2.history]
    card = {"metrics": metrics, "recipe": recipe, "train_seconds": round(run1.seconds + run2.seconds, 1),
            "loss_history": history, "phase_boundary": steps}
    (Path(out_dir) / "training.json").write_text(json.dumps(card, indent=1))
    plot_curve(card, Path(out_dir) / "training_curve.png")
    return card


def plot_curve(card: dict, path) -> None:
    """The weighted training loss by step (the phase boundary dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, l = zip(*card["loss_history"])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(s, l, marker=".")
    ax.axvline(card["phase_boundary"], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss on answers / repeats")
    ax.set_title(f"retrieval-2l (needle exact {card['metrics']['needle_exact']:.2f})")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
