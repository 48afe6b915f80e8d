"""kg-6l's dictionaries: per-layer transcoders trained on the organism's own knowledge-graph rows.

`transcoders/`: one ReLU transcoder per layer (6) reading `blocks.{l}.mlp.hook_in` (the MLP's
input) and predicting `blocks.{l}.hook_mlp_out`, trained with `jinterp.saes.train.fit` (all layers
vmapped in one program) on the training distribution (`kg.training_batch` with the recipe's mix:
facts, two-hop queries, context prompts, identity lines; each followed by its answer and EOS,
right-padded to 16 tokens). Batches carry an attention mask: padding is left out of training and
of every metric. Trained, evaluated and saved by `jinterp.saes.shipped`.

Retrain (writes DIR/transcoders; refuses a non-empty one):

    jinterp train-dictionaries kg-6l --out models/kg-6l/dictionaries
"""

from __future__ import annotations

from jinterp.saes.shipped import TRANSCODERS, Spec, weighted_rows


def rows(batch: int):
    """rng -> (tokens [batch, 16], loss weights on the answer and EOS): the recipe's training rows."""
    from experiments.data import kg
    from jinterp.train import organisms

    r = organisms.recipe("kg-6l")
    g, v = r.graph(), r.vocab()
    return lambda rng: kg.training_batch(g, v, rng, batch, r.N_CTX, r.MIX, r.CONTEXT_MIX)


batches, held_out = weighted_rows(rows, padded=True, answers_only=True, held_out_rows=512)

SPEC = Spec(
    organism="kg-6l",
    batches=batches,
    held_out=held_out,
    settings=dict(TRANSCODERS, batch=256),
    held_out_info=dict(seed=12345, rows=512, generator="kg.training_batch(graph, vocab, rng, rows, N_CTX, MIX, "
                       "CONTEXT_MIX), right-padded; mask from the last weighted prediction (the EOS)",
                       note="each row's BOS and its padding are left out of every metric and never spliced; the "
                       "CE numbers are on the answer and EOS predictions (the organism is trained on nothing else)"),
    eval_batch=128,
)
