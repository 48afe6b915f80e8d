"""ioi-4l's dictionaries: per-layer transcoders trained on the organism's own IOI prompts.

`transcoders/`: one ReLU transcoder per layer (4) reading `blocks.{l}.mlp.hook_in` (the MLP's
input) and predicting `blocks.{l}.hook_mlp_out`, trained with `jinterp.saes.train.fit` (all layers
vmapped in one program) on the training distribution (`recipe.training_batch`: BOS, an IOI prompt
from the 30 templates, the answer; right-padded to 23 tokens). Rows have different lengths, so
batches carry an attention mask and padding is left out of training and of every metric.
Trained, evaluated and saved (circuit-tracer format + metrics.json) by `jinterp.saes.shipped`.

Retrain (writes DIR/transcoders; refuses a non-empty one):

    jinterp train-dictionaries ioi-4l --out models/ioi-4l/dictionaries
"""

from __future__ import annotations

from jinterp.saes.shipped import TRANSCODERS, Spec, weighted_rows


def rows(batch: int):
    """rng -> (tokens [batch, 23], loss weights): IOI prompts with their answer (recipe.training_batch)."""
    from jinterp.train import organisms

    r = organisms.recipe("ioi-4l")
    gen = r.generator()
    return lambda rng: r.training_batch(gen, rng, batch)


batches, held_out = weighted_rows(rows, padded=True, answers_only=False, held_out_rows=256)

SPEC = Spec(
    organism="ioi-4l",
    batches=batches,
    held_out=held_out,
    settings=dict(TRANSCODERS, batch=128),
    held_out_info=dict(seed=12345, rows=256, generator="recipe.training_batch(recipe.generator(), rng, rows): "
                       "prompt + answer, right-padded; mask from the last weighted prediction",
                       note="each row's BOS and its padding are left out of every metric and never spliced"),
)
