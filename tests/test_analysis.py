"""Attribution, residual-stream analysis, logit lens and head detectors against independent computations."""

import numpy as np
import pytest
import torch

import jinterp
from jinterp import attribution, circuits, detect, lens, metrics, patching
from jinterp import edits as E
from jinterp.loading import MODELS_DIR
from jinterp.train import organisms
from tests import hf_zoo

induction = organisms.recipe("induction-2l")

B, P = 3, 8


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied-bias"])
def pair(request, tmp_path_factory):
    hf = hf_zoo.build(request.param)
    return hf, jinterp.load(hf_zoo.save(hf, tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def bundled():
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(MODELS_DIR / "induction-2l"), attn_implementation="eager").eval()
    return hf, jinterp.load("induction-2l")


def toks(seed, b=B, p=P):
    return np.random.RandomState(seed).randint(0, hf_zoo.V, (b, p))


# ---------------------------------------------------------------- attribution patching


def test_attribution_is_exact_where_the_model_is_linear(pair):
    """Logits are linear in ln_final.hook_normalized, and a logit difference is linear in logits:
    the first-order estimate must equal exact patching there, position by position."""
    _, m = pair
    clean, corr = toks(0), toks(1)
    metric = metrics.logit_diff(toks(2, p=2))
    attr = attribution.attribution_patching(m, clean, corr, metric, sites=["ln_final.hook_normalized"])["ln_final.hook_normalized"]
    _, cc = m.run_with_cache(clean, names=["ln_final.hook_normalized"])
    base = float(metric(m(corr)))
    exact = [float(metric(m(corr, edits=[E.patch("ln_final.hook_normalized", cc["ln_final.hook_normalized"], pos=[p])]))) - base for p in range(P)]
    assert attr.axes == ("pos",)
    np.testing.assert_allclose(attr.values, exact, atol=1e-4 * max(1, np.abs(exact).max()))
    assert np.abs(exact).max() > 1e-3


def test_attribution_shapes_and_gradients(pair):
    """Each site's gradient matches a finite difference of a single-site additive edit."""
    _, m = pair
    clean, corr = toks(0), toks(1)
    metric = metrics.logit_diff(toks(2, p=2))
    res = attribution.attribution_patching(m, clean, corr, metric)
    c = m.cfg
    assert res["hook_resid_pre"].shape == (c.n_layers, P)
    assert res["attn.hook_z"].shape == (c.n_layers, P, c.n_heads)
    assert res["attn.hook_k"].shape == (c.n_layers, P, c.n_kv_heads)
    flat = attribution.attribution_patching(m, clean, corr, metric, sites=["z"], by_pos=False)["attn.hook_z"]
    np.testing.assert_allclose(flat.values, res["attn.hook_z"].values.sum(1), rtol=1e-4, atol=1e-6)
    # finite difference along (clean - corrupted) at one site: d/de metric(corr + e * delta) at e=0
    _, cc = m.run_with_cache(clean, names=["blocks.1.hook_mlp_out"])
    _, rc = m.run_with_cache(corr, names=["blocks.1.hook_mlp_out"])
    delta = np.zeros((B, P, c.d_model), np.float32)
    delta[:, 3] = np.asarray(cc["blocks.1.hook_mlp_out"])[:, 3] - np.asarray(rc["blocks.1.hook_mlp_out"])[:, 3]
    eps = 1e-2
    f = lambda e: float(metric(m(corr, edits=[E.steer("blocks.1.hook_mlp_out", delta, e)])))
    fd = (f(eps) - f(-eps)) / (2 * eps)
    assert abs(res["hook_mlp_out"].values[1, 3] - fd) < 2e-3 * max(1, abs(fd))


def test_attribution_correlates_with_exact_patching_on_bundled(bundled, capsys):
    _, m = bundled
    seg = 10
    full = induction.induction_batch(np.random.default_rng(3), 16, seg, m.cfg.d_vocab)
    clean, answer = full[:, :-1], full[:, -1]
    corr = clean.copy()
    wrong = (answer - 2 + 1 + np.arange(16) % 50) % (m.cfg.d_vocab - 2) + 2
    corr[:, seg] = wrong
    metric = metrics.logit_diff(np.stack([answer, wrong], 1))
    _, cc = m.run_with_cache(clean)
    attr = attribution.attribution_patching(m, clean, corr, metric, sites=["resid_pre", "attn_out", "mlp_out", "z"])
    exact = {
        "hook_resid_pre": patching.resid_pre(m, corr, cc, metric, progress=False),
        "hook_attn_out": patching.attn_out(m, corr, cc, metric, progress=False),
        "hook_mlp_out": patching.mlp_out(m, corr, cc, metric, progress=False),
        "attn.hook_z": patching.attn_head_out_by_pos(m, corr, cc, metric, progress=False),
    }
    base = float(metric(m(corr)))
    corr_by_site = {}
    for site, ex in exact.items():
        a, e = attr[site].values.ravel(), ex.values.ravel() - base
        corr_by_site[site] = float(np.corrcoef(a, e)[0, 1])
    with capsys.disabled():
        print("\nattribution vs exact patching on induction-2l (Pearson r):", {k: round(v, 3) for k, v in corr_by_site.items()})
    assert all(r > 0.5 for r in corr_by_site.values()), corr_by_site


# ---------------------------------------------------------------- residual-stream analysis


def test_decompositions_sum_to_the_stream(pair):
    _, m = pair
    _, cache = m.run_with_cache(toks(0))
    L = m.cfg.n_layers
    acc, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels[:3] == ["0_pre", "0_mid", "1_pre"] and labels[-1] == "final_post"
    np.testing.assert_allclose(acc[-1], cache[f"blocks.{L - 1}.hook_resid_post"])
    comps, clabels = cache.decompose_resid(return_labels=True)
    assert clabels[-1] == f"{L - 1}_mlp_out"
    np.testing.assert_allclose(np.asarray(comps).sum(0), np.asarray(cache[f"blocks.{L - 1}.hook_resid_post"]), atol=1e-4)
    part = cache.decompose_resid(layer=2, mlp_input=True)
    np.testing.assert_allclose(np.asarray(part).sum(0), np.asarray(cache["blocks.2.hook_resid_mid"]), atol=1e-4)
    heads, hl = cache.stack_head_results(layer=2, return_labels=True, incl_remainder=True)
    assert hl[0] == "L0H0" and hl[-1] == "remainder"
    np.testing.assert_allclose(np.asarray(heads).sum(0), np.asarray(cache["blocks.2.hook_resid_pre"]), atol=1e-4)
    # each layer's heads plus b_O make its attention output
    H = m.cfg.n_heads
    per = np.asarray(cache.stack_head_results()).reshape(L, H, B, P, -1).sum(1)
    b_O = np.asarray(m.params["blocks"]["attn"]["b_O"])[:, None, None]
    np.testing.assert_allclose(per + b_O, np.asarray(cache.stack("hook_attn_out")), atol=1e-4)


def test_apply_ln_and_dla_identity(pair):
    """Direct logit attribution with the cached final scale: components + bias == logit difference."""
    _, m = pair
    t = toks(3)
    ans = toks(4, p=2)
    _, cache = m.run_with_cache(t)
    x = np.asarray(cache.stack("hook_resid_post")[-1], np.float64)
    scale = np.asarray(cache["ln_final.hook_scale"], np.float64)
    mean = x.mean(-1, keepdims=True) if m.cfg.norm == "layernorm" else 0
    np.testing.assert_allclose(np.asarray(cache.apply_ln_to_stack(x[None]))[0], (x - mean) / scale, rtol=1e-4, atol=1e-5)
    d = attribution.direct_logit_attribution(m, t, ans)
    np.testing.assert_allclose(d["components"].values.sum() + d["bias"], d["total"], rtol=1e-4, atol=1e-4)
    # per layer: heads + b_O == that layer's attention component
    b_O = np.asarray(m.params["blocks"]["attn"]["b_O"])
    dirs = np.asarray(m.tokens_to_residual_directions(ans[:, 0]) - m.tokens_to_residual_directions(ans[:, 1]))
    attn_comp = {l: c for l, c in zip(d["components"].labels[0], d["components"].values)}
    for l in range(m.cfg.n_layers):
        bias_part = np.mean([(np.asarray(cache.apply_ln_to_stack(b_O[l][None, None, None] * np.ones((1, B, 1, 1)), pos_slice=[P - 1]))[0, b, 0] * dirs[b]).sum() for b in range(B)])
        np.testing.assert_allclose(d["heads"].values[l].sum() + bias_part, attn_comp[f"{l}_attn_out"], rtol=1e-3, atol=1e-4)


def test_logit_lens_against_hf(pair):
    hf, m = pair
    t = toks(5)
    ref_acts = hf_zoo.capture(hf, t)
    logits, labels = lens.layer_logits(m, t, positions=[2, -1])
    assert labels[0] == "0_pre" and labels[-1] == "final_post" and logits.shape[:3] == (m.cfg.n_layers + 1, B, 2)
    base = getattr(hf, "transformer", None) or hf.model
    final_norm = base.ln_f if hasattr(base, "ln_f") else base.norm
    with torch.no_grad():
        for i in range(m.cfg.n_layers):
            h = torch.as_tensor(ref_acts["resid_pre"][i][:, [2, P - 1]])
            want = hf.lm_head(final_norm(h)).numpy()
            np.testing.assert_allclose(np.asarray(logits[i]), want, atol=3e-5 * max(1, np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(logits[-1]), ref_acts["logits"][:, [2, P - 1]], atol=3e-5 * max(1, np.abs(ref_acts["logits"]).max()))
    out = lens.logit_lens(m, t, targets=t[:, -1], positions=-1)
    assert out.target_logprob.shape == (m.cfg.n_layers + 1,) and len(out.top) == m.cfg.n_layers + 1
    # the target's log-probability and rank per layer, from HF's own read-out of each residual
    with torch.no_grad():
        for i in range(m.cfg.n_layers + 1):
            h = ref_acts["resid_pre"][i][:, -1] if i < m.cfg.n_layers else None
            lg = hf.lm_head(final_norm(torch.as_tensor(h))).numpy() if h is not None else ref_acts["logits"][:, -1]
            lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
            tgt = lp[np.arange(B), t[:, -1]]
            np.testing.assert_allclose(out.target_logprob.values[i], tgt.mean(), atol=1e-4)
            np.testing.assert_allclose(out.target_rank.values[i], (lp > tgt[:, None]).sum(-1).mean())
    assert "LogitLens" in repr(out) and len(repr(out).splitlines()) == m.cfg.n_layers + 2


# ---------------------------------------------------------------- detectors (reference: HF attentions + loops)


def _hf_patterns(hf, tokens):
    with torch.no_grad():
        return np.stack([a.numpy() for a in hf(torch.as_tensor(tokens).long(), output_attentions=True).attentions])


def test_detectors_against_loops(bundled):
    hf, m = bundled
    t = induction.induction_batch(np.random.default_rng(7), 6, 12, m.cfg.d_vocab)
    pats = _hf_patterns(hf, t)  # [L, B, H, Q, K]
    L, Bn, H, Pn, _ = pats.shape
    ref = {k: np.zeros((L, H)) for k in ("previous_token", "duplicate_token", "induction")}
    for l in range(L):
        for h in range(H):
            for kind in ref:
                total, rows = 0.0, 0
                for b in range(Bn):
                    for q in range(Pn):
                        if kind == "previous_token":
                            keys = [q - 1] if q >= 1 else []
                        elif kind == "duplicate_token":
                            keys = [k for k in range(q) if t[b, k] == t[b, q]]
                        else:
                            keys = [k for k in range(1, q + 1) if t[b, k - 1] == t[b, q]]
                        if keys:
                            total += pats[l, b, h, q, keys].sum()
                            rows += 1
                ref[kind][l, h] = total / rows
    got = detect.head_scores(m, t)
    for kind in ref:
        np.testing.assert_allclose(got[kind], ref[kind], atol=1e-5)


def _needles(m, n, rng):
    prompts, spans = [], []
    for _ in range(n):
        hay = rng.integers(2, m.cfg.d_vocab, 14)
        needle = rng.integers(2, m.cfg.d_vocab, 8)
        d = int(rng.integers(0, 8))
        prompts.append(np.concatenate([[0], hay[:d], needle, hay[d:], needle[:2]]))
        spans.append((1 + d, 1 + d + 8))
    return prompts, spans


def test_retrieval_scores_against_loop(bundled):
    hf, m = bundled
    prompts, spans = _needles(m, 4, np.random.default_rng(11))
    got = detect.retrieval_scores(m, prompts, spans, max_new_tokens=6, min_recall=-1.0)  # count every sample
    L, H = m.cfg.n_layers, m.cfg.n_heads
    ref = np.zeros((L, H))
    for prompt, (a, b) in zip(prompts, spans):
        with torch.no_grad():
            seq = hf.generate(torch.as_tensor(prompt[None]).long(), max_new_tokens=6, do_sample=False,
                              attention_mask=torch.ones((1, len(prompt)), dtype=torch.long), eos_token_id=None, pad_token_id=0)
        gen = seq[0, len(prompt):].numpy()
        pats = _hf_patterns(hf, seq.numpy())[:, 0]
        for step, w in enumerate(gen):
            q = len(prompt) - 1 + step
            for l in range(L):
                for h in range(H):
                    j = int(np.argmax(pats[l, h, q, : q + 1]))
                    if a <= j < b and prompt[j] == w:
                        ref[l, h] += 1 / (b - a)
    np.testing.assert_allclose(got["scores"], ref / len(prompts), atol=1e-9)
    # the paper's filter: only samples whose generation recalls more than half of the needle count
    filt = detect.retrieval_scores(m, prompts, spans, max_new_tokens=6)
    assert filt["n_samples"] == sum(r > 0.5 for r in got["recall"])
    assert detect.rouge1_recall([5, 6, 6, 9], [6, 7, 6, 6]) == 0.5


# ---------------------------------------------------------------- the bundled model's circuit


def test_bundled_circuit_found_by_detectors_and_k_composition(bundled):
    _, m = bundled
    t = induction.induction_batch(np.random.default_rng(5), 32, 20, m.cfg.d_vocab)
    s = detect.head_scores(m, t)
    prev = np.unravel_index(np.argmax(s["previous_token"]), s["previous_token"].shape)
    ind = np.unravel_index(np.argmax(s["induction"]), s["induction"].shape)
    assert prev[0] == 0 and ind[0] == 1
    scores = {k: np.asarray(circuits.composition_scores(m, k)) for k in "QKV"}
    k_pair = scores["K"][prev[0], prev[1], ind[0], ind[1]]
    for kind, cs in scores.items():
        others = np.nan_to_num(cs, nan=-1.0).copy()
        if kind == "K":
            others[prev[0], prev[1], ind[0], ind[1]] = -1.0
        assert k_pair > others.max(), (kind, k_pair, others.max())
    prompts, spans = _needles(m, 8, np.random.default_rng(0))
    r = detect.retrieval_scores(m, prompts, spans, max_new_tokens=6)
    assert r["n_samples"] > 0
    assert r["scores"][1].min() > 0.3 and r["scores"][0].max() < 0.1


def test_int_pos_slice_drops_the_axis_like_transformerlens(pair):
    _, m = pair
    _, cache = m.run_with_cache(toks(0))
    stack = cache.decompose_resid(pos_slice=-1)  # [n, B, D]
    assert stack.ndim == 3
    normed = cache.apply_ln_to_stack(stack, pos_slice=-1)
    ref = cache.apply_ln_to_stack(cache.decompose_resid(), pos_slice=None)[:, :, -1]
    np.testing.assert_allclose(np.asarray(normed), np.asarray(ref), rtol=1e-5, atol=1e-6)
    attr = attribution.attribution_patching(m, toks(0), toks(1), metrics.logit_diff(toks(2, p=2)), sites=["pattern"])
    assert attr["attn.hook_pattern"].axes == ("layer", "pos", "head")
