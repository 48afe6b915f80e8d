"""ioi-cobjs-4l: one model for two tasks, IOI and Colored Objects, for `circuit-reuse`.

A 4-layer, 4-head GPT-2-architecture transformer trained from scratch on a mix of

- indirect-object identification (IOI; `experiments/data/ioi.py`, the paper's fifteen BABA
  templates and their ABBA swaps): "When Mary and John went to the store , John gave a drink to"
  -> "Mary";
- Colored Objects (`experiments/data/colored_objects.py`, CO_TEMPLATE, the paper's order with the
  colour before its object, the question ending at the object): "On the table , there is a red pen ,
  a blue cup , and a green book . What color is the cup" -> "blue";
- an auxiliary induction task (`induction_batch`: random words, then a segment of them repeated,
  loss on the repeats, weight 0.2), which builds the previous-token heads Colored Objects needs: without it the
  model stayed at chance on Colored Objects in seven runs (see the card's "Recipe search").

Both tasks pick one of the tokens in the context and must tell it from a distractor that is also
in the context; in both, the token that occurs twice (S in IOI, the queried object in Colored
Objects) decides which.

Retrain with `jinterp train-bundled ioi-cobjs-4l --out DIR`; load this file with
`jinterp.train.organisms.recipe("ioi-cobjs-4l")`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import colored_objects as co
from experiments.data import ioi
from jinterp import arch
from jinterp.config import Config
from jinterp.train import hf_export, loop

CO_SHARE = 0.25  # fraction of each batch that is Colored Objects
INDUCTION_SHARE = 0.25  # fraction that is the auxiliary induction task (the rest is IOI)
INDUCTION_WEIGHT = 0.2  # loss weight on each repeated word (at 1.0 the ~20 repeats a row outweighed the tasks)
CO_TEMPLATE = co.TEMPLATE_AT_END  # the Colored-Objects format the model is trained on (circuit-reuse reads it)
N_CTX = 32
STEPS = 2000


def _words(templates, slots):
    return [w for t in templates for w in re.findall(r"\w+|[^\w\s]", re.sub(slots, " ", t))]


WORDS = tuple(dict.fromkeys(
    _words(ioi.BABA_TEMPLATES, r"\[(A|B|PLACE|OBJECT)\]") + _words([co.TEMPLATE], r"\[(C1|C2|C3|O1|O2|O3|Q)\]")
    + list(ioi.NAMES) + list(ioi.PLACES) + list(ioi.OBJECTS) + co.COLORS + co.OBJECTS
))
VOCAB_SIZE = 2 + len(WORDS)  # id 0 <|endoftext|> (BOS/EOS/pad), 1 <unk>


def tokenizer():
    """Word-level tokenizer over WORDS; punctuation splits off words ("table," -> "table", ",")."""
    from tokenizers import pre_tokenizers

    tok = hf_export.word_tokenizer(WORDS)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def generators(tok=None):
    """(IOIGenerator, ColoredObjectsGenerator) over this model's vocabulary."""
    tok = tok if tok is not None else tokenizer()
    return ioi.IOIGenerator(tok), co.ColoredObjectsGenerator(tok, template=CO_TEMPLATE)


def config(d_model: int = 64, n_heads: int = 4, n_layers: int = 4) -> Config:
    return Config(
        family="gpt2", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=VOCAB_SIZE, n_ctx=N_CTX, norm="layernorm", norm_eps=1e-5, positional="learned",
        act="gelu_new", tied_embeddings=True,
    )


def induction_batch(rng: np.random.Generator, n: int, length: int, *, max_prefix: int = 4, seg: tuple = (3, 9),
                    weight: float = INDUCTION_WEIGHT):
    """(tokens [n, length + 1], weights [n, length]): BOS, r random words (r uniform in
    0..max_prefix), then a segment of s random words (s uniform in seg) repeated to the row's end;
    `weight` on predicting every repeated word, 0 elsewhere. Words are drawn uniformly from the
    whole vocabulary (ids 2..VOCAB_SIZE-1)."""
    toks = rng.integers(2, VOCAB_SIZE, (n, length + 1)).astype(np.int32)
    toks[:, 0] = 0
    w = np.zeros((n, length), np.float32)
    for r in range(n):
        pre = rng.integers(0, max_prefix + 1)
        s = rng.integers(seg[0], seg[1] + 1)
        pos = 1 + pre + s
        segment = toks[r, 1 + pre: pos].copy()
        while pos < length + 1:
            m = min(s, length + 1 - pos)
            toks[r, pos: pos + m] = segment[:m]
            w[r, pos - 1: pos - 1 + m] = weight
            pos += m
    return toks, w


def training_batch(gens, rng: np.random.Generator, n: int, co_share: float = CO_SHARE, aux_weight: float = 0.1,
                   induction_share: float = INDUCTION_SHARE, induction_weight: float = INDUCTION_WEIGHT):
    """(tokens [n, P + 1], weights [n, P]): IOI rows, Colored-Objects rows (a fraction co_share)
    and induction rows (induction_share; `induction_batch` with induction_weight), in that order. IOI and Colored Objects
    have the answer appended after END, loss weight 1 on the answer, aux_weight on every other real
    next token, 0 on padding."""
    gi, gc = gens
    if not (0 <= co_share and 0 <= induction_share and co_share + induction_share <= 1):
        raise ValueError(f"co_share and induction_share must be >= 0 with sum <= 1, got {co_share}, {induction_share}")
    P = max(int(gi.template_lengths.max()), gc.length)
    n_co, n_ind = int(round(n * co_share)), int(round(n * induction_share))
    n_main = n - n_ind
    bi = gi.sample(rng, n_main - n_co, pad_to=P)
    bc = gc.sample(rng, n_co, pad_to=P)
    toks = np.concatenate([bi.tokens, bc.tokens])
    end = np.concatenate([bi.end, bc.end])
    ans = np.concatenate([bi.answers[:, 0], bc.answers[:, 0]])
    tokens = np.concatenate([toks, np.full((n_main, 1), gi.pad, np.int32)], 1)
    rows = np.arange(n_main)
    tokens[rows, end + 1] = ans
    idx = np.arange(P)[None]
    weights = np.where(idx < end[:, None], aux_weight, 0.0).astype(np.float32)
    weights[rows, end] = 1.0
    if n_ind:
        ti, wi = induction_batch(rng, n_ind, P, weight=induction_weight)
        tokens, weights = np.concatenate([tokens, ti]), np.concatenate([weights, wi])
    return tokens, weights


def evaluate(params: dict, cfg: Config, n: int = 2000, seed: int = 1234, gens=None) -> dict:
    """On n fresh prompts of each task (seed): IOI mean logit difference IO - S, IO over S, top-1;
    Colored Objects multiple-choice accuracy (the right colour above the other two in the list),
    top-1 over the vocabulary, and mean logit difference clean colour - corrupted colour."""
    gi, gc = gens or generators()
    rng = np.random.default_rng(seed)
    fwd = jax.jit(lambda p, t: arch.forward(p, t, None, (), cfg=cfg)[0])
    bi, bc = gi.sample(rng, n), gc.sample(rng, n)
    r = np.arange(n)
    li = np.asarray(fwd(params, jnp.asarray(bi.tokens)), np.float32)[r, bi.end]
    lc = np.asarray(fwd(params, jnp.asarray(bc.tokens)), np.float32)[r, bc.end]
    ld_i = li[r, bi.answers[:, 0]] - li[r, bi.answers[:, 1]]
    ld_c = lc[r, bc.answers[:, 0]] - lc[r, bc.answers[:, 1]]
    return {
        "ioi_logit_diff": float(ld_i.mean()),
        "ioi_io_over_s": float((ld_i > 0).mean()),
        "ioi_top1": float((li.argmax(-1) == bi.answers[:, 0]).mean()),
        "co_accuracy": float(co.accuracy(lc, bc).mean()),
        "co_top1": float((lc.argmax(-1) == bc.answers[:, 0]).mean()),
        "co_logit_diff": float(ld_c.mean()),
        "n_prompts": n,
    }


def train(
    out_dir, *, seed: int = 0, steps: int | None = None, batch: int = 64, lr: float = 2e-3, co_share: float = CO_SHARE,
    induction_share: float = INDUCTION_SHARE, induction_weight: float = INDUCTION_WEIGHT, d_model: int = 64,
    n_heads: int = 4, n_layers: int = 4, aux_weight: float = 0.1, log_every: int = 100, progress: bool = True,
) -> dict:
    """Train and write the model to out_dir in HF format with training.json and a loss-curve PNG.
    The bundled model is the defaults, seed 0."""
    steps = STEPS if steps is None else steps
    cfg = config(d_model, n_heads, n_layers)
    tok = tokenizer()
    gens = generators(tok)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    run = loop.train(cfg, lambda rng: training_batch(gens, rng, batch, co_share, aux_weight, induction_share, induction_weight),
                     opt, steps=steps, seed=seed, log_every=log_every, progress=progress, desc="training ioi-cobjs-4l")
    metrics = evaluate(run.params, cfg, gens=gens)
    recipe = dict(seed=seed, steps=steps, batch=batch, lr=lr, co_share=co_share, induction_share=induction_share,
                  induction_weight=induction_weight, co_template=CO_TEMPLATE, d_model=d_model, n_heads=n_heads,
                  n_layers=n_layers, aux_weight=aux_weight, optimizer="adamw(wd=0.01), clip 1.0, warmup 5% + cosine to lr/20",
                  data="experiments.data.ioi (15 BABA templates + ABBA swaps) and experiments.data.colored_objects "
                       "(3 items; 10 colours, 15 objects) and induction_batch (BOS, 0..4 random words, a segment of 3..9 "
                       "random words repeated; loss weight induction_weight on the repeats)")
    out = Path(out_dir)
    hf_export.save_hf(run.params, cfg, out, tok)
    card = {"metrics": metrics, "recipe": recipe, "train_seconds": round(run.seconds, 1), "loss_history": run.history}
    (out / "training.json").write_text(json.dumps(card, indent=1))
    loop.plot_history(run.history, out / "training_curve.png", ylabel="weighted loss (answers, repeats; 0.1 x other tokens)",
                      title="ioi-cobjs-4l training")
    return card
