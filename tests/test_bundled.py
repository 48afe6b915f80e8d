"""The bundled induction model: HF loads it, its card is true, its mechanism is there."""

import json

import numpy as np
import pytest
import torch

import jinterp
from jinterp import detect, train
from jinterp.loading import MODELS_DIR

PATH = MODELS_DIR / "induction-2l"


@pytest.fixture(scope="module")
def model():
    return jinterp.load("induction-2l")


def test_bundled_listed_and_loads(model):
    assert "induction-2l" in jinterp.bundled()
    assert model.cfg.n_layers == 2 and model.tokenizer is not None


def test_hf_loads_it_and_agrees(model):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(PATH)).eval()
    toks = train.induction_batch(np.random.default_rng(0), 4, 20, model.cfg.d_vocab)
    with torch.no_grad():
        ref = hf(torch.as_tensor(toks).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(toks)), ref, atol=2e-5)
    tok = AutoTokenizer.from_pretrained(str(PATH))
    assert tok.decode(tok("apple river")["input_ids"]) == "apple river"
    assert model.to_str_tokens("apple river") == ["<|endoftext|>", "apple", "river"]


def test_card_metrics_hold_under_hf_torch():
    """Accuracy and loss on the repeated half, recomputed with HF torch, match training.json."""
    from transformers import GPT2LMHeadModel

    card = json.loads((PATH / "training.json").read_text())["metrics"]
    hf = GPT2LMHeadModel.from_pretrained(str(PATH)).eval()
    toks = torch.as_tensor(train.induction_batch(np.random.default_rng(1234), 512, 20, hf.config.vocab_size)).long()
    with torch.no_grad():
        logp = torch.log_softmax(hf(toks).logits[:, :-1].float(), -1)
    tgt = toks[:, 1:]
    nll = -logp.gather(-1, tgt[..., None])[..., 0]
    rep = slice(21, 40)
    acc = (logp.argmax(-1) == tgt)[:, rep].float().mean().item()
    assert abs(acc - card["accuracy_repeated_half"]) < 1e-3
    assert abs(nll[:, rep].mean().item() - card["loss_repeated_half"]) < 1e-3
    assert acc > 0.85 and nll[:, :20].mean().item() > 4.5


def test_mechanism_previous_token_then_induction(model):
    toks = train.induction_batch(np.random.default_rng(5), 32, 20, model.cfg.d_vocab)
    s = detect.head_scores(model, toks)
    assert s["previous_token"][0].max() > 0.4 and s["previous_token"][1].max() < 0.2
    assert s["induction"][1].max() > 0.6 and s["induction"][0].max() < 0.2


def test_training_runs_and_writes_hf_format(tmp_path):
    card = train.train_induction_model(tmp_path / "m", steps=20, batch=8, progress=False)
    assert set(card["metrics"]) >= {"loss_repeated_half", "accuracy_repeated_half"}
    m = jinterp.load(tmp_path / "m")
    assert m.cfg.d_vocab == train.induction_config().d_vocab
    assert np.isfinite(np.asarray(m(np.array([[0, 5, 6, 7]])))).all()
