"""The dictionaries shipped with the bundled organisms: models/NAME/dictionaries.py is a `Spec` (the
organism's training batches, its held-out rows, the fit settings); this module trains, evaluates,
saves and loads them, the same way for every organism.

    spec = shipped.spec("ioi-4l")          # models/ioi-4l/dictionaries.py's SPEC
    d = shipped.load("ioi-4l")             # models/ioi-4l/dictionaries/transcoders via jinterp.saes.load
    shipped.evaluate(spec, model, d)       # the held-out metrics metrics.json records
    shipped.train(spec, "out/")            # retrain into out/transcoders/ (`jinterp train-dictionaries`)

A saved set is circuit-tracer's per-layer transcoder files (config.yaml + layer_{l}.safetensors)
and metrics.json: the held-out metrics per layer (`jinterp.saes.evaluate.evaluate`), the held-out
rows, the training settings and time, and a short training history. Padded organisms give
(tokens, attention_mask) batches; `weighted_rows` builds them (and the held-out rows) from the
recipe's loss-weighted training rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

FIT_KEYS = ("site", "transcoder_out", "architecture", "d_sae", "l1", "dead_window")
# the settings every shipped set uses (a spec adds its batch): per-layer ReLU transcoders, MLP in -> out
TRANSCODERS = dict(site="mlp.hook_in", transcoder_out="hook_mlp_out", architecture="relu", d_sae=256, l1=0.5,
                   steps=3000, lr=1e-3, dead_window=200)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One organism's shipped dictionaries.

    organism: the name under models/. batches: batch size -> (rng -> tokens [B, P] or (tokens,
    attention_mask)), the training distribution. held_out: () -> the held-out rows (same forms, or
    (tokens, attention_mask, loss_mask [N, P-1]): the predictions the CE metrics count, for organisms
    trained on their answers alone).
    settings: `train.fit` keywords (FIT_KEYS) plus steps, lr and batch. held_out_info: what
    metrics.json says about the held-out rows (seed, rows, generator, note). check_rows: metrics.json
    also records the metrics of the first that many held-out rows (one evaluation batch), which a
    test recomputes cheaply and independently."""

    organism: str
    batches: Callable[[int], Callable[[np.random.Generator], Any]]
    held_out: Callable[[], Any]
    settings: dict
    held_out_info: dict
    name: str = "transcoders"
    eval_batch: int = 64
    check_rows: int = 64

    @property
    def folder(self) -> Path:
        """models/ORGANISM/dictionaries/NAME: where the shipped set lives."""
        from jinterp.train import organisms

        return organisms.models_dir() / self.organism / "dictionaries" / self.name


def right_padded(tokens, lengths):
    """(tokens, attention_mask [B, P]) for rows whose first lengths[i] tokens are real."""
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths)
    if lengths.shape != tokens.shape[:1] or (lengths < 1).any() or (lengths > tokens.shape[1]).any():
        raise ValueError(f"lengths must be [{tokens.shape[0]}] values in 1..{tokens.shape[1]}, got {lengths}")
    return tokens, np.arange(tokens.shape[1])[None] < lengths[:, None]


def real_lengths(weights) -> np.ndarray:
    """Row lengths of loss-weighted rows (tokens [B, P], weights [B, P-1] on the next-token losses,
    the organisms' training batches): a row's real tokens end with the target of its last weighted
    prediction (the answer, or the EOS after it)."""
    w = np.asarray(weights) != 0
    if not w.any(1).all():
        raise ValueError("a row has no weighted prediction, so its length is unknown")
    return w.shape[1] - np.argmax(w[:, ::-1], 1) + 1


def weighted_rows(rows, *, padded: bool, answers_only: bool, held_out_rows: int, seed: int = 12345):
    """(batches, held_out) for a Spec, from the organism's loss-weighted training rows: rows(batch) ->
    (rng -> (tokens [B, P], weights [B, P-1])). padded: rows end before P, so batches carry the
    attention mask `real_lengths` gives (tokens alone otherwise). answers_only: the held-out CE counts
    only the weighted predictions (an organism trained on its answers alone). The held-out rows are
    rows(held_out_rows) drawn from default_rng(seed)."""

    def shaped(batch):
        draw = rows(batch)

        def one(rng):
            tokens, weights = draw(rng)
            mask = right_padded(tokens, real_lengths(weights))[1] if padded else None
            return (tokens if mask is None else (tokens, mask)), np.asarray(weights) > 0

        return one

    def batches(batch):
        one = shaped(batch)
        return lambda rng: one(rng)[0]

    def held_out():
        x, loss = shaped(held_out_rows)(np.random.default_rng(seed))
        if not answers_only:
            return x
        return (*x, loss) if padded else (x, None, loss)

    return batches, held_out


def available() -> list[str]:
    """Organisms with a models/NAME/dictionaries.py."""
    from jinterp.train import organisms

    return sorted(p.parent.name for p in organisms.models_dir().glob("*/dictionaries.py"))


def spec(name: str) -> Spec:
    """models/NAME/dictionaries.py's SPEC. FileNotFoundError (naming those that exist) if there is none."""
    from jinterp.train import organisms

    path = organisms.models_dir() / name / "dictionaries.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; organisms with dictionaries: {available()}")
    mod_spec = importlib.util.spec_from_file_location(f"jinterp_dictionaries_{name.replace('-', '_')}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SPEC


def _spec(s) -> Spec:
    return spec(s) if isinstance(s, str) else s


def load_model(s):
    """The organism's model (models/NAME)."""
    import jinterp
    from jinterp.train import organisms

    return jinterp.load(str(organisms.models_dir() / _spec(s).organism))


def load(s, path=None):
    """The shipped dictionaries (stacked over layers) of a Spec or organism name, via `jinterp.saes.load`."""
    from jinterp import saes

    return saes.load(str(path or _spec(s).folder))


def held_out(s, rows: int | None = None):
    """(tokens, attention_mask or None, loss_mask or None): the held-out rows, or the first `rows`."""
    from jinterp.saes.batches import split

    h = _spec(s).held_out()
    loss = None
    if isinstance(h, tuple) and len(h) == 3:
        h, loss = h[:2], np.asarray(h[2], bool)
    toks, mask = split(h, "held-out set")
    if rows is not None:
        toks, mask, loss = toks[:rows], *(None if a is None else a[:rows] for a in (mask, loss))
    return toks, mask, loss


def evaluate(s, model, dictionary, rows: int | None = None) -> dict:
    """{layer: {l0, explained_variance, ce_clean, ce_zero_ablated, ce_spliced, ce_loss_recovered,
    dead_fraction}} on the held-out rows (or the first `rows`), BOS and padding left out, the CE on
    the spec's loss_mask predictions if it gives one."""
    from jinterp.saes.evaluate import evaluate as saes_evaluate

    s = _spec(s)
    toks, mask, loss = held_out(s, rows)
    return saes_evaluate(model, dictionary, toks, attention_mask=mask, loss_mask=loss, skip_bos=True,
                         batch_size=s.eval_batch)


def train(s, out_dir, *, seed: int = 0, steps: int | None = None, progress: bool = True) -> dict:
    """Train the dictionaries, evaluate them on the held-out rows and write out_dir/NAME/
    (circuit-tracer files + metrics.json; refuses a non-empty folder). Returns the metrics record."""
    from jinterp.saes import train as saes_train

    s = _spec(s)
    out = Path(out_dir) / s.name
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out (nothing was overwritten)")
    c = dict(s.settings)
    steps = c["steps"] if steps is None else steps
    model = load_model(s)
    t0 = time.time()
    run = saes_train.fit(model, s.batches(c["batch"]), steps=steps, seed=seed, lr=c["lr"],
                         log_every=max(steps // 20, 1), progress=progress, **{k: c[k] for k in FIT_KEYS if k in c})
    seconds = time.time() - t0
    run.save_circuit_tracer(out)
    record = {
        "name": s.name, "model": s.organism, "format": "circuit_tracer (per-layer transcoders)",
        "site": f"blocks.{{l}}.{c['site']}", "out_site": f"blocks.{{l}}.{c['transcoder_out']}",
        **_metrics(s, model, load(s, out), run.dead_fraction().tolist()),
        "train": {**s.settings, "steps": steps, "seed": seed, "batch_shape": list(run.config["batch_shape"]),
                  "optimizer": "adam, constant lr",
                  "scale_in": run.config["scale_in"], "scale_out": run.config["scale_out"],
                  "seconds": round(seconds, 1)},
        "history": {k: np.round(np.asarray(v), 4).tolist() for k, v in run.history.items()
                    if k in ("step", "explained_variance", "l0", "dead_fraction")},
        "retrain": f"jinterp train-dictionaries {s.organism} --out models/{s.organism}/dictionaries",
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    return record


def _metrics(s: Spec, model, d, dead_training) -> dict:
    """metrics.json's "metrics" (per layer, with the training dead fraction), "held_out" and
    "metrics_first_rows" (the check subset)."""
    metrics = evaluate(s, model, d)
    for i, l in enumerate(sorted(metrics)):
        metrics[l]["dead_fraction_training"] = dead_training[i]
    first = evaluate(s, model, d, rows=s.check_rows)
    return {"metrics": {str(l): m for l, m in metrics.items()}, "held_out": dict(s.held_out_info),
            "metrics_first_rows": {"rows": s.check_rows, "metrics": {str(l): m for l, m in first.items()}}}


def refresh_metrics(s, path=None) -> dict:
    """Re-evaluate a saved set on the spec's held-out rows and rewrite its metrics.json's metrics
    (training fields and history kept): for when the evaluation, not the dictionaries, changed."""
    s = _spec(s)
    folder = Path(path or s.folder)
    record = json.loads((folder / "metrics.json").read_text())
    dead = [record["metrics"][str(l)].get("dead_fraction_training") for l in sorted(map(int, record["metrics"]))]
    record.update(_metrics(s, load_model(s), load(s, folder), dead))
    (folder / "metrics.json").write_text(json.dumps(record, indent=1))
    return record


def metrics_table(record: dict) -> str:
    """The markdown table of a metrics.json record's held-out metrics (for the model cards)."""
    rows = ["| layer | L0 | explained variance | CE loss recovered | CE clean / spliced / zero-ablated | dead |",
            "|---|---|---|---|---|---|"]
    for l, m in sorted(record["metrics"].items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {l} | {m['l0']:.1f} | {m['explained_variance']:.3f} | {m['ce_loss_recovered']:.3f} | "
                    f"{m['ce_clean']:.3f} / {m['ce_spliced']:.3f} / {m['ce_zero_ablated']:.3f} | "
                    f"{m['dead_fraction']:.1%} |")
    return "\n".join(rows)
