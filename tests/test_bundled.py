"""The bundled induction model: HF loads it, its card is true, its mechanism is there."""

import json

import jax
import numpy as np
import pytest
import torch

import jinterp
from jinterp import detect
from jinterp.config import Config
from jinterp.train import hf_export, loop, organisms

PATH = organisms.models_dir() / "induction-2l"
induction = organisms.recipe("induction-2l")


@pytest.fixture(scope="module")
def model():
    return jinterp.load("induction-2l")


def test_bundled_listed_and_loads(model):
    assert "induction-2l" in jinterp.bundled()
    assert model.cfg.n_layers == 2 and model.tokenizer is not None


def test_hf_loads_it_and_agrees(model):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(PATH)).eval()
    toks = induction.induction_batch(np.random.default_rng(0), 4, 20, model.cfg.d_vocab)
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
    toks = torch.as_tensor(induction.induction_batch(np.random.default_rng(1234), 512, 20, hf.config.vocab_size)).long()
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
    toks = induction.induction_batch(np.random.default_rng(5), 32, 20, model.cfg.d_vocab)
    s = detect.head_scores(model, toks)
    assert s["previous_token"][0].max() > 0.4 and s["previous_token"][1].max() < 0.2
    assert s["induction"][1].max() > 0.6 and s["induction"][0].max() < 0.2


def test_recipe_loader():
    assert "induction-2l" in organisms.available()
    assert organisms.recipe("induction-2l") is induction  # imported once
    assert induction.VOCAB_SIZE == jinterp.load("induction-2l").cfg.d_vocab
    with pytest.raises(FileNotFoundError, match="induction-2l"):
        organisms.recipe("no-such-organism")


def test_train_bundled_cli_writes_hf_format(tmp_path):
    """`jinterp train-bundled` (a few steps): the recipe trains, writes HF files, and the card's
    metrics are those of the model as loaded back."""
    from typer.testing import CliRunner

    from jinterp.cli import app

    res = CliRunner().invoke(app, ["train-bundled", "induction-2l", "--out", str(tmp_path / "m"), "--steps", "5"])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "m" / "training.json").read_text())
    assert card["recipe"]["steps"] == 5 and [s for s, _ in card["loss_history"]] == [1]
    m = jinterp.load(tmp_path / "m")
    want = induction.induction_config()
    for field in ("family", "n_layers", "d_model", "n_heads", "d_mlp", "d_vocab", "n_ctx", "act", "tied_embeddings"):
        assert getattr(m.cfg, field) == getattr(want, field), field
    assert m.to_str_tokens("apple zinc") == ["<|endoftext|>", "apple", "zinc"]
    again = induction.evaluate(m.params, m.cfg)
    for k, v in card["metrics"].items():
        assert abs(again[k] - v) < 1e-5, k
    assert card["metrics"]["accuracy_repeated_half"] < 0.2  # 5 steps learn nothing: the bundled model did


def test_loop_any_family_deterministic():
    """The generic loop on a Llama-shaped config (RMSNorm, rotary, GQA, untied, no biases): same seed,
    same parameters; left-out leaves are filled (zeros, or W_E^T when tied); the loss goes down."""
    import optax

    cfg = Config(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=50,
                 n_ctx=32, norm="rmsnorm", positional="rotary", rotary_dim=8, act="silu")
    p = loop.init_params(cfg, jax.random.PRNGKey(0), biases=False)
    assert "b_Q" not in p["blocks"]["attn"] and "ln_final" in p and "W_U" in p["unembed"]
    full = loop.complete(p, cfg)
    assert not np.asarray(full["blocks"]["attn"]["b_Q"]).any() and full["unembed"]["b_U"].shape == (50,)
    tied = loop.complete(loop.init_params(induction.induction_config(), jax.random.PRNGKey(0)), induction.induction_config())
    np.testing.assert_array_equal(tied["unembed"]["W_U"], tied["embed"]["W_E"].T)

    def batches(rng):  # counting from a random start: learnable within a few steps
        return (rng.integers(0, 50, (8, 1)) + np.arange(16)) % 50

    opt = optax.adam(1e-2)
    runs = [loop.train(cfg, batches, opt, steps=12, seed=3, log_every=4, progress=False) for _ in range(2)]
    assert [s for s, _ in runs[0].history] == [1, 4, 8, 12]
    assert runs[0].history == runs[1].history
    jax.tree.map(np.testing.assert_array_equal, runs[0].params, runs[1].params)
    assert runs[0].history[-1][1] < runs[0].history[0][1] - 1.0
    with pytest.raises(ValueError, match="GPT-2"):
        hf_export.save_hf(runs[0].params, cfg, "unused")


@pytest.mark.slow
def test_retraining_reproduces_the_bundled_model(tmp_path):
    """The recipe at its defaults gives the bundled model back: same recipe, the card's metrics and
    loss curve (to float drift over 3000 steps), and the same circuit."""
    card = induction.train(tmp_path / "m", progress=False)
    bundled = json.loads((PATH / "training.json").read_text())
    assert card["recipe"] == bundled["recipe"]
    for k, v in bundled["metrics"].items():
        assert abs(card["metrics"][k] - v) < 0.01, k
    assert [s for s, _ in card["loss_history"]] == [s for s, _ in bundled["loss_history"]]
    np.testing.assert_allclose([l for _, l in card["loss_history"]], [l for _, l in bundled["loss_history"]], atol=0.01)
    m = jinterp.load(tmp_path / "m")
    s = detect.head_scores(m, induction.induction_batch(np.random.default_rng(5), 32, 20, m.cfg.d_vocab))
    assert s["previous_token"][0].max() > 0.4 and s["induction"][1].max() > 0.6
