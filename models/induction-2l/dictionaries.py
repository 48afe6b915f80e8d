"""induction-2l's dictionaries: per-layer transcoders trained on the organism's own data.

`transcoders/`: one ReLU transcoder per layer reading `blocks.{l}.mlp.hook_in` (the MLP's
input) and predicting `blocks.{l}.hook_mlp_out`, trained with `jinterp.saes.train.fit` (both
layers vmapped in one program) on activations streamed from this model on its training
distribution (`recipe.induction_batch`: BOS, 0..8 random words, a 4..20-word segment repeated;
49 tokens), and saved in circuit-tracer's per-layer transcoder format (config.yaml +
layer_{l}.safetensors), which `jinterp.saes.load` reads. metrics.json holds the held-out metrics
(`evaluate`, below), the training configuration and a short history.

Retrain (writes DIR/transcoders; refuses a non-empty one):

    jinterp train-dictionaries induction-2l --out models/induction-2l/dictionaries
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NAME = "transcoders"
# the shipped run: seed 0 and these settings (activations normalised to |x| ~ sqrt(d_model) in training)
TRANSCODERS = dict(site="mlp.hook_in", transcoder_out="hook_mlp_out", architecture="relu", d_sae=256,
                   l1=0.5, steps=3000, lr=1e-3, batch=64, dead_window=200)
HELD_OUT = dict(seed=12345, rows=256)  # held-out rows from the training distribution, another seed


def _recipe():
    from jinterp.train import organisms

    return organisms.recipe("induction-2l")


def batches(batch: int):
    """rng -> [batch, 49] token rows from the organism's training distribution (recipe.train's defaults)."""
    r = _recipe()
    return lambda rng: r.induction_batch(rng, batch, 20, r.VOCAB_SIZE, 4, 8)


def held_out_tokens() -> np.ndarray:
    """The held-out rows metrics.json was computed on: [256, 49] from default_rng(12345)."""
    return batches(HELD_OUT["rows"])(np.random.default_rng(HELD_OUT["seed"]))


def load_model():
    """The model beside this file."""
    import jinterp

    return jinterp.load(str(HERE))


def evaluate(model, dictionary) -> dict:
    """{layer: {l0, explained_variance, ce_clean, ce_zero_ablated, ce_spliced, ce_loss_recovered,
    dead_fraction}} on the held-out rows (`jinterp.saes.evaluate.evaluate`, BOS left out)."""
    from jinterp.saes.evaluate import evaluate as saes_evaluate

    return saes_evaluate(model, dictionary, held_out_tokens(), skip_bos=True, batch_size=64)


def train(out_dir, *, seed: int = 0, steps: int | None = None, progress: bool = True) -> dict:
    """Train the transcoders, evaluate them on the held-out rows and write out_dir/transcoders/
    (circuit-tracer files + metrics.json). Returns the metrics record."""
    from jinterp.saes import train as saes_train

    c = dict(TRANSCODERS)
    steps = c.pop("steps") if steps is None else steps
    c.pop("steps", None)
    batch, lr = c.pop("batch"), c.pop("lr")
    model = load_model()
    t0 = time.time()
    run = saes_train.fit(model, batches(batch), steps=steps, seed=seed, lr=lr,
                         log_every=max(steps // 20, 1), progress=progress, **c)
    seconds = time.time() - t0
    out = run.save_circuit_tracer(Path(out_dir) / NAME)
    metrics = evaluate(model, load_dictionary(out))
    for l in metrics:
        metrics[l]["dead_fraction_training"] = float(run.dead_fraction()[run.layers.index(l)])
    record = {
        "name": NAME, "model": "induction-2l", "format": "circuit_tracer (per-layer transcoders)",
        "site": f"blocks.{{l}}.{c['site']}", "out_site": f"blocks.{{l}}.{c['transcoder_out']}",
        "metrics": {str(l): m for l, m in metrics.items()},
        "held_out": {**HELD_OUT, "generator": "recipe.induction_batch(rng, rows, 20, VOCAB_SIZE, 4, 8)",
                     "note": "position 0 (BOS) is left out of every metric and never spliced"},
        "train": {**TRANSCODERS, "steps": steps, "seed": seed, "batch_shape": list(run.config["batch_shape"]),
                  "optimizer": "adam, constant lr",
                  "scale_in": run.config["scale_in"], "scale_out": run.config["scale_out"],
                  "seconds": round(seconds, 1)},
        "history": {k: np.round(np.asarray(v), 4).tolist() for k, v in run.history.items()
                    if k in ("step", "explained_variance", "l0", "dead_fraction")},
        "retrain": "jinterp train-dictionaries induction-2l --out models/induction-2l/dictionaries",
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    return record


def load_dictionary(path=None):
    """The shipped transcoders (stacked over layers 0, 1), through `jinterp.saes.load`."""
    from jinterp import saes

    return saes.load(str(path or HERE / "dictionaries" / NAME))
