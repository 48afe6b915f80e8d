"""The README runs as written: the main job (`jinterp demo`) prints and writes what it claims,
the quickstart runs on the bundled model, and CI runs the README's test command."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import jinterp
from jinterp.train import organisms

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
induction = organisms.recipe("induction-2l")


def _code_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_quickstart_runs(tmp_path, monkeypatch):
    code = _code_blocks("python")[0]
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    full = induction.induction_batch(rng, 4, 6, 121)
    clean = full[:, :-1]
    corrupted = clean.copy()
    corrupted[:, 6] = (clean[:, 6] - 1) % 119 + 2
    needle = [np.concatenate([[0], rng.integers(2, 121, 4), n, rng.integers(2, 121, 6), n[:2]]) for n in rng.integers(2, 121, (3, 6))]
    env = dict(
        vector=rng.standard_normal(64).astype(np.float32),
        clean_tokens=clean,
        corrupted_tokens=corrupted,
        answer_tokens=np.stack([full[:, -1], corrupted[:, 6]], 1),
        target=np.array([3]),
        repeated_tokens=induction.induction_batch(rng, 4, 10, 121),
        needle_prompts=needle,
        needle_spans=[(5, 11)] * 3,
    )
    code = code.replace("cache.apply_ln_to_stack(stack)", "cache.apply_ln_to_stack(cache.decompose_resid())")
    exec(compile(code, "README.md", "exec"), env)
    assert (tmp_path / "resid_pre.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert env["tokens"].shape == (1, 6) and env["logits"].shape == (1, 6, 121)
    assert env["result"].values.shape == (2, clean.shape[1])
    # clean and corrupted differ at position 6 only: patching its residual before layer 0 gives the clean run
    clean_metric = float(env["metric"](env["model"](clean)))
    assert env["result"].values[0, 6] == pytest.approx(clean_metric, rel=1e-4, abs=1e-4)


@pytest.mark.slow  # ~50 s of compiles; each call is covered by tests/test_saes.py, test_graph*.py, test_splice.py
def test_dictionaries_block_runs(tmp_path, monkeypatch):
    """The README's dictionaries and attribution-graph block runs as written (from the repository root)."""
    (code,) = [c for c in _code_blocks("python") if "saes.attribute" in c]
    monkeypatch.chdir(tmp_path)
    code = code.replace('"models/', f'"{ROOT}/models/')
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    assert (tmp_path / "apple.png").exists() and (tmp_path / "graphs" / "apple.json").exists()
    assert "<html" in (tmp_path / "apple.html").read_text()[:200].lower()
    assert sorted(p.name for p in (tmp_path / "saes").iterdir()) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                                                       "metrics.json"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`jinterp demo --out DIR`, in process: (printed text, DIR)."""
    from typer.testing import CliRunner

    from jinterp.cli import app

    out = tmp_path_factory.mktemp("demo")
    res = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return res.output, out


def _logp(logits):
    x = np.asarray(logits, np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def test_demo_task_metrics_recomputed(demo):
    """task.json equals the metrics recomputed in numpy from the model's logits on the demo's batch
    (64 rows of [BOS, 20 words, the same 20 words], seed 0), and they show induction at work."""
    text, out = demo
    task = json.loads((out / "task.json").read_text())
    m = jinterp.load("induction-2l")
    toks = induction.induction_batch(np.random.default_rng(0), 64, 20, m.cfg.d_vocab)
    logp = _logp(m(toks))[:, :-1]
    tgt = toks[:, 1:]
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    want = {
        "loss_first_half": nll[:, :20].mean(),
        "loss_repeated_half": nll[:, 21:40].mean(),
        "accuracy_repeated_half": (logp.argmax(-1) == tgt)[:, 21:40].mean(),
        "uniform_loss": np.log(119),
    }
    assert task.keys() == want.keys()
    for k, v in want.items():
        assert task[k] == pytest.approx(v, abs=1e-4), k
        assert re.search(rf"{k}\s+{task[k]:.4f}", text), k  # printed as written
    assert abs(task["loss_first_half"] - task["uniform_loss"]) < 0.5  # unpredictable half: chance
    assert task["loss_repeated_half"] < 1.0 and task["accuracy_repeated_half"] > 0.85


def test_demo_names_the_circuit_heads(demo):
    """The printed strongest heads are the argmax of the saved scores: a previous-token head in
    layer 0 and an induction head in layer 1; the CSV is the npz, rounded."""
    text, out = demo
    scores = dict(np.load(out / "head_scores.npz"))
    assert set(scores) == {"previous_token", "duplicate_token", "induction"}
    found = re.search(r"strongest previous-token head: L(\d)H(\d) \(([\d.]+)\); strongest induction head: L(\d)H(\d) \(([\d.]+)\)", text)
    assert found, text
    prev, ind = tuple(map(int, found.group(1, 2))), tuple(map(int, found.group(4, 5)))
    assert prev == np.unravel_index(scores["previous_token"].argmax(), (2, 2)) and prev[0] == 0
    assert ind == np.unravel_index(scores["induction"].argmax(), (2, 2)) and ind[0] == 1
    assert float(found.group(3)) == pytest.approx(scores["previous_token"][prev], abs=5e-4) and float(found.group(3)) > 0.5
    assert float(found.group(6)) == pytest.approx(scores["induction"][ind], abs=5e-4) and float(found.group(6)) > 0.7

    csv = np.genfromtxt(out / "head_scores.csv", delimiter=",", names=True)
    assert list(csv.dtype.names) == ["layer", "head", "previous_token", "duplicate_token", "induction"]
    for row in csv:
        for k in scores:
            assert row[k] == pytest.approx(scores[k][int(row["layer"]), int(row["head"])], abs=1e-6)

    for png in ("heads.png", "patch_resid_pre.png", "patch_heads.png", "composition.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_demo_patching_and_weights_agree_with_the_mechanism(demo):
    """Patching tables: the CSVs are the npz; the changed word's residual carries the whole effect
    (normalised ~1) and the layer-1 heads carry it onward. Weight space: K-composition from a
    layer-0 head is the strongest. Retrieval: the layer-1 heads retrieve, layer-0 heads do not."""
    import pandas as pd

    text, out = demo
    resid, heads = np.load(out / "patch_resid_pre.npz"), np.load(out / "patch_heads.npz")
    for name, z in (("patch_resid_pre", resid), ("patch_heads", heads)):
        df = pd.read_csv(out / f"{name}.csv")
        axes = list(z["axes"])
        vals = np.full(z["values"].shape, np.nan)
        vals[tuple(df[f"{a}_index"] for a in axes)] = df.iloc[:, -1]
        np.testing.assert_allclose(vals, z["values"], rtol=1e-6, atol=1e-7)
    r = resid["values"]  # [layer, pos]; position 12 is the changed word in the first copy
    assert r.shape == (2, 24) and np.all(np.abs(r[:, 12] - 1) < 0.05)
    others = np.delete(r, [12, 23], axis=1)
    assert np.abs(others).max() < 0.05
    h = heads["values"]  # [layer, head]
    assert np.abs(h[0]).max() < 0.05 and h[1].sum() > 0.8
    assert float(re.search(r"Pearson r = ([-\d.]+)", text).group(1)) > 0.95

    comp = np.load(out / "composition_scores.npz")
    best = max("QKV", key=lambda k: comp[k][0, :, 1, :].max())
    assert best == "K"
    assert re.search(r"strongest: K-composition L0H\d -> L1H\d", text)

    rows = re.search(r"Retrieval scores.*?\n(head\s+retrieval\n(?:.*\n){4})", text).group(1).splitlines()[1:]
    ret = {row.split()[0]: float(row.split()[1]) for row in rows}
    assert max(ret["L0H0"], ret["L0H1"]) < 0.1 and min(ret["L1H0"], ret["L1H1"]) > 0.5


def test_ci_runs_the_readme_test_command():
    """.ci/run calls exactly the README's test command; the README says how to run the slow tests."""
    cmd = next(line for block in _code_blocks("bash") for line in block.splitlines() if "pytest" in line)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert cmd.strip() in ci
    assert "-m slow" in README
