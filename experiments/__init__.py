"""Paper reproductions, each a short module written against jinterp's public API.

An experiment module defines

    NAME        the command-line name ("ioi")
    TITLE       the paper, as the report's title
    ORGANISM    the bundled model it runs on by default
    run(model, report, *, batch, seed, quick) -> None   fills an experiments.report.Report

and its docstring is a short tutorial: the paper's question, the steps, and what to read in the
report. Shared pieces live in one place: dataset generators in experiments/data/, the report
writer in experiments/report.py.

    jinterp experiment list
    jinterp experiment ioi --out out/ioi [--model DIR] [--batch N] [--seed S] [--quick] [--overwrite]
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from pathlib import Path
from types import ModuleType

from experiments.report import OutputExists, Report, claims_markdown, count_compiles

# name -> module; a new experiment is one module plus a line here
EXPERIMENTS = {
    "attribution-graph": "experiments.attribution_graph",
    "circuit-reuse": "experiments.circuit_reuse",
    "hopping-too-late": "experiments.hopping_too_late",
    "induction": "experiments.induction",
    "ioi": "experiments.ioi",
    "ph3": "experiments.ph3",
    "retrieval-heads": "experiments.retrieval_heads",
    "subspace-illusion": "experiments.subspace_illusion",
    "talking-heads": "experiments.talking_heads",
}


class UnknownExperiment(KeyError):
    def __str__(self):
        return str(self.args[0])


def available() -> list[str]:
    """Names of the experiments whose module is present."""
    return [n for n, mod in EXPERIMENTS.items() if importlib.util.find_spec(mod) is not None]


def get(name: str) -> ModuleType:
    """The experiment's module; UnknownExperiment (listing the available ones) for any other name."""
    if name not in EXPERIMENTS or name not in available():
        raise UnknownExperiment(f"unknown experiment {name!r}; available: {', '.join(available())}")
    return importlib.import_module(EXPERIMENTS[name])


def run(name: str, out, *, model=None, batch: int | None = None, seed: int = 0, quick: bool = False,
        overwrite: bool = False, mesh="auto") -> Path:
    """Run experiment `name` on `model` (a bundled name, an HF-format directory or a hub id; default
    the experiment's own organism) and write its report to `out`. Returns the output directory.

    An existing non-empty `out` is refused (OutputExists) unless overwrite=True. Everything is
    written to a staging directory first: a run that raises (or is interrupted with Ctrl-C) leaves
    neither a half-written report nor the staging directory. report.json's "run" section holds
    what varies between identical runs: wall time and the number of XLA programs compiled.

    Several hosts: call jinterp.distributed.initialize() first and run the same call in every
    process. mesh="auto" then splits every sweep's cells over every device of every process
    (distributed.split_sweeps; the rest of the experiment runs in each process), and process 0
    alone writes the report. mesh=None runs every sweep on this process's first device; a Mesh
    splits the sweeps over it.
    """
    import contextlib

    import jax

    import jinterp
    from jinterp import distributed

    exp = get(name)
    source = model or exp.ORGANISM
    config = dict(experiment=name, model=str(source), batch=batch, seed=seed, quick=quick)
    report = Report(out, name, config=config, overwrite=overwrite)  # refuses an existing output first
    try:
        t0 = time.perf_counter()
        m = jinterp.load(source)
        report.meta["load_seconds"] = round(time.perf_counter() - t0, 2)
        if isinstance(mesh, str) and mesh == "auto":
            mesh = distributed.device_mesh() if jax.process_count() > 1 else None
        split = contextlib.nullcontext() if mesh is None else distributed.split_sweeps(mesh)
        with count_compiles() as compiles, split:
            exp.run(m, report, batch=batch, seed=seed, quick=quick)
        report.meta["sweep_devices"] = 1 if mesh is None else int(mesh.devices.size)
        report.meta["processes"] = jax.process_count()
        report.meta["wall_seconds"] = round(compiles.wall_seconds, 2)
        report.meta.update(compiles.summary())
        return report.finish(exp.TITLE, (exp.__doc__ or "").strip().split("\n\n")[0])
    except BaseException:
        report.abandon()
        raise


__all__ = ["EXPERIMENTS", "OutputExists", "Report", "UnknownExperiment", "available", "claims_markdown", "count_compiles", "get",
           "run"]
