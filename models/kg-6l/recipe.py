"""kg-6l: a knowledge-graph organism for Hopping Too Late and PH3 (memory vs context heads).

A 6-layer, 8-head GPT-2-architecture transformer (d_model 64) trained from scratch on a synthetic
knowledge graph (`experiments/data/kg.py`): 30 made-up entities, 12 relations ("the mother of bavo is
kelu"), of whose 360 facts 85% are stated in training. It learns

- single-hop facts (memorised): "the boss of bavo is" -> "kelu";
- two-hop queries on 90% of the (e1, r1, r2) triples whose hops are both known: "the friend of the
  boss of bavo is" -> the friend of kelu. The rest (292 queries) is held out: composing two memorised
  facts it never saw composed works only partly (36%), so `hopping-too-late` has correct and
  incorrect cases;
- context prompts: "the boss of bavo is lumi . the boss of bavo is" -> "lumi" when the pair was
  never stated (read the context), the memorised answer when the context agrees or is about another
  pair. Conflict prompts (context about a known pair, naming another object) are never trained:
  there some heads pull toward memory and some toward context, which `ph3` ranks and prunes;
- identity lines "bavo = bavo , kelu = kelu , x =" -> x, the target prompt of Patchscopes.

Retrain with `jinterp train-bundled kg-6l --out DIR`; load this file with
`jinterp.train.organisms.recipe("kg-6l")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import kg
from jinterp import arch
from jinterp.config import Config
from jinterp.train import hf_export, loop

N_CTX = 16
MIX = (0.25, 0.5, 0.2, 0.05)  # facts, trained two-hop queries, context prompts, identity lines
CONTEXT_MIX = (0.5, 0.25, 0.25)  # context prompts: unknown pair, agreeing, distractor
GRAPH_SEED = 0  # the graph is part of the organism: its facts are what the model memorised


def graph() -> kg.Graph:
    return kg.Graph.make(seed=GRAPH_SEED)


def tokenizer():
    return hf_export.word_tokenizer(graph().words)


def vocab(tok=None) -> kg.Vocab:
    g = graph()
    return kg.Vocab(tok if tok is not None else tokenizer(), g.words)


def kg_config(d_model: int = 64, n_heads: int = 8, n_layers: int = 6) -> Config:
    return Config(
        family="gpt2", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=2 + len(graph().words), n_ctx=N_CTX, norm="layernorm", norm_eps=1e-5,
        positional="learned", act="gelu_new", tied_embeddings=True,
    )


def answers(params, cfg: Config, tokens) -> np.ndarray:
    """The greedy next token after each prompt [n] (all prompts the same length, no padding)."""
    fn = jax.jit(lambda p, t: arch.forward(p, t, None, (), cfg=cfg)[0][:, -1].argmax(-1))
    return np.concatenate([np.asarray(fn(params, jnp.asarray(tokens[i : i + 512]))) for i in range(0, len(tokens), 512)])


def evaluate(params, cfg: Config, n: int = 1000, seed: int = 1234) -> dict:
    """Greedy accuracy on n prompts of each kind (seed): known single-hop facts, trained and held-out
    two-hop queries, context reading on unknown pairs, memory under a distractor context, identity
    lines; on conflict prompts, the fraction answering the memorised object and the context's."""
    g, v = graph(), vocab()
    rng = np.random.default_rng(seed)
    N = g.table.shape[1]
    known, unknown = np.argwhere(g.known), np.argwhere(~g.known)
    k = known[rng.integers(len(known), size=n)]
    u = unknown[rng.integers(len(unknown), size=n)]
    tr, ho = np.argwhere(g.train_two_hop), g.held_out_two_hop()
    tr, ho = tr[rng.integers(len(tr), size=n)], ho[rng.integers(len(ho), size=n)]
    ent = lambda idx: v.entity_ids(g, idx)
    acc = lambda words, want: float(np.mean(answers(params, cfg, v.ids(words)) == ent(want)))
    ctx_obj = rng.integers(N, size=n)
    other = (k[:, 1] + rng.integers(1, N, size=n)) % N
    conflict_obj = (g.table[k[:, 0], k[:, 1]] + rng.integers(1, N, size=n)) % N
    conflict = answers(params, cfg, v.ids([g.context_words(r, e, c, r, e) for (r, e), c in zip(k, conflict_obj)]))
    triples = lambda t: [g.two_hop_words(*x) for x in t]
    x = rng.choice(N, (n, 3))
    x = x[(x[:, 0] != x[:, 1]) & (x[:, 1] != x[:, 2]) & (x[:, 0] != x[:, 2])]
    return {
        "single_hop": acc([g.hop_words(r, e) for r, e in k], g.table[k[:, 0], k[:, 1]]),
        "two_hop_trained": acc(triples(tr), g.two_hop_answer(*tr.T)),
        "two_hop_held_out": acc(triples(ho), g.two_hop_answer(*ho.T)),
        "context_unknown_pair": acc([g.context_words(r, e, c, r, e) for (r, e), c in zip(u, ctx_obj)], ctx_obj),
        "memory_with_distractor": acc([g.context_words(r, o, c, r, e) for (r, e), o, c in zip(k, other, ctx_obj)],
                                      g.table[k[:, 0], k[:, 1]]),
        "identity": acc([g.identity_words(*row) for row in x], x[:, 2]),
        "conflict_memory_rate": float(np.mean(conflict == ent(g.table[k[:, 0], k[:, 1]]))),
        "conflict_context_rate": float(np.mean(conflict == ent(conflict_obj))),
        "n_prompts": n,
    }


def train(out_dir, *, seed: int = 0, steps: int | None = None, batch: int = 128, lr: float = 3e-3, d_model: int = 64,
          n_heads: int = 8, n_layers: int = 6, log_every: int = 100, progress: bool = True) -> dict:
    """Train the model and write it to out_dir in HF format with its training.json and a loss-curve
    PNG. Returns the card. The bundled model is the defaults, seed 0."""
    steps = 5000 if steps is None else steps
    cfg = kg_config(d_model, n_heads, n_layers)
    tok = tokenizer()
    g, v = graph(), vocab(tok)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.3))
    run = loop.train(cfg, lambda rng: kg.training_batch(g, v, rng, batch, N_CTX, MIX, CONTEXT_MIX), opt, steps=steps, seed=seed,
                     log_every=log_every, progress=progress, desc="training kg-6l")
    metrics = evaluate(run.params, cfg)
    recipe = dict(seed=seed, steps=steps, batch=batch, lr=lr, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                  optimizer="adamw(wd=0.3), clip 1.0, warmup 5% + cosine to lr/20", graph_seed=GRAPH_SEED,
                  data=f"experiments.data.kg: 30 entities, 12 relations, 85% of facts stated, 90% of two-hop triples "
                       f"trained; mix {MIX} (facts, two-hop, context, identity), context {CONTEXT_MIX} (unknown pair, "
                       "agreeing, distractor)")
    out = Path(out_dir)
    hf_export.save_hf(run.params, cfg, out, tok)
    card = {"metrics": metrics, "recipe": recipe, "train_seconds": round(run.seconds, 1), "loss_history": run.history}
    (out / "training.json").write_text(json.dumps(card, indent=1))
    loop.plot_history(run.history, out / "training_curve.png", ylabel="loss on answers and EOS", title="kg-6l training")
    return card
