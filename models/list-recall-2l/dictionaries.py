"""list-recall-2l's dictionaries: per-layer transcoders trained on the organism's own list prompts.

`transcoders/`: one ReLU transcoder per layer (2) reading `blocks.{l}.mlp.hook_in` (the MLP's
input) and predicting `blocks.{l}.hook_mlp_out`, trained with `jinterp.saes.train.fit` (both
layers vmapped in one program) on the training distribution (`laundry.training_batch`: a list of
N_RANGE items, the list again with one item missing, the answer and EOS; right-padded to 24
tokens). Batches carry an attention mask: padding is left out of training and of every metric.
Trained, evaluated and saved by `jinterp.saes.shipped`.

Retrain (writes DIR/transcoders; refuses a non-empty one):

    jinterp train-dictionaries list-recall-2l --out models/list-recall-2l/dictionaries
"""

from __future__ import annotations

from jinterp.saes.shipped import TRANSCODERS, Spec, weighted_rows


def rows(batch: int):
    """rng -> (tokens [batch, 24], loss weights on the answer and EOS): the recipe's training rows."""
    from experiments.data import laundry
    from jinterp.train import organisms

    r = organisms.recipe("list-recall-2l")
    t, v = r.task(), r.vocab()
    return lambda rng: laundry.training_batch(t, v, rng, batch, r.N_CTX, r.N_RANGE)


batches, held_out = weighted_rows(rows, padded=True, answers_only=True, held_out_rows=256)

SPEC = Spec(
    organism="list-recall-2l",
    batches=batches,
    held_out=held_out,
    settings=dict(TRANSCODERS, batch=128),
    held_out_info=dict(seed=12345, rows=256, generator="laundry.training_batch(task, vocab, rng, rows, N_CTX, "
                       "N_RANGE), right-padded; mask from the last weighted prediction (the EOS)",
                       note="each row's BOS and its padding are left out of every metric and never spliced; the "
                       "CE numbers are on the answer and EOS predictions (the organism is trained on nothing else)"),
)
