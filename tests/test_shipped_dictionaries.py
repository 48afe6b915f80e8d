"""The dictionaries shipped in models/: they load with jinterp.saes.load, fit their model, and a fresh
evaluation on the held-out organism data reproduces the metrics recorded in metrics.json (so a
stale or hand-edited file fails: induction-2l's full set and ioi-4l's first 64 rows by default,
every full set under -m slow); for padded ioi-4l the metrics are also recomputed independently
with HF torch. Padding support of fit / evaluate: padded rows give what the same rows unpadded give."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

import jinterp
from jinterp import saes
from jinterp.cli import app
from jinterp.saes import shipped, train
from jinterp.saes.evaluate import evaluate
from jinterp.train import organisms

ORGANISM = "induction-2l"
SHIPPED = {"induction-2l": 2, "ioi-4l": 4, "kg-6l": 6, "retrieval-2l": 2, "list-recall-2l": 2, "ioi-cobjs-4l": 4}  # organism: layers
KEYS = ("l0", "explained_variance", "ce_clean", "ce_zero_ablated", "ce_spliced", "ce_loss_recovered", "dead_fraction")


def _assert_reproduces(fresh, recorded, layers):
    for l in layers:
        want, got = recorded["metrics"][str(l)], fresh[l]
        for key in ("explained_variance", "ce_loss_recovered", "ce_spliced", "ce_clean", "ce_zero_ablated"):
            assert got[key] == pytest.approx(want[key], abs=2e-4), (l, key)
        assert got["l0"] == pytest.approx(want["l0"], rel=1e-4)
        assert got["dead_fraction"] == pytest.approx(want["dead_fraction"], abs=1e-9)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_dictionaries_load_and_fit_their_model(name):
    spec = shipped.spec(name)
    folder = spec.folder
    assert sum(f.stat().st_size for f in folder.iterdir()) < 150_000 * SHIPPED[name]  # committed: keep them small
    d = saes.load(str(folder))
    n = SHIPPED[name]
    assert d.format == "circuit_tracer" and d.stacked and d.layers == tuple(range(n)) and d.is_transcoder
    assert (d.site, d.out_site) == ("mlp.hook_in", "hook_mlp_out")
    saes.check(d, jinterp.load(str(organisms.models_dir() / name)).config)
    recorded = json.loads((folder / "metrics.json").read_text())
    assert recorded["model"] == name and recorded["train"]["d_sae"] == d.d_sae == spec.settings["d_sae"]
    assert sorted(recorded["metrics"]) == [str(l) for l in range(n)]
    for m in recorded["metrics"].values():
        assert set(KEYS) <= set(m) and all(np.isfinite(m[k]) for k in KEYS)
        # a splice may lower the CE a little (ioi-cobjs-4l layer 3: 1.371 vs 1.374), never by much
        assert m["ce_spliced"] >= 0.99 * m["ce_clean"] and 0 <= m["dead_fraction"] < 0.5


def test_induction_transcoders_reproduce_their_metrics():
    spec = shipped.spec(ORGANISM)
    model = shipped.load_model(spec)
    d = shipped.load(ORGANISM)
    recorded = json.loads((spec.folder / "metrics.json").read_text())
    fresh = shipped.evaluate(spec, model, d)
    _assert_reproduces(fresh, recorded, (0, 1))
    for l in (0, 1):
        # good enough to serve attribution graphs: the MLP output is mostly explained, sparsely
        got = fresh[l]
        assert got["explained_variance"] > 0.9 and got["l0"] < 40 and got["ce_loss_recovered"] > 0.4


def _hf_metrics(name, groups, n_layers):
    """Independent metrics with HF torch over row groups [(tokens, mask[, loss_mask]), ...] (one forward each):
    per layer, the MLP's input (ln_2's output) and output by hooks, the transcoder in numpy from its
    safetensors, and the CE with the MLP output replaced (spliced) or zeroed at the kept positions
    (real, not BOS), pooled over all groups' kept tokens and valid predictions."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(organisms.models_dir() / name)).eval()
    folder = shipped.spec(name).folder
    W = {l: {k: v.astype(np.float64) for k, v in load_file(str(folder / f"layer_{l}.safetensors")).items()}
         for l in range(n_layers)}

    def feats(x, l):
        return np.maximum(x @ W[l]["W_enc"].T + W[l]["b_enc"], 0)

    def pred(x, l):
        return feats(x, l) @ W[l]["W_dec"] + W[l]["b_dec"]

    def run(tokens, mask, loss=None, layer=None, replace=None):
        """(nll of the valid predictions [n], {l: (mlp input, mlp output) at the kept positions})."""
        keep = mask & (np.cumsum(mask, 1) > 1)
        seen, hooks = {}, []
        for l in range(n_layers):
            def fwd(mod, args, out, l=l):
                seen[l] = (args[0].double().numpy()[keep], out.double().numpy()[keep])
                if l != layer:
                    return out
                new = out.clone()
                new[torch.tensor(keep)] = torch.tensor(replace(seen[l][0], l), dtype=out.dtype)
                return new

            hooks.append(hf.transformer.h[l].mlp.register_forward_hook(fwd))
        tok = torch.tensor(tokens, dtype=torch.long)
        with torch.no_grad():
            logits = hf(input_ids=tok, attention_mask=torch.tensor(mask.astype(np.int64))).logits.double()
        for h in hooks:
            h.remove()
        nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, tok[:, 1:, None])[..., 0].numpy()
        return nll[mask[:, 1:] & mask[:, :-1] & (True if loss is None else loss)], seen

    def pooled(layer=None, replace=None):
        outs = [run(*g, *[None] * (3 - len(g)), layer, replace) for g in groups]
        return np.concatenate([o[0] for o in outs]).mean(), outs

    def layer_metrics(l, outs, ce_clean):
        x = np.concatenate([o[1][l][0] for o in outs])
        y = np.concatenate([o[1][l][1] for o in outs])
        f = feats(x, l)
        ce_spl = pooled(l, pred)[0]
        ce_zero = pooled(l, lambda x, l: np.zeros_like(x))[0]
        return {"l0": (f > 0).sum(-1).mean(),
                "explained_variance": 1 - ((y - pred(x, l)) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(),
                "ce_clean": ce_clean, "ce_spliced": ce_spl, "ce_zero_ablated": ce_zero,
                "ce_loss_recovered": (ce_zero - ce_spl) / (ce_zero - ce_clean),
                "dead_fraction": 1 - (f > 0).any(0).mean()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: more threads only contend on a shared CPU (25x slower here)
    try:
        ce_clean, outs = pooled()
        return {l: layer_metrics(l, outs, ce_clean) for l in range(n_layers)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ioi-4l", "kg-6l", "retrieval-2l", "list-recall-2l", "ioi-cobjs-4l"])
def test_shipped_transcoders_reproduce_metrics_json(name):
    spec = shipped.spec(name)
    recorded = json.loads((spec.folder / "metrics.json").read_text())
    _assert_reproduces(shipped.evaluate(spec, shipped.load_model(spec), shipped.load(name)), recorded,
                       range(SHIPPED[name]))


def test_ioi_transcoders_reproduce_metrics_json_and_an_independent_hf_computation():
    """Padded held-out rows (the first 64, whose metrics metrics.json records): `evaluate` reproduces
    the recorded numbers, and every one equals HF torch's."""
    name = "ioi-4l"
    spec = shipped.spec(name)
    model, d = shipped.load_model(spec), shipped.load(name)
    recorded = json.loads((spec.folder / "metrics.json").read_text())["metrics_first_rows"]
    toks, mask, loss = shipped.held_out(spec, rows=recorded["rows"])
    assert not mask.all()  # the held-out rows really are padded
    assert loss is None  # ioi-4l is trained on every real token (0.1 x the template words): the CE counts them all
    ours = shipped.evaluate(spec, model, d, rows=recorded["rows"])
    _assert_reproduces(ours, recorded, range(4))
    ref = _hf_metrics(name, [(toks, mask)], 4)
    for l in range(4):
        for key in KEYS:
            assert ours[l][key] == pytest.approx(ref[l][key], abs=1e-4, rel=1e-4), (l, key)


def test_answer_only_ce_of_list_recall_follows_its_loss_mask():
    """list-recall-2l is trained on its answer and EOS only: the recorded CE counts those two
    predictions per row (the spec's loss mask), not the untrained rest."""
    spec = shipped.spec("list-recall-2l")
    toks, mask, loss = shipped.held_out(spec)
    assert not mask.all() and (loss.sum(1) == 2).all() and not (loss & ~mask[:, 1:]).any()
    m = json.loads((spec.folder / "metrics.json").read_text())["metrics"]
    assert all(v["ce_clean"] < 0.5 for v in m.values())  # on every token it would be ~9 nats


# ---------------------------------------------------------------------------------------------
# padding in fit and evaluate, on induction-2l (2 layers, fast)


@pytest.fixture(scope="module")
def ind():
    return jinterp.load("induction-2l"), organisms.recipe("induction-2l")


def _pad(rows, lengths, P, side, rng):
    """Rows cut to `lengths`, padded to P with random junk tokens on `side`; (tokens, mask)."""
    toks = rng.integers(0, 50, (len(rows), P)).astype(np.int32)
    mask = np.zeros((len(rows), P), bool)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        sl = slice(0, n) if side == "right" else slice(P - n, P)
        toks[i, sl], mask[i, sl] = r[:n], True
    return toks, mask


def test_evaluate_padded_rows_equal_the_rows_unpadded(ind):
    """Rows of two lengths, padded with junk tokens on the right or the left (the forward must see the
    mask), against HF torch on the same rows unpadded."""
    model, r = ind
    d = shipped.load(ORGANISM)
    # [64, 49]: the shape of the shipped set's evaluation batches, whose programs the test above compiled
    rows = r.induction_batch(np.random.default_rng(7), 64, 20, r.VOCAB_SIZE, 4, 8)
    lengths = np.array([30, 49] * 32)
    rng = np.random.default_rng(0)
    padded = [_pad(rows, lengths, 49, side, rng) for side in ("right", "left")]
    got = [evaluate(model, d, t, attention_mask=m, batch_size=64) for t, m in padded]
    # the CE on chosen predictions only (an organism trained on its answers): the second half of each row
    loss = np.arange(48)[None] >= lengths[:, None] // 2
    got_loss = evaluate(model, d, padded[0][0], attention_mask=padded[0][1], loss_mask=loss, batch_size=64)
    a, b = rows[lengths == 30, :30], rows[lengths == 49]
    ones = np.ones(a.shape, bool), np.ones(b.shape, bool)
    ref = _hf_metrics(ORGANISM, [(a, ones[0]), (b, ones[1])], 2)
    ref_loss = _hf_metrics(ORGANISM, [(a, ones[0], loss[lengths == 30, :29]), (b, ones[1], loss[lengths == 49])], 2)
    assert ref_loss[0]["ce_clean"] != pytest.approx(ref[0]["ce_clean"], abs=1e-3)
    for l in (0, 1):
        for g, r in ((got[0], ref), (got[1], ref), (got_loss, ref_loss)):
            for key in KEYS:
                assert g[l][key] == pytest.approx(r[l][key], abs=1e-4, rel=1e-4), (l, key)


# TopK (with its AuxK loss) compiles 4x slower than ReLU: the default run keeps ReLU
@pytest.mark.parametrize("arch", ["relu", pytest.param("topk", marks=pytest.mark.slow)])
def test_fit_padded_rows_train_as_the_rows_unpadded(ind, arch):
    """Junk padding (right or left, masked) leaves training unchanged: same dictionary, same history
    (TopK: with the AuxK loss on; dead_window=2 makes features dead). (Resampling draws its tokens
    over all B x P positions, so its random picks differ with the row width; padded ones are never
    picked.)"""
    model, r = ind
    rows = r.induction_batch(np.random.default_rng(3), 8, 10, r.VOCAB_SIZE, 4, 4)[:, :24]  # [8, 24]
    kw = dict(architecture=arch, d_sae=32, steps=8, batch_size=4, seed=0, dead_window=2, progress=False, log_every=1)
    kw.update(k=4) if arch == "topk" else kw.update(l1=1.0)
    plain = train.fit(model, rows, **kw)
    assert arch == "relu" or (plain.history["auxk"] > 0).any()
    for side in ("right", "left"):
        toks, mask = _pad(rows, [24] * 8, 32, side, np.random.default_rng(1))
        padded = train.fit(model, toks, attention_mask=mask, **kw)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            np.testing.assert_allclose(getattr(padded.dictionary, name), getattr(plain.dictionary, name), atol=2e-4,
                                       err_msg=f"{side} {name}")
        for key in ("loss", "l0", "explained_variance", "auxk", "dead_fraction"):
            np.testing.assert_allclose(padded.history[key], plain.history[key], atol=2e-4, err_msg=f"{side} {key}")


def test_padding_errors(ind):
    model, r = ind
    rows = r.induction_batch(np.random.default_rng(0), 4, 10, r.VOCAB_SIZE, 4, 4)
    d = shipped.load(ORGANISM)
    bad = np.ones((4, rows.shape[1] - 1), bool)  # e.g. a recipe's loss weights [B, P-1] passed as a mask
    with pytest.raises(ValueError, match=r"attention_mask has shape \(4, \d+\) but the held-out set's tokens"):
        evaluate(model, d, rows, attention_mask=bad)
    with pytest.raises(ValueError, match="attention_mask has shape .* one entry per token"):
        train.fit(model, lambda rng: (rows, bad), d_sae=8, steps=1, progress=False)
    with pytest.raises(ValueError, match="entries must be 0/1"):
        train.fit(model, rows, attention_mask=np.full(rows.shape, 2), d_sae=8, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"loss_mask has shape \(4, \d+\) but must be \[N, P-1\]"):
        evaluate(model, d, rows, loss_mask=np.ones(rows.shape, bool))
    with pytest.raises(ValueError, match="no next-token prediction"):
        evaluate(model, d, rows, loss_mask=np.zeros((4, rows.shape[1] - 1), bool))
    with pytest.raises(ValueError, match="row with no real tokens"):
        evaluate(model, d, rows, attention_mask=np.zeros(rows.shape, bool))
    with pytest.raises(ValueError, match="goes with a token array"):
        train.fit(model, lambda rng: rows, attention_mask=np.ones(rows.shape), d_sae=8, steps=1, progress=False)
    with pytest.raises(ValueError, match="lengths must be"):
        shipped.right_padded(rows, [0, 3, 3, 3])


def test_train_dictionaries_cli_names_a_missing_recipe(tmp_path):
    res = CliRunner().invoke(app, ["train-dictionaries", "no-such-organism", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "organisms with dictionaries" in res.output and ORGANISM in res.output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["induction-2l", "ioi-4l"])
def test_train_dictionaries_cli_retrains(tmp_path, name):
    res = CliRunner().invoke(app, ["train-dictionaries", name, "--out", str(tmp_path), "--steps", "20"])
    assert res.exit_code == 0, res.output
    d = saes.load(str(tmp_path / "transcoders"))
    assert d.layers == tuple(range(SHIPPED[name]))
    assert json.loads((tmp_path / "transcoders" / "metrics.json").read_text())["train"]["steps"] == 20
    res = CliRunner().invoke(app, ["train-dictionaries", name, "--out", str(tmp_path), "--steps", "20"])
    assert res.exit_code == 2 and "not empty" in res.output
