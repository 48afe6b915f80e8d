"""The dictionaries shipped in models/: they load with jinterp.saes.load, fit their model, and a fresh
evaluation on the held-out organism data reproduces the metrics recorded in metrics.json (so a
stale or hand-edited file fails)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from jinterp import saes
from jinterp.cli import app
from jinterp.train import organisms

ORGANISM = "induction-2l"


def _recipe(name):
    path = organisms.models_dir() / name / "dictionaries.py"
    spec = importlib.util.spec_from_file_location(f"test_dictionaries_{name.replace('-', '_')}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rec():
    return _recipe(ORGANISM)


def test_shipped_transcoders_load_fit_and_reproduce_their_metrics(rec):
    folder = organisms.models_dir() / ORGANISM / "dictionaries" / "transcoders"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 600_000  # committed: keep them small
    model = rec.load_model()
    d = saes.load(str(folder))
    assert d.format == "circuit_tracer" and d.stacked and d.layers == (0, 1) and d.is_transcoder
    assert (d.site, d.out_site) == ("mlp.hook_in", "hook_mlp_out")
    saes.check(d, model)
    recorded = json.loads((folder / "metrics.json").read_text())
    assert recorded["train"]["d_sae"] == d.d_sae
    fresh = rec.evaluate(model, d)
    for l in (0, 1):
        want, got = recorded["metrics"][str(l)], fresh[l]
        for key in ("explained_variance", "ce_loss_recovered", "ce_spliced", "ce_clean"):
            assert got[key] == pytest.approx(want[key], abs=2e-4), (l, key)
        assert got["l0"] == pytest.approx(want["l0"], rel=1e-4)
        assert got["dead_fraction"] == pytest.approx(want["dead_fraction"], abs=1e-9)
        # good enough to serve attribution graphs: the MLP output is mostly explained, sparsely
        assert got["explained_variance"] > 0.9 and got["l0"] < 40 and got["ce_loss_recovered"] > 0.4
    assert np.isfinite([fresh[l]["ce_zero_ablated"] for l in (0, 1)]).all()


def test_train_dictionaries_cli_names_a_missing_recipe(tmp_path):
    res = CliRunner().invoke(app, ["train-dictionaries", "no-such-organism", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "organisms with dictionaries" in res.output and ORGANISM in res.output


@pytest.mark.slow
def test_train_dictionaries_cli_retrains(tmp_path):
    res = CliRunner().invoke(app, ["train-dictionaries", ORGANISM, "--out", str(tmp_path), "--steps", "20"])
    assert res.exit_code == 0, res.output
    d = saes.load(str(tmp_path / "transcoders"))
    assert d.layers == (0, 1) and json.loads((tmp_path / "transcoders" / "metrics.json").read_text())["train"]["steps"] == 20
