"""induction-2l's dictionaries: per-layer transcoders trained on the organism's own data.

`transcoders/`: one ReLU transcoder per layer reading `blocks.{l}.mlp.hook_in` (the MLP's input)
and predicting `blocks.{l}.hook_mlp_out`, trained with `jinterp.saes.train.fit` (both layers
vmapped in one program) on activations streamed from this model on its training distribution
(`recipe.induction_batch`: BOS, 0..8 random words, a 4..20-word segment repeated; 49 tokens),
saved in circuit-tracer's per-layer transcoder format with metrics.json by `jinterp.saes.shipped`
(which trains, evaluates, saves and loads every organism's set from a SPEC like this one).

Retrain (writes DIR/transcoders; refuses a non-empty one):

    jinterp train-dictionaries induction-2l --out models/induction-2l/dictionaries
"""

from __future__ import annotations

import numpy as np

from jinterp.saes.shipped import TRANSCODERS, Spec


def _recipe():
    from jinterp.train import organisms

    return organisms.recipe("induction-2l")


def batches(batch: int):
    """rng -> [batch, 49] token rows from the organism's training distribution (recipe.train's defaults)."""
    r = _recipe()
    return lambda rng: r.induction_batch(rng, batch, 20, r.VOCAB_SIZE, 4, 8)


def held_out_tokens() -> np.ndarray:
    """The held-out rows metrics.json was computed on: [256, 49] from default_rng(12345)."""
    return batches(256)(np.random.default_rng(12345))


SPEC = Spec(
    organism="induction-2l",
    batches=batches,
    held_out=held_out_tokens,
    # the shipped run: seed 0 and these settings (activations normalised to |x| ~ sqrt(d_model) in training)
    settings=dict(TRANSCODERS, batch=64),
    held_out_info=dict(seed=12345, rows=256, generator="recipe.induction_batch(rng, rows, 20, VOCAB_SIZE, 4, 8)",
                       note="position 0 (BOS) is left out of every metric and never spliced"),
)
