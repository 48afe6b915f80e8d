"""Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; tests/hf_zoo.py MOE_VARIANTS), fp32.

Parity with HF torch at every residual site, the logits and the routing sites (router logits, dense
expert weights, each expert's output computed by HF's own experts module, the shared expert's gate and
output); routing edits against HF with the expert's weights zeroed or its router's logits masked; a
patching sweep over expert weights against a naive loop; expert-parallel sharding; both checkpoint
layouts; and the errors. Reference values never come from jinterp.
"""

from unittest import mock

import jax
import numpy as np
import pytest
import torch
from jax.sharding import AxisType

import jinterp
from jinterp import edits as E
from jinterp import metrics, patching, planner, sharding, sites
from jinterp.arch import moe, param_shapes
from jinterp.config import Config
from jinterp.engine import flops, sweep_grid
from jinterp.io.hf import UnsupportedArchitecture
from jinterp.results import axis_labels
from tests import hf_zoo

ATOL = 2e-5
SEQ = 12  # longer than Mixtral's window (5)
FAMILIES = list(hf_zoo.MOE_VARIANTS)
# greedy generation (KV cache) by default on Mixtral (sliding window); the others under -m slow
GENERATION = [f if f.startswith("mixtral") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            hf = hf_zoo.build(name)
            path = hf_zoo.save(hf, tmp_path_factory.mktemp(name))
            made[name] = (hf, path, jinterp.load(path, tokenizer=False))
        return made[name]

    return get


def _tokens(n_batch=3, n=SEQ, seed=0):
    return np.random.RandomState(seed).randint(0, hf_zoo.V, (n_batch, n)).astype(np.int32)


def _close(ours, ref, what, atol=ATOL):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs HF {ref.shape}"
    err = np.abs(ours - ref).max()
    assert err <= atol * max(1.0, np.abs(ref).max()), f"{what}: max |diff| {err:.3g}"


def hf_routing_capture(hf, toks):
    """Per layer, from HF's own modules: router logits, the dense routing weights (its top-k scores
    scattered), each expert's output (HF's experts module with every token sent to that expert at weight
    1), and for Qwen2-MoE the shared expert's sigmoid gate and gated output. Arrays [L, B, S, ...]."""
    B, S = toks.shape
    rec = {k: [] for k in ("router_logits", "expert_weights", "expert_out", "shared_gate", "shared_raw")}
    hooks = []
    for layer in hf_zoo.layers(hf):
        mlp = layer.mlp

        def on_gate(m, a, o):
            logits, scores, idx = o
            rec["router_logits"].append(logits)
            rec["expert_weights"].append(torch.zeros(logits.shape).scatter(1, idx, scores.float()))

        def on_input(m, a, mlp=mlp):
            h = a[0].reshape(-1, a[0].shape[-1])
            n, n_exp = h.shape[0], mlp.gate.weight.shape[0]
            one = torch.ones(n, 1)
            rec["expert_out"].append(torch.stack([mlp.experts(h, torch.full((n, 1), e), one) for e in range(n_exp)], 1))

        hooks += [mlp.gate.register_forward_hook(on_gate), mlp.register_forward_pre_hook(on_input)]
        if hasattr(mlp, "shared_expert"):
            hooks.append(mlp.shared_expert_gate.register_forward_hook(lambda m, a, o: rec["shared_gate"].append(torch.sigmoid(o))))
            hooks.append(mlp.shared_expert.register_forward_hook(lambda m, a, o: rec["shared_raw"].append(o)))
    try:
        with torch.no_grad():
            hf(torch.as_tensor(toks).long())
    finally:
        for h in hooks:
            h.remove()
    out = {k: torch.stack(v).reshape((len(v), B, S) + v[0].shape[1:]).numpy() for k, v in rec.items() if v}
    if "shared_gate" in out:
        out["shared_out"] = out["shared_gate"] * out.pop("shared_raw")
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_every_site_matches_hf(zoo, name):
    """One compiled run_with_cache per family: logits, every residual site, attention patterns and every
    routing site against HF; routing is exercised (every expert chosen somewhere, top_k per token)."""
    hf, _, m = zoo(name)
    toks = _tokens()
    ref = hf_zoo.capture(hf, toks)
    route = hf_routing_capture(hf, toks)
    logits, cache = m.run_with_cache(toks)
    assert set(cache) == set(sites.all_names(m.cfg))
    _close(logits, ref["logits"], f"{name} logits")
    for l in range(m.cfg.n_layers):
        for site, key in [("hook_resid_pre", "resid_pre"), ("hook_attn_out", "attn_out"), ("hook_mlp_out", "mlp_out"),
                          ("hook_resid_post", "resid_post"), ("attn.hook_pattern", "pattern")]:
            _close(cache[f"blocks.{l}.{site}"], ref[key][l], f"{name} {site} {l}")
        _close(cache[f"blocks.{l}.hook_resid_mid"], ref["resid_pre"][l] + ref["attn_out"][l], f"{name} resid_mid {l}")
        for key, r in route.items():
            _close(cache[f"blocks.{l}.mlp.hook_{key}"], r[l], f"{name} {key} {l}")
        w = np.asarray(cache[f"blocks.{l}.mlp.hook_expert_weights"])
        assert ((w > 0).sum(-1) == m.cfg.top_k).all()
        assert len(np.unique(w.argmax(-1))) >= 3, "routing should pick different experts across tokens"
    # the parameter tree is what param_shapes says, and the MoE sites replace the dense MLP's
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), param_shapes(m.cfg, m.dtype))
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), m.params)
    local = sites.block_sites(m.cfg)
    assert "mlp.hook_pre" not in local and "mlp.hook_post" not in local
    assert ("mlp.hook_shared_out" in local) == (m.cfg.d_shared > 0)


@pytest.mark.parametrize("name", GENERATION)
def test_greedy_generation_matches_hf(zoo, name):
    hf, _, m = zoo(name)
    toks = _tokens(2, 6, seed=2)
    ours = np.asarray(m.generate(toks, max_new_tokens=8))
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(toks).long(), attention_mask=torch.ones(toks.shape, dtype=torch.long),
                             max_new_tokens=8, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} greedy generation")


@pytest.mark.slow
def test_padding_left_matches_unpadded(zoo):
    """Padded tokens are routed too (as in HF) but leave every real token's logits unchanged."""
    hf, _, m = zoo("mixtral-top2of5-sliding")
    rs = np.random.RandomState(1)
    seqs = [rs.randint(0, hf_zoo.V, n) for n in (SEQ, SEQ - 4)]
    toks = np.zeros((2, SEQ), np.int32)
    mask = np.zeros((2, SEQ), bool)
    for i, s in enumerate(seqs):
        toks[i, SEQ - len(s):], mask[i, SEQ - len(s):] = s, True
    logits = np.asarray(m(toks, attention_mask=mask))
    for i, s in enumerate(seqs):
        _close(logits[i][mask[i]], hf_zoo.capture(hf, s[None])["logits"][0], f"left-padded row {i}")


# ----------------------------------------------------------------------------------------
# routing: the rule, and edits that ablate or force experts


def _naive_routing(logits, k, norm):
    """Per token: softmax, the k largest probabilities (ties: lower index first), renormalised if norm."""
    out = np.zeros(logits.shape, np.float64)
    for idx in np.ndindex(*logits.shape[:-1]):
        z = logits[idx].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        top = sorted(range(len(p)), key=lambda e: (-np.float32(p[e]), e))[:k]
        out[idx + (top,)] = p[top] / (p[top].sum() if norm else 1.0)
    return out


@pytest.mark.parametrize("norm", [False, True])
def test_routing_rule_against_naive_with_ties(norm):
    cfg = Config("t", 1, 8, 1, 1, 8, 4, 10, 8, mlp="moe", n_experts=6, top_k=3, norm_topk_prob=norm)
    logits = np.random.RandomState(0).randn(4, 7, 6).astype(np.float32)
    logits[0, :, 2] = logits[0, :, 4] = logits[0, :, 0]  # three-way ties at every position of row 0
    logits[1, :3] = np.float32(0.5)  # all six experts tie
    got = np.asarray(moe.routing(cfg, logits))
    np.testing.assert_allclose(got, _naive_routing(logits, 3, norm), atol=2e-7)
    assert ((got > 0).sum(-1) == 3).all()
    assert (got[1, :3, :3] > 0).all() and (got[1, :3, 3:] == 0).all()  # ties go to the lower expert ids
    np.testing.assert_allclose(got.sum(-1), 1.0 if norm else got.sum(-1), atol=1e-6)


class _MaskedRouter:
    """Patch torch's linear so that HF's router of one layer sees masked logits (its own softmax, top-k
    and renormalisation then run on them): rows of `positions` (flattened over batch x seq) get the
    dtype's minimum at the experts where `hit` holds."""

    def __init__(self, gate_weight, hit, positions):
        self.w, self.hit, self.positions = gate_weight, torch.as_tensor(hit), torch.as_tensor(positions)
        self.real = torch.nn.functional.linear

    def __call__(self, x, w, b=None):
        out = self.real(x, w, b)
        if w is self.w:
            rows = torch.zeros(out.shape[0], dtype=torch.bool)
            rows[self.positions] = True
            out = out.masked_fill(rows[:, None] & self.hit[None], torch.finfo(out.dtype).min)
        return out


def _hf_logits(hf, toks, patch=None):
    with torch.no_grad():
        if patch is None:
            return hf(torch.as_tensor(toks).long()).logits.numpy()
        with mock.patch.object(torch.nn.functional, "linear", patch):
            return hf(torch.as_tensor(toks).long()).logits.numpy()


def test_ablate_and_force_experts_against_hf(zoo):
    """Qwen2-MoE (no renormalisation, shared expert): ablating an expert = HF with that expert's down
    projection zeroed; rerouting / forcing = HF whose router logits are masked, at chosen positions."""
    hf, _, m = zoo("qwen2moe-shared-bias")
    toks = _tokens(2, 8, seed=4)
    base = _hf_logits(hf, toks)
    layer = hf_zoo.layers(hf)[1]
    down = layer.mlp.experts.down_proj
    saved = down.detach().clone()
    with torch.no_grad():
        down[3] = 0
    try:
        ref = _hf_logits(hf, toks)
    finally:
        with torch.no_grad():
            down.copy_(saved)
    ours = m(toks, edits=[E.ablate_experts(3, layers=1)])
    _close(ours, ref, "ablate expert 3 at layer 1")
    assert np.abs(ref - base).max() > 1e-2  # the edit matters

    pos = [2, 5]
    flat = [b * 8 + p for b in range(2) for p in pos]
    gate0 = hf_zoo.layers(hf)[0].mlp.gate.weight
    hit = np.isin(np.arange(5), [0, 1])
    ref = _hf_logits(hf, toks, _MaskedRouter(gate0, hit, flat))
    _close(m(toks, edits=[E.ablate_experts([0, 1], layers=0, pos=pos, reroute=True)]), ref, "reroute around 0, 1")
    assert np.abs(ref - base).max() > 1e-2
    ref = _hf_logits(hf, toks, _MaskedRouter(gate0, ~np.isin(np.arange(5), [1, 4]), flat))
    _close(m(toks, edits=[E.force_experts([1, 4], layers=0, pos=pos)]), ref, "force experts 1, 4")
    assert np.abs(ref - base).max() > 1e-2


def test_expert_edit_errors(zoo):
    _, _, m = zoo("mixtral-top2of5-sliding")
    with pytest.raises(E.EditError, match="expert 5 is out of range; this model has 5 experts"):
        E.validate(m.cfg, [E.ablate_experts([1, 5])], 1, 4)
    with pytest.raises(ValueError, match="experts is empty"):
        E.ablate_experts([])
    with pytest.raises(TypeError, match="expert ids"):
        E.force_experts([1.5])
    with pytest.raises(E.EditError, match="applies to mlp.hook_router_logits, mlp.hook_expert_weights only"):
        E.validate(m.cfg, [E.edit("hook_mlp_out", E.MaskExperts(jax.numpy.asarray([1])))], 1, 4)
    dense = Config("llama", 1, 8, 1, 1, 8, 4, 10, 8, mlp="gated")
    with pytest.raises(E.EditError, match="has no site 'mlp.hook_expert_weights'"):
        E.validate(dense, [E.ablate_experts(0)], 1, 4)


# ----------------------------------------------------------------------------------------
# the sweep driver over expert sites


def test_patching_sweep_over_expert_weights(zoo):
    """Patch mlp.hook_expert_weights (the routing: which experts and how much) per layer and position with
    the driver; equal to a loop of single-edit forwards."""
    _, _, m = zoo("mixtral-top2of5-sliding")
    rs = np.random.RandomState(0)
    clean = rs.randint(0, hf_zoo.V, (2, 7))
    corr = clean.copy()
    corr[:, 3] = rs.randint(0, hf_zoo.V, 2)
    metric = metrics.logit_diff(rs.randint(0, hf_zoo.V, (2, 2)))
    _, cache = m.run_with_cache(clean, names=lambda n: n.endswith("mlp.hook_expert_weights"))
    src = cache.stack("mlp.hook_expert_weights")
    axes = {"layer": axis_labels(m, "layer", corr), "pos": axis_labels(m, "pos", corr)}
    got = sweep_grid(m, corr, axes, patching.PatchCell("mlp.hook_expert_weights", True, False), data=src,
                     metric=metric, name="patch expert weights", progress=False)
    ref = np.zeros((m.cfg.n_layers, 7))
    for l, p in np.ndindex(*ref.shape):
        e = E.patch(f"blocks.{l}.mlp.hook_expert_weights", cache[f"blocks.{l}.mlp.hook_expert_weights"], pos=[p])
        ref[l, p] = float(metric(m(corr, edits=[e])))
    np.testing.assert_allclose(got.values, ref, atol=3e-5 * max(1, np.abs(ref).max()))
    assert np.abs(ref[:, 3]).max() > 0 and np.allclose(ref[:, :3], ref[0, 0])  # only the changed position matters


# ----------------------------------------------------------------------------------------
# expert-parallel sharding, work accounting, loading layouts, errors


def test_sharded_over_experts_matches_one_device(tmp_path):
    """Qwen2-MoE with 4 experts on a data x model x expert = 2 x 2 x 2 mesh of virtual CPU devices."""
    kw = dict(hf_zoo.MOE_VARIANTS["qwen2moe-shared-bias"][1], num_experts=4, moe_intermediate_size=8)
    hf = hf_zoo.build_config(hf_zoo.tf.Qwen2MoeConfig, kw)
    path = hf_zoo.save(hf, tmp_path / "m")
    ref = jinterp.load(path, tokenizer=False)
    mesh = jax.make_mesh((2, 2, 2), ("data", "model", "expert"), axis_types=(AxisType.Auto,) * 3)
    m = jinterp.load(path, tokenizer=False, mesh=mesh)
    spec = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
    mlp = m.params["blocks"]["mlp"]
    assert spec(mlp["experts"]["W_in"]) == (None, "expert", "data", "model")
    assert spec(mlp["experts"]["W_out"]) == (None, "expert", "model", "data")
    assert spec(mlp["shared"]["W_out"]) == (None, "model", "data")
    toks = _tokens(2, 8)
    np.testing.assert_allclose(np.asarray(m(toks)), np.asarray(ref(toks)), atol=1e-5)
    with pytest.raises(sharding.ShardingError, match="n_experts=4 does not divide by the 'expert' axis"):
        sharding.check_mesh(m.cfg, {"expert": 8})
    dense = Config("llama", 1, 8, 1, 1, 8, 4, 10, 8, mlp="gated")
    with pytest.raises(sharding.ShardingError, match="has none"):
        sharding.check_mesh(dense, {"expert": 2})


def test_flops_and_memory_count_every_expert():
    c = Config("q", 2, 16, 2, 2, 8, 6, 32, 16, mlp="moe", n_experts=8, top_k=2, d_shared=10, shared_gate=True)
    D, F = 16, 6
    assert flops.mlp_flops(c) == 8 * 6 * D * F + 2 * D * 8 + 6 * D * 10 + 2 * D
    assert flops.mlp_flops(c, sparse=True) == 2 * 6 * D * F + 2 * D * 8 + 6 * D * 10 + 2 * D
    assert flops.forward_flops(c, 1, 4) - flops.forward_flops(c, 1, 4, sparse=True) == 2 * 4 * 6 * 6 * D * F
    one = planner.plan(c, 2, 8, memory=2**30)
    split = planner.plan(c, 2, 8, mesh={"expert": 4}, memory=2**30)
    assert split.params < one.params and split.activations < one.activations


def test_fused_expert_layout_loads_the_same_params(zoo, tmp_path):
    """transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj [E, 2F, D], down_proj
    [E, D, F]; Mixtral's mlp.gate) and save_pretrained writes them per expert (Mixtral: block_sparse_moe
    w1/w2/w3): a checkpoint in either layout loads to the same parameters."""
    from safetensors.torch import save_file

    for name in ("mixtral-top2of5-sliding", "qwen2moe-shared-bias"):
        hf, _, m = zoo(name)
        d = tmp_path / name
        hf.config.save_pretrained(d)
        sd = hf.state_dict()
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        fused = jinterp.load(d, tokenizer=False)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fused.params, m.params)


@pytest.mark.parametrize("cls,kw,match", [
    (hf_zoo.tf.Qwen2MoeConfig, dict(mlp_only_layers=[1]), r"dense MLP layers \[1\] \(mlp_only_layers=\[1\]"),
    (hf_zoo.tf.Qwen3MoeConfig, dict(decoder_sparse_step=2), r"dense MLP layers \[0\].*decoder_sparse_step=2"),
    (hf_zoo.tf.OlmoeConfig, dict(clip_qkv=8.0), "clip_qkv=8.0"),
])
def test_unsupported_moe_options_are_named(tmp_path, cls, kw, match):
    base = dict(hf_zoo.MOE, num_experts=4, num_experts_per_tok=2)
    cls(**base, **kw).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedArchitecture, match=match):
        jinterp.load(str(tmp_path), tokenizer=False)


def test_config_checks_the_moe_fields():
    base = ("m", 1, 8, 1, 1, 8, 4, 10, 8)
    with pytest.raises(ValueError, match="top_k=5 experts per token is more than n_experts=4"):
        Config(*base, mlp="moe", n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="n_experts must be a positive integer"):
        Config(*base, mlp="moe", top_k=1)
    with pytest.raises(ValueError, match="set mlp='moe'"):
        Config(*base, mlp="gated", n_experts=4, top_k=2)
    with pytest.raises(ValueError, match="shared_gate .* needs a shared expert"):
        Config(*base, mlp="moe", n_experts=4, top_k=2, shared_gate=True)
