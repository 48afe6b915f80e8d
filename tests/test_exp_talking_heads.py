"""The list-recall organism and the talking-heads experiment: the Laundry List generator, the card's
metrics re-evaluated, a quick run with its claims, and two numbers recomputed independently (a
per-component composition score by a naive numpy SVD of the HF weights, and one data-check value
by HF torch with the component removed from the HF weights)."""

import json

import numpy as np
import pytest
import torch

import experiments
import jinterp
from experiments import talking_heads as TH
from experiments.data import laundry
from jinterp.train import hf_export, organisms

ORG = TH.ORGANISM


@pytest.fixture(scope="module")
def recipe():
    return organisms.recipe(ORG)


@pytest.fixture(scope="module")
def model():
    return jinterp.load(ORG)


@pytest.fixture(scope="module")
def hf():
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(organisms.models_dir() / ORG), attn_implementation="eager").eval()


# ---------------------------------------------------------------- the generator


def test_rows_follow_the_template(recipe):
    task, v, tok = recipe.task(), recipe.vocab(), recipe.tokenizer()
    for N in (2, 5, recipe.N_MAX):
        b = task.sample(np.random.default_rng(N), 50, N)
        toks = v.ids(b.words())
        assert toks.shape == (50, laundry.prompt_length(N))
        pos = laundry.positions(N)
        for row, items, order, t, ans in zip(toks, b.items, b.order, b.target, b.answer):
            words = tok.convert_ids_to_tokens(row.tolist())
            first = words[pos["items"][0] : pos["items"][-1] + 1]
            again = words[pos["repeats"][0] : pos["repeats"][-1] + 1] if N > 1 else []
            assert words[:2] == ["<|endoftext|>", "packed"] and words[pos["end"]] == "left" and words[N + 2 : N + 4] == [".", "took"]
            assert len(set(first)) == N and first == [task.item_words[i] for i in items]
            assert sorted(again) == sorted(w for k, w in enumerate(first) if k != t)  # all but the answer, once each
            assert task.item_words[ans] == first[t] and first[t] not in again
    toks, w = laundry.training_batch(task, v, np.random.default_rng(0), 64, recipe.N_CTX, recipe.N_RANGE)
    for row, wt in zip(toks, w):
        a, e = np.flatnonzero(wt)  # the answer (predicted at END) and the EOS after it
        words = tok.convert_ids_to_tokens(row[: a + 1].tolist())
        assert words[-1] == "left" and row[e + 1] == v.bos
        N = (a + 1 - 5) // 2
        first, again = words[2 : N + 2], words[N + 4 : 2 * N + 3]
        assert tok.convert_ids_to_tokens(int(row[a + 1])) == (set(first) - set(again)).pop()


def test_bad_input_is_named(recipe, model):
    task = recipe.task()
    with pytest.raises(laundry.ListTooLongError, match="not supported.*2 to 8"):
        task.sample(np.random.default_rng(0), 4, recipe.N_MAX + 1)
    with pytest.raises(laundry.ListTooLongError):
        TH.dataset(model, 0, 4, lengths=[3, recipe.N_MAX + 1])
    with pytest.raises(laundry.MissingWordError, match="not single tokens") as e:
        laundry.Vocab(hf_export.word_tokenizer(["packed", ".", "took", "left", "sock"]), task)
    assert "shirt" in str(e.value)
    with pytest.raises(ValueError, match="tokenizer"):
        TH.dataset(jinterp.Model(model.cfg, model.params), 0, 4)
    with pytest.raises(ValueError, match="at least 4"):
        TH.run(model, None, batch=2)


def test_bpe_vocabulary_reads_words_after_a_space():
    """A GPT-2-style byte-level BPE vocabulary writes a word after a space as one token ("Ġsock")."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    words = list(laundry.LaundryList().words)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" " + " ".join(words)] * 5, vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    v = laundry.Vocab(tok)
    assert all(tok.convert_ids_to_tokens(v.id[w]) == "Ġ" + w for w in words)


# ---------------------------------------------------------------- the organism


def test_card_metrics_match_the_model(recipe, model):
    card = json.loads((organisms.models_dir() / ORG / "training.json").read_text())
    got = recipe.evaluate(model.params, model.cfg)
    for N, a in card["metrics"]["accuracy_by_n"].items():  # 1000 prompts per N: a few near ties may fall the other way
        assert got["accuracy_by_n"][N] == pytest.approx(a, abs=5e-3), N
    acc = [got["accuracy_by_n"][str(N)] for N in range(2, recipe.N_MAX + 1)]
    assert acc[0] > 0.9 and acc[0] - acc[-1] > 0.1  # learnt, and worse on long lists


@pytest.mark.slow  # the training loop and export run by default in tests/test_bundled.py (train-bundled CLI)
def test_recipe_training_smoke(recipe, tmp_path):
    card = recipe.train(tmp_path / "m", steps=3, progress=False, log_every=1)
    m = jinterp.load(tmp_path / "m")
    assert m.cfg.n_layers == 2 and len(card["loss_history"]) == 3 and (tmp_path / "m" / "training_curve.png").is_file()
    assert set(card["metrics"]["accuracy_by_n"]) == {str(N) for N in range(2, recipe.N_MAX + 1)}


# ---------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def th(tmp_path_factory):
    out = experiments.run("talking-heads", tmp_path_factory.mktemp("th") / "r", quick=True, seed=0)
    return out, json.loads((out / "report.json").read_text()), np.load(out / "talking_heads.npz")


def test_quick_report_has_the_claims(th):
    out, doc, raw = th
    names = [c["name"] for c in doc["claims"]]
    assert len(names) == 7 and "accuracy falls as the list grows" in names
    assert sum("improves accuracy" in n for n in names) == 3
    assert all(c["paper"] is not None and c["measured"] is not None and c["note"] for c in doc["claims"])
    n = doc["numbers"]
    assert n["n_prompts"] == 24 * 7 and len(n["index_subspace"]["components"]) == TH.N_DIMS
    for f in ("report.md", "composition.png", "data_check.png", "accuracy.png", "channels.csv", "interventions.csv"):
        assert (out / f).is_file(), f
    basis = raw["basis"]
    assert np.allclose(basis.T @ basis, np.eye(TH.N_DIMS), atol=1e-8)


def _folded(hf, layer):
    """Numpy W_Q, W_K, W_V [H, D, dh] (ln_1's weight folded in, centred over d_model) and W_O [H, dh, D]
    (centred) of one HF GPT-2 block: TransformerLens's fold_ln + centre_writing_weights."""
    blk = hf.transformer.h[layer]
    cfg = hf.config
    D, H = cfg.n_embd, cfg.n_head
    dh = D // H
    W = blk.attn.c_attn.weight.detach().double().numpy() * blk.ln_1.weight.detach().double().numpy()[:, None]  # [D, 3D]
    W = W - W.mean(0, keepdims=True)
    q, k, v = (W[:, i * D : (i + 1) * D].reshape(D, H, dh).transpose(1, 0, 2) for i in range(3))
    O = blk.attn.c_proj.weight.detach().double().numpy().reshape(H, dh, D)
    return q, k, v, O - O.mean(-1, keepdims=True)


def test_composition_score_by_naive_numpy_svd(th, hf):
    """CS_r = ||v_r QK||_2 / ||QK||_F for every component of every writer into the reader, from a
    full D x D SVD of each folded OV in numpy (no factored matrices)."""
    out, doc, raw = th
    lr, hr = (int(x) for x in doc["numbers"]["reader"][1:].split("H"))
    q, k, _, _ = _folded(hf, lr)
    QK = q[hr] @ k[hr].T
    cs = raw["composition"]
    for l in range(lr):
        _, _, v, O = _folded(hf, l)
        for h in range(hf.config.n_head):
            _, s, vt = np.linalg.svd(v[h] @ O[h])
            dh = O.shape[1]
            want = np.linalg.norm(vt[:dh] @ QK, axis=-1) / np.linalg.norm(QK)
            assert cs[l, h] == pytest.approx(want, abs=1e-4), (l, h)


def test_data_check_value_by_hf_torch(th, model, hf):
    """The top data-check value: the writer's component removed from the HF weights (c_proj rows of
    that head projected off v_r), the reader's attention at END summed over the repeated items' slots."""
    out, doc, raw = th
    lr, hr = (int(x) for x in doc["numbers"]["reader"][1:].split("H"))
    delta = raw["data_delta"]
    l, h, r = np.unravel_index(int(np.nanargmax(np.abs(delta))), delta.shape)
    p = TH.dataset(model, 0, 24)
    dev = p.take(np.arange(len(p)) % 2 == 0)
    _, _, v, O = _folded(hf, l)
    _, _, vt = np.linalg.svd(v[h] @ O[h])
    u = torch.tensor(vt[r])
    dh = O.shape[1]

    def attn_to_repeats():
        with torch.no_grad():
            att = hf(torch.tensor(dev.tokens, dtype=torch.long), output_attentions=True).attentions[lr][:, hr]  # [n, Q, K]
        rows = att[torch.arange(len(dev)), torch.tensor(dev.end)].double().numpy()
        return float((rows * dev.slots).sum(-1).mean())

    before = attn_to_repeats()
    w = hf.transformer.h[l].attn.c_proj.weight  # Conv1D [in = H * dh, out = D]
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            rows = w[h * dh : (h + 1) * dh].double()
            w[h * dh : (h + 1) * dh] = (rows - (rows @ u)[:, None] * u[None]).float()
        after = attn_to_repeats()
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert doc["numbers"]["data_check"]["attention_to_repeats"] == pytest.approx(before, abs=1e-4)
    assert delta[l, h, r] == pytest.approx(after - before, abs=1e-4)
