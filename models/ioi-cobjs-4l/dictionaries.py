"""ioi-cobjs-4l's dictionaries: per-layer transcoders trained on the organism's own training rows.

`transcoders/`: one ReLU transcoder per layer (4) reading `blocks.{l}.mlp.hook_in` (the MLP's
input) and predicting `blocks.{l}.hook_mlp_out`, trained with `jinterp.saes.train.fit` (all layers
vmapped in one program) on the training distribution (`recipe.training_batch`: IOI prompts,
Colored-Objects prompts and the auxiliary induction rows in the recipe's shares, right-padded).
Rows have different lengths, so batches carry an attention mask and padding is left out of
training and of every metric. Trained, evaluated and saved (circuit-tracer format + metrics.json)
by `jinterp.saes.shipped`.

Retrain (writes DIR/transcoders; refuses a non-empty one):

    jinterp train-dictionaries ioi-cobjs-4l --out models/ioi-cobjs-4l/dictionaries
"""

from __future__ import annotations

from jinterp.saes.shipped import TRANSCODERS, Spec, weighted_rows


def rows(batch: int):
    """rng -> (tokens, loss weights): the recipe's IOI, Colored-Objects and induction rows."""
    from jinterp.train import organisms

    r = organisms.recipe("ioi-cobjs-4l")
    gens = r.generators()
    return lambda rng: r.training_batch(gens, rng, batch)


batches, held_out = weighted_rows(rows, padded=True, answers_only=False, held_out_rows=256)

SPEC = Spec(
    organism="ioi-cobjs-4l",
    batches=batches,
    held_out=held_out,
    settings=dict(TRANSCODERS, batch=128),
    held_out_info=dict(seed=12345, rows=256, generator="recipe.training_batch(recipe.generators(), rng, rows): "
                       "IOI, Colored Objects and induction rows, right-padded; mask from the last weighted prediction",
                       note="each row's BOS and its padding are left out of every metric and never spliced"),
)
