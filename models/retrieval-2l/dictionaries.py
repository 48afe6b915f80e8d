"""retrieval-2l's dictionaries: per-layer transcoders trained on the organism's own long rows.

`transcoders/`: one ReLU transcoder per layer (2) reading `blocks.{l}.mlp.hook_in` (the MLP's
input) and predicting `blocks.{l}.hook_mlp_out`, trained with `jinterp.saes.train.fit` (both
layers vmapped in one program) on the distribution of the recipe's second training phase
(`recipe.batches(vocab, batch, 256, copy_frac=0.5)`: full-context 256-token rows, half needle rows
(filler with key-value needles, then queries and answers), half copying rows). Rows are full
length, so no mask. Trained, evaluated and saved by `jinterp.saes.shipped`.

Retrain (writes DIR/transcoders; refuses a non-empty one):

    jinterp train-dictionaries retrieval-2l --out models/retrieval-2l/dictionaries
"""

from __future__ import annotations

from jinterp.saes.shipped import TRANSCODERS, Spec, weighted_rows


def rows(batch: int):
    """rng -> (tokens [batch, 256], loss weights): the recipe's phase-2 mixture (every token is real)."""
    from jinterp.train import organisms

    r = organisms.recipe("retrieval-2l")
    return r.batches(r.vocab(), batch, r.N_CTX, 0.5)


# the CE numbers count the predictions the organism is trained on (needle answers, copying-row repeats)
batches, held_out = weighted_rows(rows, padded=False, answers_only=True, held_out_rows=64)

SPEC = Spec(
    organism="retrieval-2l",
    batches=batches,
    held_out=held_out,
    settings=dict(TRANSCODERS, batch=12),
    held_out_info=dict(seed=12345, rows=64, generator="recipe.batches(vocab, rows, 256, 0.5) (phase-2 mixture)",
                       note="position 0 (BOS) is left out of every metric and never spliced; the CE numbers are "
                       "on the predictions the organism is trained on (needle answers, copying-row repeats)"),
    eval_batch=16,
)
