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

import numpy as np

from jinterp.saes.shipped import Spec


def batches(batch: int):
    """rng -> tokens [batch, 256] from the recipe's phase-2 mixture (weights dropped: every token is real)."""
    from jinterp.train import organisms

    r = organisms.recipe("retrieval-2l")
    draw = r.batches(r.vocab(), batch, r.N_CTX, 0.5)
    return lambda rng: draw(rng)[0]


def held_out():
    """The held-out rows metrics.json was computed on: 64 x 256 tokens from default_rng(12345), and the
    predictions the organism is trained on (needle answers, repeats in copying rows): the CE numbers'."""
    from jinterp.train import organisms

    r = organisms.recipe("retrieval-2l")
    tokens, weights = r.batches(r.vocab(), 64, r.N_CTX, 0.5)(np.random.default_rng(12345))
    return tokens, None, weights > 0


SPEC = Spec(
    organism="retrieval-2l",
    batches=batches,
    held_out=held_out,
    settings=dict(site="mlp.hook_in", transcoder_out="hook_mlp_out", architecture="relu", d_sae=256, l1=0.5,
                  steps=3000, lr=1e-3, batch=12, dead_window=200),
    held_out_info=dict(seed=12345, rows=64, generator="recipe.batches(vocab, rows, 256, 0.5) (phase-2 mixture)",
                       note="position 0 (BOS) is left out of every metric and never spliced; the CE numbers are "
                       "on the predictions the organism is trained on (needle answers, copying-row repeats)"),
    eval_batch=16,
)
