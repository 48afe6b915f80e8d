"""Attribution graphs (saes.attribute) against computations written here, independently of the
batched VJP code: edges by explicit interventions on a frozen forward built from patch edits,
completeness, circuit-tracer's row-sum oracle, batching, a device mesh, the feature cap; influence,
pruning and scores against naive numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import jinterp
from jinterp import arch
from jinterp import edits as E
from jinterp import saes
from jinterp.model import InputError
from jinterp.saes import graph as graph_mod
from jinterp.saes import influence as infl
from tests import hf_zoo

T, D_TC = 6, 24
CONFIGS = {
    "gpt2": (tf.GPT2Config, dict(n_layer=2, n_embd=16, n_head=2, vocab_size=hf_zoo.V, n_positions=32)),
    "llama": (tf.LlamaConfig, dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=hf_zoo.V, max_position_embeddings=32)),
}


def transcoders(cfg, *, skip=False, jumprelu=False, seed=0):
    r = np.random.RandomState(seed)
    L, D = cfg.n_layers, cfg.d_model
    a = lambda *s, scale=1.0: jnp.asarray(r.randn(*s).astype(np.float32) * scale)
    return saes.Dictionary(
        W_enc=a(L, D, D_TC, scale=D ** -0.5), W_dec=a(L, D_TC, D, scale=0.3), b_dec=a(L, D, scale=0.1),
        b_enc=a(L, D_TC, scale=0.3) - 0.5, W_skip=a(L, D, D, scale=0.2) if skip else None,
        threshold=jnp.full((L, D_TC), 0.1) if jumprelu else None, architecture="jumprelu" if jumprelu else "standard",
        site="mlp.hook_in", out_site="hook_mlp_out", layers=tuple(range(L)))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def case(request, tmp_path_factory):
    cls, kw = CONFIGS[request.param]
    m = jinterp.load(hf_zoo.save(hf_zoo.build_config(cls, kw), tmp_path_factory.mktemp(request.param)), tokenizer=False)
    # gpt2: plain ReLU transcoders; llama: JumpReLU with a skip matrix
    tc = transcoders(m.config, skip=request.param == "llama", jumprelu=request.param == "llama")
    toks = np.random.RandomState(1).randint(0, hf_zoo.V, (2, T))
    return request.param, m, tc, toks, saes.attribute(m, tc, toks)


# ------------------------------------------------------------------------------------------------
# the reference: a frozen forward from patch edits (patterns, scales, MLP outputs set to clean values)


def decoders(tc, L):
    """[L source, L output, d_sae, D] float64: a per-layer transcoder's W_dec on the diagonal, a
    cross-layer one's W_dec_i[:, l - i] at (i, l >= i)."""
    F, D = tc.d_sae, tc.d_out
    W = np.zeros((L, L, F, D))
    for i in range(L):
        if isinstance(tc, saes.CrossLayerTranscoder):
            W[i, i:] = np.moveaxis(np.asarray(tc.W_dec[i], np.float64), 1, 0)
        else:
            W[i, i] = np.asarray(tc.W_dec[i], np.float64)
    return W


def clean_values(m, tc, toks):
    L = m.config.n_layers
    local = ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale", "hook_mlp_out", tc.site)
    names = [f"blocks.{l}.{s}" for l in range(L) for s in local]
    _, c = m.run_with_cache(toks[None], names=names + ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"])
    st = lambda s: np.stack([np.asarray(c[f"blocks.{l}.{s}"], np.float64) for l in range(L)])
    v = {s: st(s) for s in local}
    v["x_in"] = v[tc.site]
    for s in ("hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"):
        v[s] = np.asarray(c[s], np.float64)
    v["final"] = np.asarray(final_affine(m.params, c["ln_final.hook_normalized"]), np.float64)  # what W_U reads
    # transcoders by hand (numpy): activations, reconstruction, errors (position 0 zeroed)
    x = v["x_in"][:, 0]  # [L, T, D]
    W_enc, b_enc = np.asarray(tc.W_enc, np.float64), np.asarray(tc.b_enc, np.float64)
    pre = np.einsum("ltd,ldf->ltf", x, W_enc) + b_enc[:, None]
    acts = np.maximum(pre, 0)
    if tc.threshold is not None:
        acts = acts * (pre > np.asarray(tc.threshold)[:, None])
    acts[:, 0] = 0
    recon = np.einsum("itf,ilfd->ltd", acts, decoders(tc, L)) + np.asarray(tc.b_dec)[:, None]
    if tc.W_skip is not None:
        recon += np.einsum("ltd,lde->lte", x, np.asarray(tc.W_skip, np.float64))
    err = v["hook_mlp_out"][:, 0] - recon
    err[:, 0] = 0
    return v, pre, acts, err


def final_affine(params, n):
    """ln_final's output from its hook_normalized (before the weight and bias, as in TransformerLens)."""
    p = params["ln_final"]
    return n * p["w"] + (p["b"] if "b" in p else 0.0)


def _frozen(params, toks, v, W_skip, d_emb, d_out, *, cfg, in_site):
    """(x_in [K, L, T, D], final normalised residual [K, D] at the last position) for K pairs of
    deltas d_emb [K, T, D], d_out [K, L, T, D], with patterns, scales and MLP outputs fixed to clean
    values plus the deltas; the skip path (W_skip) by fixed-point iteration over layers."""
    L = cfg.n_layers
    fixed = [E.patch("attn.hook_pattern", v["attn.hook_pattern"], per_layer=True),
             E.patch("ln1.hook_scale", v["ln1.hook_scale"], per_layer=True),
             E.patch("ln2.hook_scale", v["ln2.hook_scale"], per_layer=True),
             E.patch("ln_final.hook_scale", v["ln_final.hook_scale"])]
    rec = ((in_site, tuple(range(L))), ("ln_final.hook_normalized", None))
    x0 = v["x_in"][:, 0]

    def run(d_emb, d_out):
        skip = jnp.zeros_like(d_out)
        for _ in range(L + 1 if W_skip is not None else 1):
            es = fixed + [E.patch("hook_embed", v["hook_embed"] + d_emb[None]),
                          E.patch("hook_mlp_out", v["hook_mlp_out"] + (d_out + skip)[:, None], per_layer=True)]
            _, acts = arch.forward(params, toks[None], None, es, cfg=cfg, record=rec)
            x_in = acts[in_site][:, 0]
            if W_skip is not None:
                skip = jnp.einsum("ltd,lde->lte", x_in - x0, W_skip)
        return x_in, final_affine(params, acts["ln_final.hook_normalized"][0, -1])

    return jax.vmap(run)(d_emb, d_out)


_frozen = jax.jit(_frozen, static_argnames=("cfg", "in_site"))


def frozen_runner(m, tc, toks, v):
    f32 = {k: jnp.asarray(a, jnp.float32) for k, a in v.items()}
    return lambda d_emb, d_out: _frozen(m.params, jnp.asarray(toks), f32, tc.W_skip, jnp.asarray(d_emb),
                                        jnp.asarray(d_out), cfg=m.config, in_site=tc.site)


def target_values(g, tc, W_U, x_in, fin):
    """Each target's value (without biases): pre-activation x_in . W_enc column; demeaned logit."""
    l, p, f = g.features.T
    enc = np.asarray(tc.W_enc)[l, :, f]  # [n_sel, D]
    feats = np.einsum("...sd,sd->...s", x_in[..., l, p, :], enc)
    U = np.asarray(W_U)
    logits = fin @ (U - U.mean(1, keepdims=True))[:, g.logit_tokens]
    return np.concatenate([feats, logits], -1)


def source_deltas(g, tc, acts, err, embed, D):
    """One (d_emb, d_out) per source column of the graph: the source's vector added where it writes."""
    L, P = g.n_layers, g.n_pos
    n = g.n_features + (L + 1) * P
    d_emb, d_out = np.zeros((n, P, D), np.float32), np.zeros((n, L, P, D), np.float32)
    W_dec = decoders(tc, L)
    for i, (l, p, f) in enumerate(g.features):
        d_out[i, :, p] = acts[l, p, f] * W_dec[l, :, f]  # every output layer it writes (only l for per-layer)
    for l in range(L):
        for p in range(P):
            d_out[g.n_features + l * P + p, l, p] = err[l, p]
    for p in range(P):
        d_emb[g.n_features + L * P + p, p] = embed[p]
    return d_emb, d_out


# ------------------------------------------------------------------------------------------------


def test_edges_equal_interventions_and_completeness(case):
    """(a) every edge = the change in the target when its source is added in the frozen model;
    (b) each target = sum of its incoming edges + the constant left when every source is removed."""
    name, m, tc, toks, graphs = case
    check_edges(m, tc, toks, graphs)


def cross_layer(cfg, seed=3):
    """A random JumpReLU cross-layer transcoder reading hook_resid_mid (circuit-tracer's default) with a skip."""
    r = np.random.RandomState(seed)
    L, D = cfg.n_layers, cfg.d_model
    a = lambda *s, scale=1.0: jnp.asarray(r.randn(*s).astype(np.float32) * scale)
    return saes.CrossLayerTranscoder(
        W_enc=a(L, D, D_TC, scale=D ** -0.5), b_enc=a(L, D_TC, scale=0.3) - 0.5, b_dec=a(L, D, scale=0.1),
        W_dec=tuple(a(D_TC, L - i, D, scale=0.3) for i in range(L)), W_skip=a(L, D, D, scale=0.2),
        threshold=jnp.full((L, D_TC), 0.1), architecture="jumprelu", site="hook_resid_mid", out_site="hook_mlp_out")


def test_cross_layer_transcoder_edges_and_completeness():
    """A cross-layer transcoder (3 layers: features write 1-3 output layers): every edge equals the
    frozen-model intervention that adds the feature's decoder rows at every layer it writes."""
    cls, kw = CONFIGS["gpt2"]
    m = jinterp.load(hf_zoo.save(hf_zoo.build_config(cls, dict(kw, n_layer=3)), _tmp()), tokenizer=False)
    tc = cross_layer(m.config)
    toks = np.random.RandomState(4).randint(0, hf_zoo.V, (2, T))
    graphs = saes.attribute(m, tc, toks)
    check_edges(m, tc, toks, graphs)
    # features that write several layers are checked (not only the last layer's)
    assert all((g.features[:, 0] < 2).sum() >= 5 for g in graphs)


def check_edges(m, tc, toks, graphs):
    D, L = m.config.d_model, m.config.n_layers
    per_prompt = []
    for b in range(2):
        g = graphs[b]
        v, pre, acts, err = clean_values(m, tc, toks[b])
        # the active features, their order and activations, as computed here
        want = np.argwhere(acts != 0)
        np.testing.assert_array_equal(g.active_features, want)
        np.testing.assert_allclose(g.activation_values, acts[tuple(want.T)], rtol=1e-4, atol=1e-5)
        assert g.n_features == len(want) and (want[:, 1] > 0).all()
        d_emb, d_out = source_deltas(g, tc, acts, err, v["hook_embed"][0], D)
        # rows: nothing added, every source removed (for the constant), then each source added
        d_emb = np.concatenate([np.zeros((1, T, D)), -v["hook_embed"], d_emb]).astype(np.float32)
        d_out = np.concatenate([np.zeros((1, L, T, D)), -d_out.sum(0, keepdims=True), d_out]).astype(np.float32)
        per_prompt.append((g, v, d_emb, d_out))
    K = max(len(p[2]) for p in per_prompt)  # one shape: one compiled reference program
    for g, v, d_emb, d_out in per_prompt:
        n = len(d_emb)
        pad = lambda a: np.concatenate([a, np.zeros((K - n,) + a.shape[1:], np.float32)])
        x_in, fin = frozen_runner(m, tc, g.tokens, v)(pad(d_emb), pad(d_out))
        t = target_values(g, tc, m.W_U, np.asarray(x_in, np.float64)[:n], np.asarray(fin, np.float64)[:n])
        base, const, moved = t[0], t[1], t[2:]
        rows = np.r_[g.feature_nodes, g.logit_nodes]
        direct = (moved - base).T  # [targets, sources]
        A = g.adjacency[rows][:, :n - 2]
        scale = np.abs(direct).max()
        np.testing.assert_allclose(A, direct, atol=2e-5 * scale, rtol=1e-3)
        assert scale > 1
        # error/token rows and logit columns are zero
        assert not g.adjacency[g.error_nodes.start:g.token_nodes.stop].any()
        assert not g.adjacency[:, g.logit_nodes.start:].any()
        # (b) completeness: target = sum of incoming edges + the value with every source removed
        clean = target_values(g, tc, m.W_U, v["x_in"][:, 0], v["final"][0, -1])
        np.testing.assert_allclose(g.adjacency[rows].sum(1) + const, clean, atol=1e-4 * max(1, np.abs(clean).max()))
        np.testing.assert_allclose(base, clean, atol=1e-4 * max(1, np.abs(clean).max()))
        # logit targets: the most probable tokens holding 95% of the mass, at most 10
        logits = v["final"][0, -1] @ np.asarray(m.W_U, np.float64) + np.asarray(m.b_U)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        k = min(10, int(np.argmax(np.cumsum(probs[order]) >= 0.95)) + 1)
        np.testing.assert_array_equal(g.logit_tokens, order[:k])
        np.testing.assert_allclose(g.logit_probabilities, probs[order[:k]], rtol=1e-4)


def test_row_sums_without_biases():
    """circuit-tracer's oracle (dictionaries.md §4.12): with every bias, the positional embedding and
    b_dec zero and the MLP writing 0, each feature's row sums to its pre-activation minus b_enc and
    each logit's row to its logit minus the mean logit."""
    cls, kw = CONFIGS["gpt2"]
    m = jinterp.load(hf_zoo.save(hf_zoo.build_config(cls, kw), _tmp()), tokenizer=False)
    zero = lambda path, a: jnp.zeros_like(a) if str(path[-1].key).startswith("b") or path[-1].key in ("W_pos", "W_out") else a
    m = m.with_params(jax.tree_util.tree_map_with_path(zero, m.params))
    tc = transcoders(m.config)
    tc = tc.replace(b_dec=jnp.zeros_like(tc.b_dec))
    toks = np.random.RandomState(2).randint(0, hf_zoo.V, T)
    g = saes.attribute(m, tc, toks)
    v, pre, _, _ = clean_values(m, tc, toks)
    l, p, f = g.features.T
    np.testing.assert_allclose(g.adjacency[g.feature_nodes].sum(1), pre[l, p, f] - np.asarray(tc.b_enc)[l, f], atol=1e-4)
    logits = v["final"][0, -1] @ np.asarray(m.W_U, np.float64)  # b_U is 0
    np.testing.assert_allclose(g.adjacency[g.logit_nodes].sum(1), (logits - logits.mean())[g.logit_tokens], atol=1e-4)


def _tmp():
    import tempfile

    return tempfile.mkdtemp(prefix="jinterp-graph-")


@pytest.mark.parametrize("case", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)], indirect=True)
def test_batched_mesh_and_single_agree(case):
    """(c) two prompts in one call = one at a time; (d) rows split over 8 devices = one device."""
    name, m, tc, toks, graphs = case
    one = saes.attribute(m, tc, toks[1])
    mesh = jax.make_mesh((8,), ("rows",))
    on_mesh = saes.attribute(m, tc, toks, mesh=mesh, batch_size=4)
    assert isinstance(one, saes.Graph) and len(on_mesh) == 2
    for a, b in ((graphs[1], one), (graphs[0], on_mesh[0]), (graphs[1], on_mesh[1])):
        for k in ("tokens", "active_features", "selected_features", "logit_tokens"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        np.testing.assert_allclose(a.adjacency, b.adjacency, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.logit_probabilities, b.logit_probabilities, rtol=1e-6)


def test_salient_logits():
    """Top tokens by probability until the mass reaches desired_logit_prob, at most max_n_logits."""
    probs = np.array([0.05, 0.5, 0.3, 0.1, 0.05], np.float32)
    ids, p = graph_mod.salient_logits(probs, 10, 0.75)
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_allclose(p, [0.5, 0.3])
    np.testing.assert_array_equal(graph_mod.salient_logits(probs, 2, 0.99)[0], [1, 2])
    np.testing.assert_array_equal(graph_mod.salient_logits(probs, 10, 0.01)[0], [1])
    np.testing.assert_array_equal(graph_mod.salient_logits(probs, 10, 1.0)[0], [1, 2, 3, 0, 4])


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_feature_cap_follows_partial_influence(case):
    """max_feature_nodes: the features visited are those a plain re-implementation of the queue
    (logit rows, then update_interval * batch_size features by partial influence) picks from the full
    graph's rows, and the capped adjacency is the full one restricted to them."""
    name, m, tc, toks, graphs = case
    full = graphs[0]
    cap, bs, every = 9, 2, 2
    g = saes.attribute(m, tc, toks[0], max_feature_nodes=cap, batch_size=bs, update_interval=every)
    n_act, nf = len(full.active_features), full.n_features
    A = full.adjacency  # all features visited: columns = every active feature
    n = A.shape[0]
    edge, row_nodes = [A[n - full.n_logits:]], list(range(n - full.n_logits, n))
    visited = np.zeros(n_act, bool)
    while visited.sum() < cap:
        M = np.abs(np.concatenate(edge)).astype(np.float32)
        M /= np.maximum(M.sum(1, keepdims=True), 1e-8)
        prod, total = full.logit_weights.copy(), np.zeros(n, np.float32)
        while True:
            prod = prod[row_nodes] @ M
            if not prod.any():
                break
            total += prod
        rank = np.argsort(-total[:n_act], kind="stable")
        pick = rank[~visited[rank]][:min(every * bs, cap - visited.sum())]
        visited[pick] = True
        edge.append(A[pick])
        row_nodes += list(pick)
    sel = np.flatnonzero(visited)
    np.testing.assert_array_equal(g.selected_features, sel)
    keep = np.r_[sel, np.arange(nf, n)]
    np.testing.assert_allclose(g.adjacency, A[np.ix_(keep, keep)], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# influence, pruning, scores against naive numpy


def test_influence_prune_and_scores_against_naive(case):
    name, m, tc, toks, graphs = case
    g = graphs[0]
    A = g.adjacency.astype(np.float64)
    n = len(A)
    w = np.zeros(n)
    w[g.logit_nodes.start:] = g.logit_probabilities
    rs = np.abs(A).sum(1)
    N = np.abs(A) / np.where(rs > 0, rs, 1)[:, None]
    np.testing.assert_allclose(infl.normalized(g.adjacency), N, atol=1e-6)
    I_ref = w @ (np.linalg.inv(np.eye(n) - N) - np.eye(n))
    I = infl.influence(g.adjacency, g.logit_weights)
    np.testing.assert_allclose(I, I_ref, rtol=1e-4, atol=1e-6)

    def threshold(s, t):
        s = np.sort(s.ravel())[::-1]
        c = np.cumsum(s) / s.sum()
        i = next((k for k, x in enumerate(c) if x >= t), len(s) - 1)
        return s[i]

    node = I_ref >= threshold(I_ref, 0.8)
    nf, ntok, nl = g.n_features, g.n_pos, g.n_logits
    node[n - ntok - nl:] = True
    P = A * node[:, None] * node[None, :]
    rs = np.abs(P).sum(1)
    Np = np.abs(P) / np.where(rs > 0, rs, 1)[:, None]
    Ip = w @ (np.linalg.inv(np.eye(n) - Np) - np.eye(n))
    score = Np * (Ip + w)[:, None]
    edge = score >= threshold(score, 0.98)
    changed = True
    while changed:
        before = node.copy()
        for i in range(n - ntok - nl):
            node[i] &= edge[:, i].any() and (i >= nf or edge[i].any())
        changed = (node != before).any()
        if changed:
            edge &= node[:, None] & node[None, :]
    got = infl.prune(g)
    np.testing.assert_array_equal(got.node_mask, node)
    np.testing.assert_array_equal(got.edge_mask, edge)
    order = np.argsort(-I_ref)
    cum = np.empty(n)
    cum[order] = np.cumsum(I_ref[order]) / I_ref.sum()
    np.testing.assert_allclose(got.cumulative_scores, cum, atol=1e-5)
    assert 0 < node[:nf].sum() < nf
    errs = slice(nf, nf + g.n_layers * ntok)
    rep = I_ref[errs.stop:errs.stop + ntok].sum() / (I_ref[errs.stop:errs.stop + ntok].sum() + I_ref[errs].sum())
    comp = ((1 - N[:, errs].sum(1)) * (I_ref + w)).sum() / (I_ref + w).sum()
    np.testing.assert_allclose(infl.graph_scores(g), (rep, comp), rtol=1e-4)
    with pytest.raises(ValueError, match="node_threshold must be in"):
        infl.prune(g, node_threshold=1.5)
    with pytest.raises(ValueError, match="must be square"):
        infl.influence(np.zeros((2, 3)), np.zeros(2))


def test_save_load_and_labels(case, tmp_path):
    name, m, tc, toks, graphs = case
    g = graphs[0]
    path = g.save(tmp_path / "g")
    assert path.endswith(".npz")
    back = saes.Graph.load(path)
    for k in ("tokens", "active_features", "activation_values", "selected_features", "adjacency", "logit_tokens",
              "logit_probabilities"):
        np.testing.assert_array_equal(getattr(back, k), getattr(g, k))
    assert (back.n_layers, back.n_pos, back.vocab_size) == (g.n_layers, g.n_pos, g.vocab_size)
    with pytest.raises(FileExistsError, match="not overwritten"):
        g.save(path)
    labels = g.node_labels()
    assert len(labels) == g.n_nodes == len(g.adjacency)
    assert labels[g.error_nodes.start] == "err L0 P0" and labels[g.token_nodes.start].startswith("tok P0")
    assert labels[g.logit_nodes.start].startswith(f"logit #{g.logit_tokens[0]}")


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_bad_inputs(case):
    name, m, tc, toks, graphs = case
    cfg = m.config
    wide = tc.replace(W_enc=jnp.zeros((2, cfg.d_model + 1, D_TC)), W_skip=None)
    with pytest.raises(saes.DictionaryError, match=r"d_in=17 but site 'blocks.0.mlp.hook_in'.*width 16"):
        saes.attribute(m, wide, toks)
    one = tc[0]
    with pytest.raises(saes.DictionaryError, match="1 transcoders for a model with 2 layers"):
        saes.attribute(m, [one], toks)
    with pytest.raises(saes.DictionaryError, match=r"cover layers \[0, 5\]"):
        saes.attribute(m, tc.replace(layers=(0, 5)), toks)
    with pytest.raises(saes.DictionaryError, match="must write hook_mlp_out"):
        saes.attribute(m, tc.replace(out_site="hook_resid_post"), toks)
    with pytest.raises(saes.DictionaryError, match="reads 'hook_resid_post'"):
        saes.attribute(m, tc.replace(site="hook_resid_post"), toks)
    with pytest.raises(InputError, match=r"must be \[batch, pos\]"):
        saes.attribute(m, tc, toks[None])
    with pytest.raises(InputError, match="outside the vocabulary"):
        saes.attribute(m, tc, np.full(T, hf_zoo.V))
    with pytest.raises(ValueError, match="max_n_logits must be a positive int"):
        saes.attribute(m, tc, toks, max_n_logits=0)
    with pytest.raises(ValueError, match="zero_positions must be positions in 0..5"):
        saes.attribute(m, tc, toks, zero_positions=[T])
    # a list of per-layer dictionaries is stacked
    g = saes.attribute(m, [tc[0], tc[1]], toks[0])
    np.testing.assert_allclose(g.adjacency, graphs[0].adjacency, atol=1e-6)
