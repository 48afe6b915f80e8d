"""The `jinterp` command: parses arguments and calls the library."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="jinterp: a compiled mechanistic-interpretability engine in JAX.", no_args_is_help=True)


@app.command()
def demo(
    model: str = typer.Option("induction-2l", help="bundled model name or HF-format directory"),
    out: Path = typer.Option(Path("out/demo"), help="where figures, tables and raw arrays go"),
    seed: int = typer.Option(0, help="seed for the evaluation batch"),
):
    """Load the bundled induction model, run it on its task, and show the heads that implement it."""
    from jinterp import demo as walkthrough

    walkthrough.run(model, out, seed, echo=typer.echo)


@app.command()
def info(source: str):
    """Print a model's structure and its activation sites."""
    import jinterp

    typer.echo(jinterp.load(source).summary())


@app.command("train-bundled")
def train_bundled(
    name: str = typer.Argument(..., help="organism: a directory under models/ with a recipe.py (e.g. induction-2l)"),
    out: Path = typer.Option(..., help="output directory (HF format); models/NAME replaces the bundled model"),
    seed: int = typer.Option(0, help="seed for initialisation and data"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: the recipe's)"),
):
    """Retrain a bundled model organism from scratch with its recipe (models/NAME/recipe.py)."""
    from jinterp.train import organisms

    card = organisms.recipe(name).train(out, seed=seed, steps=steps)
    typer.echo(json.dumps(card["metrics"], indent=1))


@app.command("train-dictionaries")
def train_dictionaries(
    name: str = typer.Argument(..., help="organism with a models/NAME/dictionaries.py (e.g. induction-2l)"),
    out: Path = typer.Option(..., help="output directory; models/NAME/dictionaries replaces the shipped ones"),
    seed: int = typer.Option(0, help="seed for initialisation and data"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: the recipe's)"),
):
    """Retrain the sparse dictionaries shipped with an organism (models/NAME/dictionaries.py)."""
    from jinterp.saes import shipped

    try:
        spec = shipped.spec(name)
    except FileNotFoundError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        record = shipped.train(spec, out, seed=seed, steps=steps)
    except FileExistsError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(record["metrics"], indent=1))


@app.command()
def experiment(
    name: str = typer.Argument(..., help="experiment name, or 'list' to show them"),
    model: Optional[str] = typer.Option(None, help="bundled model, HF-format directory or hub id (default: the experiment's organism)"),
    out: Optional[Path] = typer.Option(None, help="report directory (default out/NAME)"),
    batch: Optional[int] = typer.Option(None, help="dataset size (default: the experiment's)"),
    seed: int = typer.Option(0, help="seed for the dataset"),
    quick: bool = typer.Option(False, "--quick", help="a smaller, faster run"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing report directory"),
):
    """Reproduce a paper (experiments/): `jinterp experiment list`, `jinterp experiment NAME --out DIR`."""
    import experiments

    if name == "list":
        rows = [(n, m.TITLE, m.ORGANISM) for n, m in ((n, experiments.get(n)) for n in experiments.available())]
        widths = [max(len(str(r[i])) for r in rows + [("name", "paper", "default organism")]) for i in range(3)]
        for r in [("name", "paper", "default organism")] + rows:
            typer.echo("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
        return
    try:
        experiments.get(name)
    except experiments.UnknownExperiment as e:
        typer.echo(f"Error: {e}. `jinterp experiment list` describes them.", err=True)
        raise typer.Exit(2)
    out = out or Path("out") / name
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAX_NUM_PROCESSES"):
        from jinterp import distributed  # several hosts: every process runs this command (README)

        try:
            distributed.initialize()
        except distributed.DistributedError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(2)
    try:
        done = experiments.run(name, out, model=model, batch=batch, seed=seed, quick=quick, overwrite=overwrite)
    except experiments.OutputExists as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: no report written", err=True)
        raise typer.Exit(130)
    import jax

    if jax.process_index() != 0:  # process 0 wrote the report and prints it
        return
    doc = json.loads((done / "report.json").read_text())
    typer.echo("\n".join(experiments.claims_markdown(doc["claims"])))
    held = sum(c["holds"] for c in doc["claims"])
    run = doc["run"]
    typer.echo(f"\n{held}/{len(doc['claims'])} claims hold. {run.get('wall_seconds')}s, "
               f"{run.get('compiled_programs')} compiled programs. Report: {done / 'report.md'}")



@app.command("plan")
def plan_memory(
    source: str = typer.Argument(..., help="model directory, bundled name, or a config.json (no weights needed)"),
    batch: int = typer.Option(1, help="batch size"),
    seq: int = typer.Option(128, help="tokens per sequence"),
    mesh: Optional[str] = typer.Option(None, help="device mesh, e.g. data=2,model=4"),
    dtype: str = typer.Option("float32", help="parameter dtype: float32 or bfloat16"),
    memory: Optional[float] = typer.Option(None, help="GiB free per device to plan for (default: this machine's)"),
):
    """Per-device memory for parameters, a forward, a full cache and a sweep chunk, and whether it fits."""
    from jinterp import planner, sharding

    shape = None
    if mesh:
        try:
            shape = {k.strip(): int(v) for k, v in (part.split("=") for part in mesh.split(","))}
        except ValueError:
            typer.echo(f"Error: --mesh {mesh!r} is not of the form data=2,model=4", err=True)
            raise typer.Exit(2)
    if dtype not in ("float32", "bfloat16"):
        typer.echo(f"Error: --dtype must be float32 or bfloat16, got {dtype!r}", err=True)
        raise typer.Exit(2)
    try:
        p = planner.plan(source, batch, seq, mesh=shape, dtype=dtype, name=Path(source).name,
                         memory=None if memory is None else memory * planner.GiB)
    except sharding.ShardingError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(str(p))
    if not p.fits:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
