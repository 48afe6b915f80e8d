"""Attribution graphs out: the viewer's JSON against circuit-tracer's own, the PNG, the HTML page in
headless Chromium, top activations against a naive loop, and feature interventions / transcoder
splicing against a hand-written HF torch forward.

The JSON fixtures in tests/fixtures/graphs/ were written by circuit-tracer 0.5.0's
`create_graph_files` (tests/fixtures/graphs/make_graph_json_fixture.py, run in a side venv) from the
hand-made graph saved next to them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jinterp
from jinterp import saes
from jinterp.saes import graph_export as GE
from jinterp.saes import graph_html as GH
from jinterp.saes import influence
from jinterp.saes.graph import Graph
from jinterp.saes.intervene import intervene
from jinterp.saes.splicing import splice_transcoder
from tests import hf_zoo

FIX = Path(__file__).parent / "fixtures" / "graphs"
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def tiny():
    d = np.load(FIX / "tiny_graph.npz")
    g = Graph(tokens=d["tokens"], active_features=d["active_features"], activation_values=d["activation_values"],
              selected_features=d["selected_features"], adjacency=d["adjacency"], logit_tokens=d["logit_tokens"],
              logit_probabilities=d["logit_probabilities"], n_layers=int(d["n_layers"]), n_pos=len(d["tokens"]),
              vocab_size=len(d["vocab"]))
    vocab = [str(v) for v in d["vocab"]]
    return g, d, (lambda i: vocab[i])


def same(a, b, where="", tol=2e-6):
    """Field by field: floats to tol, everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{where}: {a!r} vs {b!r}"
        assert abs(a - b) <= tol * max(1.0, abs(b)), f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}", tol)
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]", tol)
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} vs {b!r}"


def test_json_matches_circuit_tracer(tiny, tmp_path):
    g, d, tok = tiny
    for tag, (nt, et) in {"a": (0.8, 0.98), "b": (0.6, 0.9)}.items():  # our pruning is circuit-tracer's
        nm, em, cs = influence.prune(g, nt, et)
        np.testing.assert_array_equal(nm, d[f"node_mask_{tag}"])
        np.testing.assert_array_equal(em, d[f"edge_mask_{tag}"])
        np.testing.assert_allclose(cs, d[f"cumulative_scores_{tag}"], atol=1e-6)
    GE.to_json(g, tmp_path, slug="tiny-a", tokenizer=tok, scan="tiny-scan")
    GE.to_json(g, tmp_path, slug="tiny-b", tokenizer=tok, scan="other-scan", node_threshold=0.6, edge_threshold=0.9)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        GE.to_json(g, tmp_path, slug="tiny-a", tokenizer=tok, scan="tiny-scan")
    GE.to_json(g, tmp_path, slug="tiny-a", tokenizer=tok, scan="tiny-scan", overwrite=True)  # replaces its metadata entry
    for name in ("tiny-a.json", "tiny-b.json", "graph-metadata.json"):
        same(json.loads((tmp_path / name).read_text()), json.loads((FIX / "ct" / name).read_text()), name)


def test_json_bad_input(tiny, tmp_path):
    g, _, tok = tiny
    with pytest.raises(ValueError, match="slug"):
        GE.to_json(g, tmp_path, slug="../x", scan="s")
    with pytest.raises(ValueError, match="scan="):
        GE.to_json(g, tmp_path, slug="x")
    with pytest.raises(ValueError, match="node_threshold"):
        GE.to_json(g, tmp_path, slug="x", scan="s", node_threshold=1.5)
    with pytest.raises(ValueError, match="do not belong together"):
        GE.to_json(Graph(**{**g.__dict__, "adjacency": g.adjacency[:-1, :-1]}), tmp_path, slug="x", scan="s")
    with pytest.raises(ValueError, match="pruned must be"):
        GE.to_json(g, tmp_path, slug="x", scan="s", pruned=(np.ones(3, bool), np.ones((3, 3), bool), np.ones(3)))
    (tmp_path / "graph-metadata.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a graph-metadata file"):
        GE.to_json(g, tmp_path, slug="x", scan="s")
    with pytest.raises(TypeError, match="tokenizer"):
        GE.to_json(g, tmp_path / "other", slug="x", scan="s", tokenizer=3)


def test_png(tiny, tmp_path):
    g, d, tok = tiny
    fig = GE.to_png(g, tmp_path / "g.png", tokenizer=tok)
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((FIX / "ct" / "tiny-a.json").read_text())
    ax = fig.axes[0]
    (lines,) = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    assert len(lines.get_segments()) == len(doc["links"])
    n_points = sum(len(c.get_offsets()) for c in ax.collections if c.__class__.__name__ == "PathCollection")
    assert n_points == len(doc["nodes"])
    assert [t.get_text() for t in ax.get_xticklabels()] == [tok(int(t)) for t in d["tokens"]]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(f"Chromium is needed to check the HTML page; install it: {CHROMIUM_INSTALL}")
    return exe


def dump_dom(page: Path, tmp_path, fragment="selftest") -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", f"{page.resolve().as_uri()}#{fragment}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_html_renders_in_chromium(tiny, tmp_path):
    g, _, tok = tiny
    evil = "</script><script>document.title='pwned'</script>"
    top = {(0, 7): [(["<bos>", " the", evil, " sat"], 2, 2.5), (["a", "b"], 0, 1.25)]}
    page = GH.to_html(g, tmp_path / "graph.html", tokenizer=tok, top_activations=top)
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text  # nothing fetched
    doc = json.loads((FIX / "ct" / "tiny-a.json").read_text())
    dom = dump_dom(page, tmp_path)
    assert re.search(r"<title>(.*?)</title>", dom).group(1) == f"ok:{len(doc['nodes'])}"
    assert f'<div id="status">{len(doc["nodes"])} nodes, {len(doc["links"])} edges</div>' in dom
    assert dom.count('class="node ') == len(doc["nodes"]) and dom.count('class="edge ') == len(doc["links"])
    # #selftest selects the first feature node: its edges and its top activations, the hit token highlighted
    first = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    assert f'<h3 id="selected">L0 F7  [{first["node_id"]}]</h3>' in dom
    n_in = sum(l["target"] == first["node_id"] for l in doc["links"])
    n_out = sum(l["source"] == first["node_id"] for l in doc["links"])
    assert f"Incoming edges ({n_in})" in dom and f"Outgoing edges ({n_out})" in dom
    assert "Top activations (2)" in dom
    assert '<span class="hit">&lt;/script&gt;&lt;script&gt;document.title=\'pwned\'&lt;/script&gt;</span>' in dom
    # a node named in the fragment is selected; a feature without top activations says so
    dom = dump_dom(page, tmp_path, fragment="0_5_4")
    assert '<h3 id="selected">L0 F5  [0_5_4]</h3>' in dom and "none given" in dom


def test_html_bad_input(tiny, tmp_path):
    g, _, _ = tiny
    with pytest.raises(ValueError, match="position 5"):
        GH.to_html(g, tmp_path / "x.html", top_activations={(0, 7): [(["a"], 5, 1.0)]})
    with pytest.raises(ValueError, match="keys must be"):
        GH.to_html(g, tmp_path / "x.html", top_activations={"0_7": [(["a"], 0, 1.0)]})


# ---------------------------------------------------------------------------------------------
# on a model: a tiny random GPT-2 with random per-layer transcoders (mlp.hook_in -> hook_mlp_out)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    hf = hf_zoo.build("gpt2")
    model = jinterp.load(hf_zoo.save(hf, tmp_path_factory.mktemp("gpt2")))
    L, D, n = model.config.n_layers, model.config.d_model, 24
    r = np.random.default_rng(0)
    w = dict(W_enc=r.normal(0, 0.4, (L, D, n)), b_enc=r.normal(-0.3, 0.2, (L, n)), W_dec=r.normal(0, 0.2, (L, n, D)),
             b_dec=r.normal(0, 0.1, (L, D)))
    w = {k: v.astype(np.float32) for k, v in w.items()}
    tc = saes.Dictionary(**{k: jnp.asarray(v) for k, v in w.items()}, site="mlp.hook_in",
                         out_site="hook_mlp_out", layers=tuple(range(L)))
    tokens = np.random.default_rng(1).integers(0, model.config.d_vocab, (2, 9))
    return hf, model, tc, w, tokens


@contextlib.contextmanager
def torch_splice(hf, w, sets, *, keep_error=True, frozen=None):
    """HF GPT-2 with each MLP output rewritten from its ln_2 output x: f = relu(x W_enc + b_enc),
    g = f with sets[(layer, pos, feature)] = value; out + (g - f) W_dec (keep_error) or g W_dec + b_dec.
    W_dec [L, n, D] per layer, or [L source, L output, n, D] (cross-layer: layer l's output adds
    every earlier layer's (g - f) W_dec[i, l]). frozen: attention probabilities [L][B, H, P, P] used
    instead of the computed ones."""
    from transformers.models.gpt2 import modeling_gpt2

    T = {k: torch.tensor(v) for k, v in w.items()}
    L = len(hf.transformer.h)
    if T["W_dec"].ndim == 3:  # per layer: the diagonal of the cross-layer form
        T["W_dec"] = torch.stack([torch.stack([T["W_dec"][i] * (i == l) for l in range(L)]) for i in range(L)])
    xin, fg, handles = {}, {}, []
    for l, block in enumerate(hf.transformer.h):
        handles.append(block.ln_2.register_forward_hook(lambda m, a, o, l=l: xin.__setitem__(l, o)))

        def mlp_hook(m, a, out, l=l):
            f = torch.relu(xin[l] @ T["W_enc"][l] + T["b_enc"][l])
            g = f.clone()
            for (sl, p, feat), v in sets.items():
                if sl == l:
                    g[:, p, feat] = v
            fg[l] = f, g
            if keep_error:
                return out + sum((fg[i][1] - fg[i][0]) @ T["W_dec"][i, l] for i in range(l + 1))
            return sum(fg[i][1] @ T["W_dec"][i, l] for i in range(l + 1)) + T["b_dec"][l]

        handles.append(block.mlp.register_forward_hook(mlp_hook))
    original = modeling_gpt2.eager_attention_forward
    if frozen is not None:
        def fixed(module, query, key, value, attention_mask, **kw):
            p = frozen[module.layer_idx]
            return torch.matmul(p, value).transpose(1, 2), p

        modeling_gpt2.eager_attention_forward = fixed
    try:
        yield
    finally:
        modeling_gpt2.eager_attention_forward = original
        for h in handles:
            h.remove()


def torch_logits(hf, tokens, w, sets=None, **kw):
    with torch.no_grad(), torch_splice(hf, w, sets or {}, **kw):
        return hf(torch.tensor(tokens)).logits.numpy()


def test_intervene_matches_torch(gpt2):
    hf, model, tc, w, tokens = gpt2
    clean = np.asarray(model(tokens))
    with torch.no_grad():
        hf_clean = hf(torch.tensor(tokens), output_attentions=True)
    np.testing.assert_allclose(torch_logits(hf, tokens, w), hf_clean.logits.numpy(), atol=1e-5)  # the hooks change nothing
    # no intervention: the splice (transcoder + error term) is the identity
    np.testing.assert_allclose(np.asarray(intervene(model, tc, tokens, [], freeze_attention=False)), clean, atol=1e-6)
    sets = {(0, 3, 5): 0.0, (0, 6, 2): 4.0, (1, 6, 7): 2.5, (2, -1, 11): 0.0}
    ivs = [(l, p, f, v) for (l, p, f), v in sets.items()]
    loose = np.asarray(intervene(model, tc, tokens, ivs, freeze_attention=False))  # same program as above
    np.testing.assert_allclose(loose, torch_logits(hf, tokens, w, sets), atol=1e-4)
    assert np.abs(loose - clean).max() > 1e-2  # the interventions matter
    frozen = np.asarray(intervene(model, tc, tokens, ivs))
    np.testing.assert_allclose(frozen, torch_logits(hf, tokens, w, sets, frozen=list(hf_clean.attentions)), atol=1e-4)
    assert np.abs(frozen - loose).max() > 1e-4  # freezing the attention patterns made a difference


def test_splice_transcoder_replacement_matches_torch(gpt2):
    hf, model, tc, w, tokens = gpt2
    got = np.asarray(model(tokens, edits=splice_transcoder(tc, keep_error=False)))
    np.testing.assert_allclose(got, torch_logits(hf, tokens, w, keep_error=False), atol=1e-4)
    # one layer's transcoder, a feature set at one position (the other layers' splices are the identity)
    got = np.asarray(model(tokens, edits=splice_transcoder(tc[1], set_features=[(1, 4, 3, 2.0)])))
    np.testing.assert_allclose(got, torch_logits(hf, tokens, w, {(1, 4, 3): 2.0}), atol=1e-4)


def test_cross_layer_intervene_matches_torch(gpt2):
    """A cross-layer transcoder: a feature set at layer i moves every later layer's MLP output too."""
    hf, model, tc, w, tokens = gpt2
    L, n, D = w["W_dec"].shape
    r = np.random.default_rng(5)
    W = np.zeros((L, L, n, D), np.float32)
    for i in range(L):
        W[i, i:] = r.normal(0, 0.2, (L - i, n, D))
    clt = saes.CrossLayerTranscoder(W_enc=tc.W_enc, b_enc=tc.b_enc, b_dec=tc.b_dec, site=tc.site, out_site=tc.out_site,
                                    W_dec=tuple(jnp.asarray(np.moveaxis(W[i, i:], 0, 1)) for i in range(L)))
    wc = dict(w, W_dec=W)
    sets = {(0, 3, 5): 0.0, (0, 6, 2): 4.0, (1, 6, 7): 2.5, (2, -1, 11): 0.0}
    ivs = [(l, p, f, v) for (l, p, f), v in sets.items()]
    with torch.no_grad():
        attn = list(hf(torch.tensor(tokens), output_attentions=True).attentions)
    loose = np.asarray(intervene(model, clt, tokens, ivs, freeze_attention=False))
    np.testing.assert_allclose(loose, torch_logits(hf, tokens, wc, sets), atol=1e-4)
    frozen = np.asarray(intervene(model, clt, tokens, ivs))
    np.testing.assert_allclose(frozen, torch_logits(hf, tokens, wc, sets, frozen=attn), atol=1e-4)
    per_layer = np.asarray(intervene(model, tc.replace(W_dec=jnp.asarray(W[np.arange(L), np.arange(L)])), tokens, ivs))
    assert np.abs(frozen - per_layer).max() > 1e-2  # the cross-layer decoder rows matter
    replaced = np.asarray(intervene(model, clt, tokens, ivs, keep_error=False, freeze_attention=False))
    np.testing.assert_allclose(replaced, torch_logits(hf, tokens, wc, sets, keep_error=False), atol=1e-4)


@pytest.mark.slow  # builds a graph
def test_cross_layer_constrained_intervention_matches_graph_edges(gpt2):
    """As for per-layer transcoders: doubling a cross-layer feature (direct effects only) moves each
    demeaned target logit by its adjacency column."""
    hf, model, tc, w, tokens = gpt2
    L, n, D = w["W_dec"].shape
    r = np.random.default_rng(6)
    clt = saes.CrossLayerTranscoder(W_enc=tc.W_enc, b_enc=tc.b_enc, b_dec=tc.b_dec, site=tc.site, out_site=tc.out_site,
                                    W_dec=tuple(jnp.asarray(r.normal(0, 0.2, (n, L - i, D)), jnp.float32) for i in range(L)))
    g = saes.attribute(model, clt, tokens[0])
    clean = np.asarray(model(tokens[0]))[0, -1]
    for j in (0, g.n_features - 1):
        l, p, f = (int(v) for v in g.features[j])
        a = float(g.activation_values[g.selected_features[j]])
        d = np.asarray(intervene(model, clt, tokens[0], [(l, p, f, 2 * a)], constrained=True))[-1] - clean
        np.testing.assert_allclose((d - d.mean())[g.logit_tokens], g.adjacency[g.logit_nodes, j], atol=2e-5, rtol=1e-3)


@pytest.mark.slow  # builds a graph (saes.attribute: two more compiled programs)
def test_constrained_intervention_matches_graph_edges(gpt2, tmp_path):
    """Direct effects (attention, norms and MLP outputs frozen): doubling a graph feature moves each
    demeaned target logit by exactly that feature's column of the adjacency (dictionaries.md 4.12)."""
    hf, model, tc, w, tokens = gpt2
    g = saes.attribute(model, tc, tokens[0])
    clean = np.asarray(model(tokens[0]))[0, -1]
    sel = g.selected_features
    for j in (0, len(sel) // 2, len(sel) - 1):
        l, p, f = (int(v) for v in g.active_features[sel[j]])
        a = float(g.activation_values[sel[j]])
        d = np.asarray(intervene(model, tc, tokens[0], [(l, p, f, 2 * a)], constrained=True))[-1] - clean
        np.testing.assert_allclose((d - d.mean())[g.logit_tokens], g.adjacency[g.logit_nodes, j], atol=2e-5, rtol=1e-3)
    # the real graph exports: every link is a kept edge with its adjacency weight
    doc = json.loads(GE.to_json(g, tmp_path, slug="real", scan="random-transcoders").read_text())
    index = {t["node_id"]: i for i, t in enumerate(GE.node_table(g))}
    assert doc["links"] and {n["node_id"] for n in doc["nodes"]} >= {x for l in doc["links"] for x in (l["source"], l["target"])}
    for link in doc["links"]:
        assert link["weight"] == float(g.adjacency[index[link["target"]], index[link["source"]]])


def test_intervene_bad_input(gpt2):
    hf, model, tc, w, tokens = gpt2
    for bad, msg in [([(0, 3, 99, 1.0)], "feature 99"), ([(5, 3, 1, 1.0)], "layer 5"), ([(0, 20, 1, 1.0)], "position 20"),
                     ([(0, 3, 1, float("nan"))], "NaN"), ([(0, 3, 1, 1.0), (0, 3, 1, 2.0)], "more than once"),
                     ([(0, 3, 1)], "tuples"), ((0, 3, 1, 1.0), "wrap a single")]:
        with pytest.raises(ValueError, match=msg):
            intervene(model, tc, tokens, bad)
    with pytest.raises(saes.DictionaryError, match="splice_transcoder"):
        saes.splice(tc[0])
    with pytest.raises(saes.DictionaryError, match="layer 7"):
        splice_transcoder(tc, set_features=[(7, 0, 0, 1.0)])
    narrow = saes.Dictionary(W_enc=jnp.zeros((16, 4)), b_enc=jnp.zeros(4), W_dec=jnp.zeros((4, 32)), b_dec=jnp.zeros(32),
                             site="mlp.hook_in", out_site="hook_mlp_out", layer=0)
    with pytest.raises(jinterp.edits.EditError, match="d_in=16 but the site has width 32"):
        model(tokens, edits=splice_transcoder(narrow))
    with pytest.raises(saes.DictionaryError, match="read before"):
        splice_transcoder(narrow.replace(site="hook_resid_post"))


def test_feature_top_activations_match_naive(gpt2):
    hf, model, tc, w, _ = gpt2
    r = np.random.default_rng(2)
    batches = [r.integers(0, model.config.d_vocab, (3, 10)) for _ in range(3)]
    feats = [(0, 1), (1, 5), (2, 0), (2, 23)]
    k = 4
    got = GH.feature_top_activations(model, tc, batches, feats, k=k, window=(3, 1))
    toks = np.concatenate(batches)
    names = [f"blocks.{l}.mlp.hook_in" for l in range(3)]
    caches = [model.run_with_cache(b, names=names)[1] for b in batches]
    for l, f in feats:
        x = np.concatenate([np.asarray(c[names[l]], np.float64) for c in caches])
        a = np.maximum(x @ w["W_enc"][l][:, f] + w["b_enc"][l][f], 0)
        a[:, 0] = 0  # position 0 left out
        order = np.argsort(-a.ravel(), kind="stable")[:k]
        want = [(divmod(int(i), 10), a.ravel()[i]) for i in order if a.ravel()[i] > 0]
        assert len(got[(l, f)]) == len(want) > 0
        for (ctx, pos, v), ((row, p), wv) in zip(got[(l, f)], want):
            lo = max(0, p - 3)
            assert pos == p - lo and ctx == [GE.token_str(model.tokenizer, t) for t in toks[row, lo:p + 2]]
            assert abs(v - wv) < 1e-4
    # a cross-layer transcoder with the same encoders (decoders writing only their own layer) agrees
    clt = saes.CrossLayerTranscoder(W_enc=tc.W_enc, b_enc=tc.b_enc, b_dec=tc.b_dec, site=tc.site, out_site=tc.out_site,
                                    W_dec=tuple(jnp.zeros((24, 3 - i, 32)).at[:, 0].set(tc.W_dec[i]) for i in range(3)))
    via_clt = GH.feature_top_activations(model, clt, batches, feats, k=k, window=(3, 1))
    for key, rows in got.items():
        assert [r[:2] for r in via_clt[key]] == [r[:2] for r in rows]
        np.testing.assert_allclose([r[2] for r in via_clt[key]], [r[2] for r in rows], rtol=1e-5)
    with pytest.raises(ValueError, match="layer 9"):
        GH.feature_top_activations(model, tc, batches, [(9, 0)])
