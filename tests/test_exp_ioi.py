"""IOI: the prompt generator, the ioi-4l organism, its recipe, and the experiment (quick mode),
with reported numbers recomputed by naive loops of single forwards."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from experiments.data import ioi as data
from jinterp.train import organisms


@pytest.fixture(scope="module")
def recipe():
    return organisms.recipe("ioi-4l")


@pytest.fixture(scope="module")
def gen(recipe):
    return recipe.generator()


# ---------------------------------------------------------------------------------------- generator


def test_templates_and_positions(gen):
    b = gen.sample(np.random.default_rng(0), 400)
    rows = np.arange(len(b))
    assert b.tokens.shape == b.corrupted.shape and b.tokens.dtype == np.int32
    assert set(np.unique(b.template)) == set(range(15)) and b.abba.any() and (~b.abba).any()
    # IO at io, S at s1 and s2, END is the last prompt token ("to"), padding after it
    assert (b.tokens[rows, b.io] == b.answers[:, 0]).all()
    assert (b.tokens[rows, b.s1] == b.answers[:, 1]).all() and (b.tokens[rows, b.s2] == b.answers[:, 1]).all()
    assert (b.answers[:, 0] != b.answers[:, 1]).all()
    to = gen.tokenizer.convert_tokens_to_ids("to")
    assert (b.tokens[rows, b.end] == to).all()
    assert (b.s2 > np.maximum(b.io, b.s1)).all() and (b.end > b.s2).all()
    assert ((b.io < b.s1) == b.abba).all()  # ABBA: IO first
    for i in rows:
        assert (b.tokens[i, b.end[i] + 1:] == gen.pad).all()
    # p_ABC: three distinct names, none of them IO or S, exactly at IO, S1, S2
    diff = b.tokens != b.corrupted
    for i in rows[:50]:
        assert set(np.nonzero(diff[i])[0]) == {b.io[i], b.s1[i], b.s2[i]}
        abc = b.corrupted[i, [b.io[i], b.s1[i], b.s2[i]]]
        assert len(set(abc.tolist())) == 3 and not set(abc.tolist()) & set(b.answers[i].tolist())
    # substituting ids equals tokenizing the text
    for i in rows[:30]:
        text = gen.text(b, i)
        ids = [gen.bos] + gen.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == b.tokens[i, : b.end[i] + 1].tolist(), text
    t0 = gen.text(b, int(np.nonzero((b.template == 0) & ~b.abba)[0][0]))
    assert re.fullmatch(r"Then, (\w+) and (\w+) went to the \w+\. \1 gave a \w+ to", t0), t0


def test_paper_example_and_abba():
    assert data.abba("When [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]") == \
        "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to [A]"
    assert len(data.BABA_TEMPLATES) == 15


def test_single_template_batches_have_one_length(gen):
    for t in (0, 3, 12):
        b = gen.sample(np.random.default_rng(t), 20, templates=[t], order="BABA")
        assert (b.end == gen.template_lengths[t] - 1).all() and b.tokens.shape[1] == gen.template_lengths[t]


def test_split_names_are_named(recipe):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a WordPiece tokenizer over the organism's words, but "Mary" and "Sarah" split into pieces
    words = [w for w in recipe.WORDS if w not in ("Mary", "Sarah")] + ["Ma", "##ry", "Sa", "##rah"]
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", unk_token="[UNK]")
    assert hf.tokenize("Mary") == ["Ma", "##ry"]
    with pytest.raises(data.SplitWordError, match="'Mary', 'Sarah'") as e:
        data.IOIGenerator(hf)
    assert e.value.words == ["Mary", "Sarah"]
    # without them it works
    g = data.IOIGenerator(hf, names=[n for n in data.NAMES if n not in ("Mary", "Sarah")])
    assert len(g.sample(np.random.default_rng(0), 4)) == 4
    # a word-level tokenizer that does not know a word: also named
    from jinterp.train import hf_export

    small = hf_export.word_tokenizer([w for w in recipe.WORDS if w != "kiss"])
    with pytest.raises(data.SplitWordError, match="'kiss'"):
        data.IOIGenerator(small)


def test_template_means():
    v = np.arange(12, dtype=np.float32).reshape(6, 2)
    t = np.array([0, 1, 0, 1, 2, 0])
    m = data.template_means(v, t)
    np.testing.assert_allclose(m[0], v[[0, 2, 5]].mean(0))
    np.testing.assert_allclose(m[3], v[[1, 3]].mean(0))
    np.testing.assert_allclose(m[4], v[4])


# ---------------------------------------------------------------------------------------- organism


@pytest.fixture(scope="module")
def model():
    import jinterp

    return jinterp.load("ioi-4l")


def test_organism_solves_ioi_on_fresh_prompts(model):
    gen = data.IOIGenerator(model.tokenizer)  # the saved tokenizer, as a user loads it
    b = gen.sample(np.random.default_rng(20260), 300)
    logits = np.asarray(model(b.tokens), np.float32)
    lg = logits[np.arange(len(b)), b.end]
    io, s = lg[np.arange(len(b)), b.answers[:, 0]], lg[np.arange(len(b)), b.answers[:, 1]]
    assert (io > s).mean() >= 0.95
    assert (io - s).mean() > 1.0


@pytest.mark.slow  # the training loop and export run by default in tests/test_bundled.py (train-bundled CLI)
def test_recipe_training_smoke(recipe, tmp_path):
    card = recipe.train(tmp_path / "m", steps=3, batch=8, d_model=16, n_layers=1, n_heads=2, log_every=1, progress=False)
    assert len(card["loss_history"]) == 3 and all(np.isfinite(l) for _, l in card["loss_history"])
    assert {"logit_diff", "io_over_s"} <= set(card["metrics"])
    for f in ("config.json", "model.safetensors", "tokenizer.json", "training.json", "training_curve.png"):
        assert (tmp_path / "m" / f).is_file(), f
    import jinterp

    m = jinterp.load(str(tmp_path / "m"))
    assert m.config.n_layers == 1 and m.tokenizer("Then , Mary")["input_ids"] == recipe.tokenizer()("Then , Mary")["input_ids"]


# ---------------------------------------------------------------------------------------- experiment


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import experiments

    out = experiments.run("ioi", tmp_path_factory.mktemp("ioi") / "out", quick=True, batch=24, seed=3)
    return out, json.loads((out / "report.json").read_text()), np.load(out / "raw.npz")


def test_experiment_report(report):
    out, doc, raw = report
    names = [c["name"] for c in doc["claims"]]
    for n in ("mean logit difference IO - S", "IO over S", "name-mover heads exist in late layers",
              "faithfulness: the circuit recovers the model's LD"):
        assert n in names
    for c in doc["claims"]:
        assert isinstance(c["holds"], bool) and "paper" in c and "measured" in c
    num = doc["numbers"]
    by = {c["name"]: c for c in doc["claims"]}
    assert by["IO over S"]["measured"] == pytest.approx(num["io_over_s"], abs=1e-4)
    assert by["IO over S"]["holds"] == (num["io_over_s"] >= 0.95)
    assert by["mean logit difference IO - S"]["measured"] == pytest.approx(num["logit_diff"], abs=1e-3)
    assert num["faithfulness_gap"] == pytest.approx(abs(num["F_M"] - num["F_C"]) / num["F_M"], rel=1e-5)
    for f in ("report.md", "head_patching.png", "path_patching_logits.png", "attention_end.png", "heads.csv", "knockouts.csv", "raw.npz"):
        assert (out / f).is_file(), f
    # the knockout sweep's "M" (empty mask) reproduces the clean logit difference
    assert num["F_M"] == pytest.approx(float(raw["logit_diff"].mean()), rel=1e-5)
    i = list(raw["knockout_names"]).index("M")
    np.testing.assert_allclose(raw["knockout_logit_diff"][i], raw["logit_diff"], rtol=1e-4, atol=1e-4)


def test_experiment_numbers_by_naive_loops(report, model):
    """Mean LD from one forward per prompt; one path-patching cell and one knockout from explicit edits."""
    import jax.numpy as jnp

    from jinterp import edits as E

    _, doc, raw = report
    toks, abc, ans, end = raw["tokens"], raw["corrupted"], raw["answers"], raw["end"]
    lds = []
    for i in range(len(toks)):
        lg = np.asarray(model(toks[i : i + 1, : end[i] + 1]), np.float32)[0, -1]
        lds.append(lg[ans[i, 0]] - lg[ans[i, 1]])
    assert np.mean(lds) == pytest.approx(doc["numbers"]["logit_diff"], rel=1e-4, abs=1e-4)

    # path patching to the logits, sender = the head with the largest |direct effect|: three forwards
    pp = raw["path_patching_logits"]  # [L, H, B]
    l, h = np.unravel_index(np.argmax(np.abs(pp.mean(-1) - raw["logit_diff"].mean())), pp.shape[:2])
    _, oc = model.run_with_cache(toks, names=lambda n: n.endswith("attn.hook_z"))
    _, nc = model.run_with_cache(abc, names=lambda n: n.endswith("attn.hook_z"))
    zo, zn = oc.stack("attn.hook_z"), nc.stack("attn.hook_z")
    edits = [E.patch("attn.hook_z", zo, per_layer=True),
             E.patch("attn.hook_z", zn[l], layers=[int(l)], heads=[int(h)])]
    lg = np.asarray(model(toks, edits=edits), np.float32)[np.arange(len(toks)), end]
    naive = lg[np.arange(len(toks)), ans[:, 0]] - lg[np.arange(len(toks)), ans[:, 1]]
    np.testing.assert_allclose(pp[l, h], naive, rtol=1e-3, atol=1e-3)

    # the circuit knockout: every head outside C set to its per-template p_ABC mean
    i = list(raw["knockout_names"]).index("C")
    mask = raw["knockout_masks"][i] > 0.5
    zmean = data.template_means(np.asarray(zn), raw["template"], raw["abba"], axis=1)
    edits = [E.patch("attn.hook_z", jnp.asarray(zmean[li]), layers=[li], heads=[int(x) for x in np.nonzero(mask[li])[0]])
             for li in range(mask.shape[0]) if mask[li].any()]
    lg = np.asarray(model(toks, edits=edits), np.float32)[np.arange(len(toks)), end]
    naive = lg[np.arange(len(toks)), ans[:, 0]] - lg[np.arange(len(toks)), ans[:, 1]]
    assert naive.mean() == pytest.approx(doc["numbers"]["F_C"], rel=1e-3, abs=1e-3)


def test_experiment_learned_mask_section(report, model):
    """The learned-mask section: its numbers agree with each other, with the knockout sweep, and with a
    recomputation of the mask circuit's LD by plain patches."""
    import jax.numpy as jnp

    from jinterp import edits as E

    out, doc, raw = report
    num = doc["numbers"]
    kept = raw["mask_kept"]
    L, H = kept.shape
    heads = [f"{l}.{h}" for l, h in np.argwhere(kept)]
    assert num["mask_heads"] == heads and num["mask_n_kept"] == len(heads) >= 1
    circuit = {h for hs in num["classes"].values() for h in hs}
    union, inter = set(heads) | circuit, set(heads) & circuit
    assert num["mask_jaccard"] == pytest.approx(len(inter) / len(union))
    assert set(num["mask_only"]) == set(heads) - circuit and set(num["patching_only"]) == circuit - set(heads)
    assert num["mask_recovered"] == pytest.approx(num["F_mask"] / num["F_M"], rel=1e-6)
    # the sweep's "mask circuit" cell is the mask's complement
    i = list(raw["knockout_names"]).index("mask circuit")
    np.testing.assert_array_equal(raw["knockout_masks"][i] > 0.5, ~kept)
    assert raw["knockout_logit_diff"][i].mean() == pytest.approx(num["F_mask"], rel=1e-5)
    # the masked forward at hard gates (inside masks.fit) equals the knockout sweep
    assert num["mask_metric_kept"] == pytest.approx(num["F_mask"], rel=1e-3, abs=1e-3)
    # and plain patches: every head outside the mask set to its per-template p_ABC mean
    toks, abc, ans, end = raw["tokens"], raw["corrupted"], raw["answers"], raw["end"]
    _, nc = model.run_with_cache(abc, names=lambda n: n.endswith("attn.hook_z"))
    zmean = data.template_means(np.asarray(nc.stack("attn.hook_z")), raw["template"], raw["abba"], axis=1)
    edits = [E.patch("attn.hook_z", jnp.asarray(zmean[l]), layers=[l], heads=[int(x) for x in np.nonzero(~kept[l])[0]])
             for l in range(L) if (~kept[l]).any()]
    lg = np.asarray(model(toks, edits=edits), np.float32)[np.arange(len(toks)), end]
    naive = lg[np.arange(len(toks)), ans[:, 0]] - lg[np.arange(len(toks)), ans[:, 1]]
    assert naive.mean() == pytest.approx(num["F_mask"], rel=1e-3, abs=1e-3)
    by = {c["name"]: c for c in doc["claims"]}
    c = by["a learned head mask (hard-concrete L0) finds the patching circuit"]
    assert c["holds"] == (num["mask_jaccard"] >= 0.5)
    assert (out / "mask_gates.png").is_file() and (out / "mask_heads.csv").is_file()
    assert "6. A learned mask" in (out / "report.md").read_text()
