"""The experiments layer: registry, report writer, CLI, and the induction reproduction on its organism."""

from __future__ import annotations

import json

import numpy as np
import pytest

import experiments
import jinterp
from jinterp import edits


@pytest.fixture(scope="module")
def induction_runs(tmp_path_factory):
    """The induction experiment, quick, on its organism, twice with the same seed."""
    base = tmp_path_factory.mktemp("induction")
    outs = [experiments.run("induction", base / f"run{i}", quick=True, seed=0) for i in range(2)]
    return [json.loads((o / "report.json").read_text()) for o in outs], outs


def test_induction_claims_on_the_organism(induction_runs):
    (doc, _), (out, _) = induction_runs
    claims = {c["name"]: c for c in doc["claims"]}
    assert all(c["holds"] for c in doc["claims"]), [c for c in doc["claims"] if not c["holds"]]
    assert len(claims) >= 7
    n = doc["numbers"]
    # the organism's card: previous-token heads L0H0/L0H1, induction heads L1H0/L1H1
    assert n["previous_token_heads"] == "L0H0, L0H1" and n["induction_heads"] == "L1H0, L1H1"
    assert n["strongest_composition"].startswith("K L0H")
    assert n["loss_repeated_half"] < 1.0 < 4.0 < n["loss_first_half"]
    assert n["gain_removed_ablating_induction_heads"] > 0.75
    for f in ("report.md", "head_scores.png", "composition.png", "loss_by_position.png", "single_head_ablation.png",
              "head_scores.csv", "ablations.csv", "composition.csv", "induction.npz"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "![" in md and "| claim | paper | ours | holds | note |" in md
    run = doc["run"]
    assert run["compiled_programs"] > 0 and run["wall_seconds"] > 0
    assert "compiled_programs" not in n and "wall_seconds" not in n


def test_induction_same_seed_same_report(induction_runs):
    (a, b), _ = induction_runs
    assert a["numbers"] == b["numbers"]
    assert a["claims"] == b["claims"]
    assert a["config"] == b["config"] and a["files"] == b["files"]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_induction_ablation_recomputed_by_a_naive_loop(induction_runs):
    """The repeated-half loss with the induction heads mean-ablated, recomputed one sequence at a time
    with a differently built edit (edits.patch of the batch-mean z) and numpy."""
    (doc, _), (out, _) = induction_runs
    raw = np.load(out / "induction.npz")
    toks = raw["tokens"]
    seg = doc["numbers"]["segment_length"]
    model = jinterp.load("induction-2l")
    _, cache = model.run_with_cache(toks, names=lambda n: n == "blocks.1.attn.hook_z")
    mean_z = np.asarray(cache["blocks.1.attn.hook_z"]).mean(0)  # [pos, head, d_head]
    first, rep, rep_ablated = [], [], []
    for row in toks:
        t = row[None]
        e = edits.patch("blocks.1.attn.hook_z", mean_z, heads=[0, 1])
        for lp, into in ((_log_softmax(model(t)), None), (_log_softmax(model(t, edits=[e])), rep_ablated)):
            nll = -lp[0, np.arange(t.shape[1] - 1), row[1:]]
            if into is None:
                first.append(nll[:seg].mean())
                rep.append(nll[seg + 1:2 * seg].mean())
            else:
                into.append(nll[seg + 1:2 * seg].mean())
    n = doc["numbers"]
    np.testing.assert_allclose(np.mean(first), n["loss_first_half"], rtol=1e-4)
    np.testing.assert_allclose(np.mean(rep), n["loss_repeated_half"], rtol=1e-4)
    np.testing.assert_allclose(np.mean(rep_ablated), n["ablate_induction_heads_loss_repeated_half"], rtol=1e-4)
    # and the per-position clean curve in the npz matches too
    np.testing.assert_allclose(raw["curve_clean"][seg + 1:2 * seg].mean(), np.mean(rep), rtol=1e-4)


def test_unknown_experiment_lists_available():
    with pytest.raises(experiments.UnknownExperiment, match="available: .*induction"):
        experiments.get("no-such-paper")
    assert "induction" in experiments.available()


def _fake(monkeypatch, body):
    exp = experiments.get("induction")
    monkeypatch.setattr(exp, "run", body)
    return exp


def test_existing_output_refused_then_replaced(tmp_path, monkeypatch):
    def body(model, report, *, batch, seed, quick):
        report.number("x", 1.0)
        report.claim("c", 1, 1, True, "")

    _fake(monkeypatch, body)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(experiments.OutputExists, match="--overwrite"):
        experiments.run("induction", out)
    assert (out / "old.txt").read_text() == "keep me"
    experiments.run("induction", out, overwrite=True)
    assert not (out / "old.txt").exists()
    assert json.loads((out / "report.json").read_text())["numbers"] == {"x": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old directories left
    empty = tmp_path / "empty"
    empty.mkdir()
    experiments.run("induction", empty)  # an empty directory is not a report: no overwrite needed
    assert (empty / "report.md").is_file()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, error):
    def body(model, report, *, batch, seed, quick):
        report.number("x", 1.0)
        report.table("t", [dict(a=1)])
        raise error("stopped mid-way")

    _fake(monkeypatch, body)
    with pytest.raises(error):
        experiments.run("induction", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # an existing report survives a failed overwrite
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("old")
    with pytest.raises(error):
        experiments.run("induction", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "report.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_count_compiles():
    import jax
    import jax.numpy as jnp

    def f(x):
        return jnp.sin(x) * 3.0 + 1.0

    f = jax.jit(f)
    a, b = jnp.ones(7), jnp.ones(9)  # made outside the block: creating them compiles small programs too
    with experiments.count_compiles() as c:
        f(a)
        f(a)  # cached: not compiled again
        f(b)  # a new shape: a new program
    assert c.count == 2 and c.seconds > 0 and c.by_function == {"jit(f)": 2}, (c.count, c.by_function)
    with experiments.count_compiles() as c2:
        f(a)
    assert c2.count == 0


def test_cli_list_and_errors(tmp_path):
    from typer.testing import CliRunner

    from jinterp.cli import app

    res = CliRunner().invoke(app, ["experiment", "list"])
    assert res.exit_code == 0, res.output
    assert "induction" in res.output and "induction-2l" in res.output and "Olsson" in res.output
    res = CliRunner().invoke(app, ["experiment", "no-such-paper", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "available: " in res.output and "Traceback" not in res.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    res = CliRunner().invoke(app, ["experiment", "induction", "--out", str(tmp_path / "full")])
    assert res.exit_code == 1 and "--overwrite" in res.output


def test_cli_quick_run(tmp_path):
    from typer.testing import CliRunner

    from jinterp.cli import app

    out = tmp_path / "ind"
    res = CliRunner().invoke(app, ["experiment", "induction", "--out", str(out), "--quick", "--batch", "16", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "| claim |" in res.output and str(out / "report.md") in res.output and "compiled programs" in res.output
    doc = json.loads((out / "report.json").read_text())
    assert doc["config"] == dict(experiment="induction", model="induction-2l", batch=16, seed=3, quick=True)
    assert doc["numbers"]["n_sequences"] == 16


TWO_HOSTS = """
import os, sys
port, pid, out = sys.argv[1], sys.argv[2], sys.argv[3]
# the README's launch: the same command on every host, told the coordinator by the environment
os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=pid,
                  JAX_NUM_CPU_DEVICES="4")
from jinterp.cli import app
from jinterp.engine import traced

meshes, call = [], traced.call
def spy(fn, args, static):  # sees every sweep program the driver runs
    meshes.append(static.get("mesh"))
    return call(fn, args, static)
traced.call = spy
try:
    app(["experiment", "induction", "--out", out, "--quick"])
except SystemExit as e:
    assert not e.code, e.code
print("host", pid, "sweep programs on", sorted({1 if m is None else m.devices.size for m in meshes}), "devices")
"""


def test_experiment_on_two_hosts_splits_its_sweeps(induction_runs, tmp_path):
    """`jinterp experiment` started in two processes of 4 CPU devices each: every sweep splits its
    cells over all 8 devices, process 0 alone writes and prints the report, and its numbers and claims
    are the single-process run's (up to float rounding: the split sweeps group their cells differently)."""
    from tests import procs

    (one, _), _ = induction_runs
    logs = procs.processes(TWO_HOSTS, tmp_path / "two", env=procs.env(JINTERP_COMPILE_CACHE="0"), timeout=300)
    for i, stdout in enumerate(logs):
        assert f"host {i} sweep programs on [8] devices" in stdout, stdout
        assert ("claims hold" in stdout) == (i == 0), stdout
    assert [p.name for p in tmp_path.iterdir()] == ["two"]  # one report, no staging left behind
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (two["run"]["processes"], two["run"]["sweep_devices"]) == (2, 8)
    assert (one["run"]["processes"], one["run"]["sweep_devices"]) == (1, 1)
    assert two["numbers"].keys() == one["numbers"].keys()
    for k, v in one["numbers"].items():
        assert two["numbers"][k] == (pytest.approx(v, abs=1e-3) if isinstance(v, float) else v), k
    assert [(c["name"], c["holds"]) for c in two["claims"]] == [(c["name"], c["holds"]) for c in one["claims"]]
