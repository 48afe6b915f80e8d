"""The attribution-graph experiment: a quick run on induction-2l with its shipped transcoders, its
claims and files, and the intervention's logit change recomputed by a plain numpy GPT-2 forward
(weights read from the HF safetensors files, attention patterns frozen at the clean run's, the
ablated transcoder features subtracted from the MLP outputs by hand)."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import experiments
from experiments import attribution_graph as AG
from jinterp.train import organisms

CLAIMS = ("token after the earlier occurrence", "feature path", "induction heads", "K-composition", "lowers the answer")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return experiments.run("attribution-graph", tmp_path_factory.mktemp("ag") / "report", quick=True)


def _ln(x, w, b, eps=1e-5):
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w + b


def _gelu_new(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _forward(W, T, toks, n_layers, n_heads, patterns=None, ablate=()):
    """Logits [P, V] of one prompt, float64. patterns: per-layer [H, P, P] to use instead of softmax(QK);
    ablate: (layer, pos, feature) transcoder features whose current activation x W_dec is removed from
    that layer's MLP output. Returns (logits, the patterns used)."""
    P = len(toks)
    h = W["transformer.wte.weight"][toks] + W["transformer.wpe.weight"][:P]
    used = []
    for l in range(n_layers):
        p = lambda name: W[f"transformer.h.{l}.{name}"]  # noqa: E731
        a = _ln(h, p("ln_1.weight"), p("ln_1.bias"))
        q, k, v = np.split(a @ p("attn.c_attn.weight") + p("attn.c_attn.bias"), 3, axis=-1)
        q, k, v = (t.reshape(P, n_heads, -1).transpose(1, 0, 2) for t in (q, k, v))
        if patterns is None:
            s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
            s = np.where(np.tril(np.ones((P, P), bool)), s, -np.inf)
            pat = np.exp(s - s.max(-1, keepdims=True))
            pat /= pat.sum(-1, keepdims=True)
        else:
            pat = patterns[l]
        used.append(pat)
        z = (pat @ v).transpose(1, 0, 2).reshape(P, -1)
        h = h + z @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        x = _ln(h, p("ln_2.weight"), p("ln_2.bias"))
        mlp = _gelu_new(x @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
        for layer, pos, f in ablate:
            if layer == l:
                act = max(0.0, float(x[pos] @ T[l]["W_enc"][f] + T[l]["b_enc"][f]))
                mlp[pos] -= act * T[l]["W_dec"][f]
        h = h + mlp
    return _ln(h, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"]) @ W["transformer.wte.weight"].T, used


def test_quick_run_claims_and_files(out):
    doc = json.loads((out / "report.json").read_text())
    names = [c["name"] for c in doc["claims"]]
    assert len(names) == 5 and all(any(key in n for n in names) for key in CLAIMS)
    for c in doc["claims"]:
        assert c["paper"] and c["measured"] is not None and c["note"].startswith("holds if")
    for f in ("report.md", "induction-0.json", "graph-metadata.json", "graph.png", "graph.html", "graph0.npz",
              "influence.csv", "head_loadings.csv", "intervention.csv"):
        assert (out / f).stat().st_size > 0, f
    g = json.loads((out / "induction-0.json").read_text())
    assert g["nodes"] and g["links"] and g["metadata"]["slug"] == "induction-0"
    assert "top_activations" in (out / "graph.html").read_text()
    num = doc["numbers"]
    assert num["previous_token_heads"] == "L0H0, L0H1" and num["induction_heads"] == "L1H0, L1H1"
    assert 0 < num["replacement_score_mean"] <= 1 and 0 < num["completeness_score_mean"] <= 1
    assert num["edge_check_max_abs_diff"] < 1e-4  # the graph's edge = the frozen forward's effect


def test_intervention_recomputed_by_numpy(out):
    num = json.loads((out / "report.json").read_text())["numbers"]
    path = organisms.models_dir() / AG.ORGANISM
    W = {k: v.astype(np.float64) for k, v in load_file(str(path / "model.safetensors")).items()}
    T = [{k: v.astype(np.float64) for k, v in load_file(str(path / "dictionaries" / "transcoders" / f"layer_{l}.safetensors")).items()}
         for l in range(2)]
    toks = np.load(out / "attribution_graph.npz")["tokens"][0]
    END, answer = len(toks) - 1, toks[int(num["prompt_layout"].split("j+1=")[1])]
    ablate = [tuple(int(x) for x in s[1:].replace("P", " ").replace("F", " ").split()) for s in num["intervention_features"][0].split()]
    clean, pats = _forward(W, T, toks, 2, 2)
    new, _ = _forward(W, T, toks, 2, 2, patterns=pats, ablate=ablate)
    d = lambda lg: lg[END, answer] - lg[END].mean()  # noqa: E731
    assert clean[END].argmax() == answer
    np.testing.assert_allclose(d(new) - d(clean), num["intervention_demeaned_logit_change"][0], atol=2e-4, rtol=1e-4)
    assert d(new) < d(clean)
