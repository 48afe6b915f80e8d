"""Retrieval heads: the needle generator, the retrieval-2l organism, batched retrieval scores against a
naive loop, uniform-attention masking against a naive computation, and the experiment (quick mode)."""

import json

import numpy as np
import optax
import pytest

import jinterp
from experiments.data import needles
from jinterp import detect
from jinterp import edits as E
from jinterp.train import loop, organisms

ORG = "retrieval-2l"


@pytest.fixture(scope="module")
def recipe():
    return organisms.recipe(ORG)


@pytest.fixture(scope="module")
def model():
    return jinterp.load(ORG)


# ---------------------------------------------------------------- the generator


def test_generator_places_the_needle(recipe):
    v = recipe.vocab()
    assert v.split == () and v.stop == recipe.tokenizer().convert_tokens_to_ids(".")
    data = needles.grid(v, lengths=(40, 90), depths=(0.0, 0.5, 1.0), n_per_cell=3, n_values=3, seed=0)
    assert len(data) == 18
    filler = set(v.filler.tolist())
    for p, (a, b), ans, n, d in zip(data.prompts, data.spans, data.answers, data.length, data.depth):
        assert len(p) == n and p[0] == v.bos
        assert b - a == 3 and np.array_equal(p[a:b], ans[:-1]) and ans[-1] == v.stop
        key = p[a - 1]
        assert key in v.keys and p[-1] == key and p[-2] == recipe.tokenizer().convert_tokens_to_ids("?")
        assert p[b] == v.stop and set(p[1:a - 1].tolist()) <= filler and set(p[b + 1:-2].tolist()) <= filler
        n_fill = n - 1 - 5 - 2
        assert a - 2 == round(d * n_fill)  # filler words before the needle
    # reproducible, and fresh keys/values per prompt
    again = needles.grid(v, (40, 90), (0.0, 0.5, 1.0), 3, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(data.prompts, again.prompts))
    toks, w = needles.training_batch(np.random.default_rng(0), v, 4, 96)
    assert toks.shape == (4, 96) and w.shape == (4, 95) and (toks[:, 0] == v.bos).all()
    for t, wt in zip(toks, w):  # weighted targets are values or the stop token
        assert set(t[1:][wt > 0].tolist()) <= set(v.values.tolist()) | {v.stop} and wt.sum() >= 3
    assert needles.recall([5, 6, 9, 2, 7], [5, 7, 6, 2], stop=2) == pytest.approx(2 / 3)


def test_generator_on_another_tokenizer_names_missing_words():
    """Any HF tokenizer: words it cannot encode as one token are named and dropped; templates may differ."""
    from experiments.retrieval_heads import NATURAL
    from jinterp.train import hf_export

    template_words = set((NATURAL["needle"] + " " + NATURAL["query"]).split()) - {"{key}", "{value}"}
    words = sorted(template_words) + [w for w in needles.FILLER + needles.KEYS + needles.VALUES
                                      if w not in ("cat", "red", "the") and w not in template_words]
    tok = hf_export.word_tokenizer(words)
    v = needles.Vocab.from_tokenizer(tok, **NATURAL)
    assert {"cat", "red"} <= set(v.split)
    ids, (a, b), ans = needles.prompt(np.random.default_rng(0), v, 120, 0.5)
    assert len(ids) == 120 and np.array_equal(ids[a:b], ans[:-1])
    assert tok.convert_ids_to_tokens(int(ids[a - 1])) == "is" and ids[b] == v.stop
    assert tok.decode(ids[-3:].tolist()).split()[-1] == "is"  # the query ends where the answer starts


# ---------------------------------------------------------------- the organism


def test_organism_finds_needles_on_fresh_prompts(recipe, model):
    m = recipe.evaluate(model, lengths=(48, 160, 248), depths=(0.0, 0.5, 1.0), n_per_cell=4, seed=777)
    assert m["needle_recall"] > 0.6 and m["needle_exact"] > 0.2, m  # bundled: recall 0.74, exact 0.35 (training.json)


@pytest.mark.slow  # the training loop and export run by default in tests/test_bundled.py (train-bundled CLI)
def test_training_step_smoke(recipe, tmp_path):
    v = recipe.vocab()
    cfg = recipe.config(d_model=16, n_heads=2, n_layers=1)
    run = loop.train(cfg, lambda rng: needles.training_batch(rng, v, 2, 48, max_needles=2), optax.adam(1e-3), steps=3,
                     progress=False, log_every=1)
    assert len(run.history) == 3 and all(np.isfinite(l) for _, l in run.history)


# ---------------------------------------------------------------- batched scores vs a naive loop


def _naive_scores(m, prompts, spans, G, stop):
    """Per prompt: unpadded greedy generate, a cached forward, numpy argmax (the paper's code)."""
    L, H = m.cfg.n_layers, m.cfg.n_heads
    total, counted, per = np.zeros((L, H)), 0, []
    for p, (a, b) in zip(prompts, spans):
        P = len(p)
        gen = np.asarray(m.generate(p[None], G, stop_at_eos=False))[0, P:]
        n = int(np.argmax(gen == stop)) + 1 if (gen == stop).any() else G
        gen = gen[:n]
        rec = detect.rouge1_recall(gen[gen != stop], p[a:b])
        _, cache = m.run_with_cache(np.concatenate([p, gen])[None], names=lambda s: s.endswith("hook_pattern"))
        pats = np.asarray(cache.stack("attn.hook_pattern"))[:, 0]  # [L, H, T, T]
        score = np.zeros((L, H))
        for step, w in enumerate(gen):
            q = P - 1 + step
            for l in range(L):
                for h in range(H):
                    j = int(np.argmax(pats[l, h, q, : q + 1]))
                    if a <= j < b and p[j] == w:
                        score[l, h] += 1 / (b - a)
        per.append(score)
        if rec > 0.5:
            total += score
            counted += 1
    return total / max(counted, 1), counted, np.stack(per)


def test_batched_retrieval_scores_equal_the_per_prompt_loop(recipe, model):
    v = recipe.vocab()
    rng = np.random.default_rng(3)
    prompts, spans = [], []
    for n, d in [(30, 0.1), (57, 0.9), (44, 0.5), (71, 0.3)]:
        ids, span, _ = needles.prompt(rng, v, n, d)
        prompts.append(ids)
        spans.append(span)
    # one prompt the model fails (needle span pointed at filler), so the filter matters
    spans[2] = (5, 8)
    got = detect.retrieval_scores(model, prompts, spans, max_new_tokens=6, stop_token=v.stop, return_hits=True,
                                  memory_mb=1)  # tiny chunks: the chunked path too
    ref, counted, per = _naive_scores(model, prompts, spans, 6, v.stop)
    assert got["n_samples"] == counted and 1 <= counted <= 3
    np.testing.assert_allclose(got["hits"], per, atol=1e-12)
    np.testing.assert_allclose(got["scores"], ref, atol=1e-12)
    assert np.asarray(got["scores"]).max() > 0


# ---------------------------------------------------------------- uniform attention


def test_uniform_op_against_naive(model):
    rng = np.random.default_rng(0)
    toks = rng.integers(2, model.cfg.d_vocab, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), bool)
    mask[1, :3] = False  # left padding stays masked
    e = E.uniform_attention(layers=1, heads=[1, 3], pos=None)
    _, c = model.run_with_cache(toks, attention_mask=mask, edits=[e], names=lambda n: "blocks.1.attn" in n)
    pat = np.asarray(c["blocks.1.attn.hook_pattern"])
    v = np.asarray(c["blocks.1.attn.hook_v"])
    z = np.asarray(c["blocks.1.attn.hook_z"])
    _, c0 = model.run_with_cache(toks, attention_mask=mask, names=lambda n: "blocks.1.attn.hook_pattern" in n)
    pat0 = np.asarray(c0["blocks.1.attn.hook_pattern"])
    for b in range(2):
        for q in range(9):
            allowed = mask[b] & (np.arange(9) <= q)
            if not mask[b, q]:
                continue
            for h in range(model.cfg.n_heads):
                if h in (1, 3):
                    want = allowed / allowed.sum()
                    np.testing.assert_allclose(pat[b, h, q], want, atol=1e-6)
                    np.testing.assert_allclose(z[b, q, h], v[b, allowed, h].mean(0), atol=1e-5)
                else:
                    np.testing.assert_allclose(pat[b, h, q], pat0[b, h, q], atol=1e-6)


def test_uniform_on_decoding_steps_matches_a_naive_loop(recipe, model):
    """generate with pos="decode" masks the rows that produce tokens (from the last prompt token on);
    naive: a full forward per step with the heads masked at those positions only."""
    v = recipe.vocab()
    ids, _, _ = needles.prompt(np.random.default_rng(1), v, 60, 0.4)
    P, G = len(ids), 5
    heads = np.zeros(model.cfg.n_heads, bool)
    heads[[0, 2]] = True
    edits = [E.uniform_attention(layers=l, heads=heads) for l in range(model.cfg.n_layers)]
    got = np.asarray(model.generate(ids[None], G, edits=edits, stop_at_eos=False))[0, P:]
    seq = list(ids)
    for _ in range(G):
        rows = list(range(P - 1, len(seq)))
        naive = [E.edit("attn.hook_attn_scores", E.Uniform(), layers=l, heads=heads, pos=rows)
                 for l in range(model.cfg.n_layers)]
        logits = np.asarray(model(np.asarray(seq)[None], edits=naive))[0, -1]
        seq.append(int(logits.argmax()))
    np.testing.assert_array_equal(got, seq[P:])
    # the prefill is not masked: in a forward, pos="decode" touches the last row only
    full = np.asarray(model(ids[None], edits=edits))[0]
    plain = np.asarray(model(ids[None]))[0]
    np.testing.assert_allclose(full[:-1], plain[:-1], atol=1e-6)
    assert not np.allclose(full[-1], plain[-1])
    assert "pos='decode'" in repr(edits[0])
    with pytest.raises(ValueError, match="decode"):
        E.uniform_attention(pos="decoding")


# ---------------------------------------------------------------- the experiment


def test_experiment_quick(tmp_path):
    import experiments

    out = experiments.run("retrieval-heads", tmp_path / "r", quick=True)
    rep = json.loads((out / "report.json").read_text())
    claims = {c["name"]: c for c in rep["claims"]}
    assert len(claims) == 5
    n = rep["numbers"]
    frac = n["fraction_heads_above_0.1_percent"]
    assert 0 < frac <= 100 and n["n_counted"] > 0
    top = [c for k, c in claims.items() if k.startswith("masking the top")][0]
    rnd = [c for k, c in claims.items() if k.startswith("masking") and "random" in k][0]
    assert top["measured"] < rnd["measured"]  # the retrieval heads matter more than random ones
    assert top["holds"] == (top["measured"] < 50)
    assert claims["heads with retrieval score > 0.1 (%)"]["holds"] == (frac <= 6.2)
    for f in ("scores.png", "masking.png", "score_by_length_depth.png", "masking.csv", "top_heads.csv", "raw.npz"):
        assert (out / f).exists(), f
