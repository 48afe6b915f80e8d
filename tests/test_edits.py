"""Edits checked against HF torch with forward hooks doing the same intervention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jinterp
from jinterp import edits as E
from tests import hf_zoo

B, P = 3, 9


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied-bias"])
def pair(request, tmp_path_factory):
    hf = hf_zoo.build(request.param)
    return request.param, hf, jinterp.load(hf_zoo.save(hf, tmp_path_factory.mktemp(request.param)))


def toks(seed):
    return np.random.RandomState(seed).randint(0, hf_zoo.V, (B, P)).astype(np.int64)


def _modules(hf, name, l):
    layer = hf_zoo.layers(hf)[l]
    if name.startswith("gpt2"):
        return layer, layer.attn.c_proj, layer.mlp.c_proj, layer.attn
    return layer, layer.self_attn.o_proj, layer.mlp.down_proj, layer.self_attn


def hf_logits(hf, tokens, hooks):
    """hooks: list of (module, "pre"|"post", fn). pre: fn(input tensor) -> tensor; post: fn(output) -> output."""
    hs = []
    for mod, kind, fn in hooks:
        if kind == "pre":
            hs.append(mod.register_forward_pre_hook(lambda m, a, fn=fn: (fn(a[0]),) + tuple(a[1:])))
        else:
            def post(m, a, o, fn=fn):
                if isinstance(o, tuple):
                    return (fn(o[0]),) + tuple(o[1:])
                return fn(o)
            hs.append(mod.register_forward_hook(post))
    try:
        with torch.no_grad():
            return hf(torch.as_tensor(tokens)).logits.numpy()
    finally:
        for h in hs:
            h.remove()


def close(ours, ref, atol=3e-5):
    err = np.abs(np.asarray(ours) - ref).max()
    assert err < atol * max(1, np.abs(ref).max()), err


def test_steer_resid_pre(pair):
    name, hf, m = pair
    vec = np.random.RandomState(1).randn(m.cfg.d_model).astype(np.float32)
    layer, _, _, _ = _modules(hf, name, 1)

    def pre(x):
        x = x.clone()
        x[:, 2:5] += 0.7 * torch.as_tensor(vec)
        return x

    hs = [layer.register_forward_pre_hook(lambda mod, a, k: ((pre(a[0]),) + a[1:], k) if a else (a, {**k, "hidden_states": pre(k["hidden_states"])}), with_kwargs=True)]
    try:
        with torch.no_grad():
            ref = hf(torch.as_tensor(toks(0))).logits.numpy()
    finally:
        hs[0].remove()
    ours = m(toks(0), edits=[E.steer("blocks.1.hook_resid_pre", vec, 0.7, pos=[2, 3, 4])])
    close(ours, ref)


def test_zero_and_mean_ablate_head_z(pair):
    name, hf, m = pair
    H, dh = m.cfg.n_heads, m.cfg.d_head
    _, o_proj, _, _ = _modules(hf, name, 2)

    def zero_head(x):
        x = x.clone().view(B, P, H, dh)
        x[:, :, 1] = 0
        return x.view(B, P, H * dh)

    close(m(toks(0), edits=[E.zero_ablate("blocks.2.attn.hook_z", heads=[1])]), hf_logits(hf, toks(0), [(o_proj, "pre", zero_head)]))

    _, cache = m.run_with_cache(toks(0), names=["blocks.2.attn.hook_z"])
    z = np.asarray(cache["blocks.2.attn.hook_z"])
    mean = torch.as_tensor(z.mean(0))

    def mean_head(x):
        x = x.clone().view(B, P, H, dh)
        x[:, 3:, 2] = mean[3:, 2]
        return x.view(B, P, H * dh)

    ours = m(toks(0), edits=[E.mean_ablate("blocks.2.attn.hook_z", z, heads=[2], pos=list(range(3, P)))])
    close(ours, hf_logits(hf, toks(0), [(o_proj, "pre", mean_head)]))


def test_patch_and_subspace_patch_mlp_post(pair):
    """Patch MLP activations from a clean run, fully and only within a random 3-D subspace."""
    name, hf, m = pair
    _, _, down, _ = _modules(hf, name, 0)
    _, clean = m.run_with_cache(toks(1), names=["blocks.0.mlp.hook_post"])
    src = np.array(clean["blocks.0.mlp.hook_post"])
    basis = np.linalg.qr(np.random.RandomState(2).randn(m.cfg.d_mlp, 3))[0].astype(np.float32)
    Bt, St = torch.as_tensor(basis), torch.as_tensor(src)

    def full(x):
        x = x.clone()
        x[:, -1] = St[:, -1]
        return x

    def sub(x):
        return x + (St - x) @ Bt @ Bt.T

    close(m(toks(0), edits=[E.patch("blocks.0.mlp.hook_post", src, pos=[-1])]), hf_logits(hf, toks(0), [(down, "pre", full)]))
    close(m(toks(0), edits=[E.subspace_patch("blocks.0.mlp.hook_post", src, basis)]), hf_logits(hf, toks(0), [(down, "pre", sub)]))


def test_scale_attn_out_and_composition(pair):
    """Two edits compose in order: scale attn_out at layer 0, then add to resid_post at layer 2."""
    name, hf, m = pair
    _, _, _, attn = _modules(hf, name, 0)
    last = hf_zoo.layers(hf)[2]
    vec = np.random.RandomState(3).randn(m.cfg.d_model).astype(np.float32)
    ref = hf_logits(hf, toks(0), [(attn, "post", lambda o: o * 0.3), (last, "post", lambda o: o + torch.as_tensor(vec))])
    ours = m(toks(0), edits=[E.scale("hook_attn_out", 0.3, layers=0), E.steer("hook_resid_post", vec, layers=[2])])
    close(ours, ref)


def test_knockout_matches_masked_hf_attention(pair):
    """Knock out query positions {6, 8} from key positions {1, 2} in layers 1-2, every head."""
    name, hf, m = pair
    hooks = []
    for l in (1, 2):
        attn = _modules(hf, name, l)[3]

        def pre(mod, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.zeros(B, 1, P, P)
                mask.masked_fill_(torch.triu(torch.ones(P, P, dtype=torch.bool), 1), torch.finfo(torch.float32).min)
            elif mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
            mask = mask.clone().expand(B, 1, P, P).clone()
            for q in (6, 8):
                for k in (1, 2):
                    mask[:, :, q, k] = torch.finfo(torch.float32).min
            kwargs["attention_mask"] = mask
            return args, kwargs

        hooks.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            ref = hf(torch.as_tensor(toks(0))).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    ours = m(toks(0), edits=[E.knockout(query_pos=[6, 8], key_pos=[1, 2], layers=range(1, 3))])
    close(ours, ref)
    assert np.abs(np.asarray(ours) - np.asarray(m(toks(0)))).max() > 1e-3  # the knockout did something


def test_identities(pair):
    _, _, m = pair
    base = np.asarray(m(toks(0)))
    # knockout of nothing changes nothing
    none = E.knockout(query_pos=np.zeros(P, bool), key_pos=np.zeros(P, bool))
    np.testing.assert_allclose(np.asarray(m(toks(0), edits=[none])), base, atol=1e-6)
    # patching every position of resid_pre at layer 0 from the clean cache reproduces the clean logits
    clean_logits, cache = m.run_with_cache(toks(1), names=["blocks.0.hook_resid_pre"])
    patched = m(toks(0), edits=[E.patch("blocks.0.hook_resid_pre", cache["blocks.0.hook_resid_pre"])])
    np.testing.assert_allclose(np.asarray(patched), np.asarray(clean_logits), atol=2e-5)


def hf_generate_with_hook(hf, prompt, layer, hook, n=6):
    """HF greedy generation with a forward hook on one decoder layer."""
    hk = hf_zoo.layers(hf)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                               max_new_tokens=n, do_sample=False).numpy()
    finally:
        hk.remove()


def test_back_patched_generation_matches_hf_prompt_only_hook(pair):
    """Hopping Too Late: resid_post[i] at t written into resid_post[j] at t on the prompt pass only."""
    name, hf, m = pair
    t, i, j = P - 1, 2, 0
    prompt = toks(4)
    _, cache = m.run_with_cache(prompt, names=[f"blocks.{i}.hook_resid_post"])
    H = np.array(cache[f"blocks.{i}.hook_resid_post"])[:, t]

    def post(mod, a, o):
        h = o[0] if isinstance(o, tuple) else o
        if h.shape[1] == 1:  # KV-cached decoding step: leave alone
            return o
        h = h.clone()
        h[:, t] = torch.as_tensor(H)
        return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

    ref = hf_generate_with_hook(hf, prompt, j, post)
    e = E.patch(f"blocks.{j}.hook_resid_post", cache[f"blocks.{i}.hook_resid_post"], pos=[t])
    np.testing.assert_array_equal(np.asarray(m.generate(prompt, 6, edits=[e])), ref)


def test_steering_generation_applies_to_new_tokens(pair):
    """pos=None edits reach generated tokens too: compare with an HF hook that fires on every pass."""
    name, hf, m = pair
    vec = 3 * np.random.RandomState(5).randn(m.cfg.d_model).astype(np.float32)
    prompt = toks(6)
    add = lambda mod, a, o: ((o[0] + torch.as_tensor(vec),) + tuple(o[1:])) if isinstance(o, tuple) else o + torch.as_tensor(vec)
    ref = hf_generate_with_hook(hf, prompt, 1, add)
    ours = m.generate(prompt, 6, edits=[E.steer("blocks.1.hook_resid_post", vec)])
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_grad_and_vmap_through_edits(pair):
    _, _, m = pair
    from jinterp import arch

    t = jnp.asarray(toks(0), jnp.int32)
    vec = jnp.asarray(np.random.RandomState(7).randn(m.cfg.d_model), jnp.float32)

    def f(coeff):
        e = E.steer("blocks.1.hook_resid_mid", vec, coeff)
        return arch.forward(m.params, t, None, (e,), cfg=m.cfg)[0][:, -1, 5].sum()

    g = jax.grad(f)(0.5)
    fd = (f(0.5 + 1e-2) - f(0.5 - 1e-2)) / 2e-2
    assert abs(float(g) - float(fd)) < 2e-2 * max(1, abs(float(fd)))
    coeffs = jnp.asarray([0.0, 0.5, 2.0])
    vm = jax.vmap(f)(coeffs)
    np.testing.assert_allclose(np.asarray(vm), [float(f(c)) for c in coeffs], rtol=1e-5, atol=1e-4)


def test_bad_edits_rejected(pair):
    _, _, m = pair
    x = toks(0)
    with pytest.raises(jinterp.sites.SiteError, match="Did you mean"):
        E.patch("blocks.0.hook_resid_prr", np.zeros(m.cfg.d_model))
    with pytest.raises(E.EditError, match="layer 9 is out of range"):
        m(x, edits=[E.steer("resid_pre", np.zeros(m.cfg.d_model), layers=[9])])
    with pytest.raises(E.EditError, match="position 12 is out of range"):
        m(x, edits=[E.zero_ablate("resid_pre", layers=0, pos=[12])])
    with pytest.raises(E.EditError, match="head 7 is out of range"):
        m(x, edits=[E.zero_ablate("z", layers=0, heads=[7])])
    with pytest.raises(E.EditError, match="value has shape"):
        m(x, edits=[E.patch("blocks.0.hook_resid_pre", np.zeros((B, P + 2, m.cfg.d_model)))])
    with pytest.raises(E.EditError, match="no head axis"):
        m(x, edits=[E.zero_ablate("resid_pre", layers=0, heads=[0])])
    with pytest.raises(E.EditError, match="not an Edit"):
        m(x, edits=["blocks.0.hook_resid_pre"])


def test_more_bad_edits_and_generate_args(pair):
    _, _, m = pair
    x = toks(0)
    with pytest.raises(E.EditError, match="global site"):
        m(x, edits=[E.patch("ln_final.hook_scale", np.ones((2, B, P, 1)), per_layer=True)])
    with pytest.raises(ValueError, match="empty selector"):
        E.zero_ablate("resid_pre", layers=[])
    with pytest.raises(TypeError, match="bare bool"):
        E.zero_ablate("resid_pre", layers=True)
    with pytest.raises(jinterp.InputError, match="max_new_tokens"):
        m.generate(x, 0)
    with pytest.raises(jinterp.InputError, match="top_k"):
        m.generate(x, 2, do_sample=True, top_k=m.cfg.d_vocab + 1)


# ----------------------------------------------------------------------------------------
# the op protocol, StopGradient, traced validation and the documented value-shape rules

from flax import struct  # noqa: E402


@struct.dataclass
class Mix(E.Op):
    """A new op, defined here and nowhere else: new = (1 - alpha) * x + alpha * value."""

    value: E.Value
    alpha: jax.Array

    def __call__(self, x, at):
        return (1 - self.alpha) * x + self.alpha * at.read(self.value)


def test_new_op_is_one_small_class(pair):
    """A user-defined op runs through model(...), jit and grad with no change anywhere else, and
    equals patching in the mixture computed by hand from the unedited activation."""
    _, _, m = pair
    name = "blocks.1.hook_resid_pre"
    _, cc = m.run_with_cache(toks(1), names=[name])
    _, base = m.run_with_cache(toks(0), names=[name])
    src, x = np.asarray(cc[name]), np.asarray(base[name])
    mix = E.edit(name, Mix(E.Value.of("hook_resid_pre", src), jnp.float32(0.3)), pos=[2, -1])
    assert repr(mix).startswith("Edit(Mix(") and "\n" not in repr(mix)
    ref = m(toks(0), edits=[E.patch(name, 0.7 * x + 0.3 * src, pos=[2, -1])])
    close(m(toks(0), edits=[mix]), np.asarray(ref), atol=1e-5)
    # alpha is a leaf: differentiable, and a sweep under vmap
    f = lambda a: m(toks(0), edits=[E.edit(name, Mix(E.Value.of("hook_resid_pre", src), a), pos=[2, -1])])[:, -1, 3].sum()
    assert abs(float(jax.grad(f)(0.3))) > 0
    alphas = jnp.asarray([0.0, 0.3])
    np.testing.assert_allclose(np.asarray(jax.vmap(f)(alphas)), [float(f(a)) for a in alphas], rtol=1e-5, atol=1e-4)
    with pytest.raises(E.EditError, match="Mix.value"):
        m(toks(0), edits=[E.edit(name, Mix(E.Value.of("hook_resid_pre", src[:, :4]), jnp.float32(0.3)))])


def test_stop_gradient(pair):
    """Forward unchanged; the gradient is zero exactly at the selected entries and unchanged elsewhere."""
    _, _, m = pair
    D = m.cfg.d_model
    x = toks(0)
    base = np.asarray(m(x))
    sg = E.stop_gradient("blocks.1.hook_resid_pre", pos=[2, 5])
    assert repr(sg) == "Edit(StopGradient() at hook_resid_pre, layers=int32[1], pos=int32[2])"
    np.testing.assert_array_equal(np.asarray(m(x, edits=[sg])), base)

    def grad(stop):
        def f(v):  # a zero additive edit ahead of the stop: its gradient is the gradient at the site
            es = [E.steer("blocks.1.hook_resid_pre", v)] + ([stop] if stop is not None else [])
            return m(x, edits=es)[:, -1, 7].sum()

        return np.asarray(jax.grad(f)(jnp.zeros((B, P, D), jnp.float32)))

    g0, g = grad(None), grad(sg)
    assert np.abs(g0[:, [2, 5]]).min(axis=-1).max() > 0
    np.testing.assert_array_equal(g[:, [2, 5]], 0)
    keep = [p for p in range(P) if p not in (2, 5)]
    np.testing.assert_allclose(g[:, keep], g0[:, keep], rtol=1e-5, atol=1e-7)
    # per head on attn.hook_z: only the selected head's gradient is stopped
    H, dh = m.cfg.n_heads, m.cfg.d_head

    def gz(stop):
        f = lambda v: m(x, edits=[E.steer("blocks.0.attn.hook_z", v)] + stop)[:, -1, 7].sum()
        return np.asarray(jax.grad(f)(jnp.zeros((B, P, H, dh), jnp.float32)))

    g0, g = gz([]), gz([E.stop_gradient("blocks.0.attn.hook_z", heads=[1])])
    np.testing.assert_array_equal(g[:, :, 1], 0)
    np.testing.assert_allclose(np.delete(g, 1, axis=2), np.delete(g0, 1, axis=2), rtol=1e-5, atol=1e-7)


def test_traced_edits_are_validated(pair):
    """Shape checks run on traced values and selectors (jit, vmap); apply re-checks inside the
    forward, so a recipe's edits built in a compiled sweep cannot slip a wrong shape through."""
    _, _, m = pair
    from jinterp import arch

    x, D = toks(0), m.cfg.d_model
    site = "blocks.0.hook_resid_pre"
    bad = jnp.zeros((2, B, P + 2, D))
    with pytest.raises(E.EditError, match="value has shape"):
        jax.vmap(lambda v: m(x, edits=[E.patch(site, v)]))(bad)
    with pytest.raises(E.EditError, match="value has shape"):
        jax.jit(lambda v: m(x, edits=[E.patch(site, v)]))(bad[0])
    with pytest.raises(E.EditError, match="axis 'batch' must be 3"):
        jax.jit(lambda v: m(x, edits=[E.steer(site, v)]))(jnp.zeros((B + 1, 1, D)))
    with pytest.raises(E.EditError, match="per-example pos has 4 rows"):
        jax.jit(lambda p: m(x, edits=[E.zero_ablate(site, pos=p)]))(jnp.zeros((B + 1, 2), jnp.int32))
    with pytest.raises(E.EditError, match="'selected' axis has 2 entries|axis 'selected' must be 2"):
        jax.jit(lambda v: m(x, edits=[E.patch(site, v, pos=[1, 3], pos_axis="selected")]))(jnp.zeros((B, 3, D)))
    # below the model's boundary too: the forward itself checks value shapes at trace time
    with pytest.raises(E.EditError, match="value has shape"):
        arch.forward(m.params, jnp.asarray(x, jnp.int32), None, (E.patch(site, bad[0]),), cfg=m.cfg)
    # traced indices: shapes are checked, ranges cannot be; a good traced edit runs and is exact
    good = jax.jit(lambda p: m(x, edits=[E.zero_ablate(site, pos=p)]))(jnp.asarray([3], jnp.int32))
    np.testing.assert_array_equal(np.asarray(good), np.asarray(m(x, edits=[E.zero_ablate(site, pos=[3])])))


def _unembed(m, h):
    """Logits from ln_final.hook_normalized (before the final norm's weight and bias, as in TransformerLens)."""
    p, f = m.params["unembed"], m.params["ln_final"]
    h = np.asarray(h, np.float64) * np.asarray(f["w"], np.float64) + (np.asarray(f["b"], np.float64) if "b" in f else 0.0)
    return h @ np.asarray(p["W_U"], np.float64) + np.asarray(p["b_U"], np.float64)


def test_value_shape_rules_against_numpy(pair):
    """ln_final.hook_normalized feeds the logits linearly, so each documented rule can be checked
    by editing the cached activation in numpy and unembedding it."""
    _, _, m = pair
    D, site = m.cfg.d_model, "ln_final.hook_normalized"
    x = toks(0)
    _, cache = m.run_with_cache(x, names=[site])
    h = np.asarray(cache[site], np.float64)
    rs = np.random.RandomState(11)
    full = rs.randn(B, P, D).astype(np.float32)
    sel = rs.randn(B, 2, D).astype(np.float32)
    vec = rs.randn(D).astype(np.float32)
    per_ex = np.array([[1, 6], [0, 8], [7, 2]])

    def check(edit, fn):
        ref = h.copy()
        fn(ref)
        close(m(x, edits=[edit]), _unembed(m, ref), atol=1e-5)

    # "pos" = the full sequence: value[:, p] lands at absolute position p
    def f1(r):
        r[:, [1, P - 2]] = full[:, [1, P - 2]]
    check(E.patch(site, full, pos=[1, -2]), f1)

    # "selected": value[:, j] lands at pos[j]
    def f2(r):
        r[:, 1], r[:, P - 2] = sel[:, 0], sel[:, 1]
    check(E.patch(site, sel, pos=[1, -2], pos_axis="selected"), f2)

    # per-example positions, both ways
    def f3(r):
        for b in range(B):
            r[b, per_ex[b]] = full[b, per_ex[b]]
    check(E.patch(site, full, pos=per_ex), f3)

    def f4(r):
        for b in range(B):
            for j in range(2):
                r[b, per_ex[b, j]] += sel[b, j]
    check(E.steer(site, sel, pos=per_ex, pos_axis="selected"), f4)

    # a selected-positions value without a batch axis is shared by every example
    def f5(r):
        for b in range(B):
            r[b, per_ex[b]] = sel[0]
    check(E.patch(site, sel[0], pos=per_ex, pos_axis="selected"), f5)

    # no position axis: the value goes to every selected position
    def f6(r):
        r[:, 3:] += 2 * vec
    check(E.steer(site, vec, 2.0, pos=np.arange(P) >= 3), f6)

    # a length-2 pos axis is never read as absolute positions: it is an error unless declared selected
    with pytest.raises(E.EditError, match="axis 'pos' must be 9 or 1"):
        m(x, edits=[E.patch(site, sel, pos=[1, -2])])
    with pytest.raises(E.EditError, match="needs pos= as a list of position indices"):
        m(x, edits=[E.patch(site, sel, pos=np.arange(P) < 2, pos_axis="selected")])
    with pytest.raises(E.EditError, match="needs pos= as a list"):
        m(x, edits=[E.patch(site, sel, pos_axis="selected")])


def test_selected_per_layer_equals_full(pair):
    """A per-layer value on the selected positions equals the same writes as a full-sequence value."""
    _, _, m = pair
    L, D = m.cfg.n_layers, m.cfg.d_model
    sel = np.random.RandomState(12).randn(L, B, 2, D).astype(np.float32)
    full = np.zeros((L, B, P, D), np.float32)
    full[:, :, [4, 1]] = sel
    a = m(toks(0), edits=[E.patch("resid_pre", sel, layers=[1, 2], pos=[4, 1], per_layer=True, pos_axis="selected")])
    b = m(toks(0), edits=[E.patch("resid_pre", full, layers=[1, 2], pos=[4, 1], per_layer=True)])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # in generation both write the prompt only (decoding steps are not among the selected positions)
    ga = m.generate(toks(0), 3, edits=[E.patch("resid_pre", sel, layers=[1, 2], pos=[4, 1], per_layer=True, pos_axis="selected")])
    gb = m.generate(toks(0), 3, edits=[E.patch("resid_pre", full, layers=[1, 2], pos=[4, 1], per_layer=True)])
    assert not np.array_equal(np.asarray(ga), np.asarray(m.generate(toks(0), 3)))  # the edit did something
    np.testing.assert_array_equal(np.asarray(ga), np.asarray(gb))


def test_named_value_axes(pair):
    """A Value names any subsequence of the site's axes: one factor per (layer, head) on attn.hook_z
    equals one scale edit per layer and head."""
    _, _, m = pair
    L, H = m.cfg.n_layers, m.cfg.n_heads
    c = np.random.RandomState(13).uniform(0.2, 1.5, (L, H)).astype(np.float32)
    a = m(toks(0), edits=[E.scale("z", E.Value(jnp.asarray(c), ("layer", "head")))])
    b = m(toks(0), edits=[E.scale("z", c[l, h], layers=[l], heads=[h]) for l in range(L) for h in range(H)])
    close(a, np.asarray(b), atol=1e-5)
    with pytest.raises(E.EditError, match="layout order"):
        m(toks(0), edits=[E.scale("z", E.Value(jnp.ones((H, B)), ("head", "batch")))])
    with pytest.raises(E.EditError, match="does not have"):
        m(toks(0), edits=[E.scale("z", E.Value(jnp.asarray(c), ("layer", "d_mlp")))])


def test_set_where_mask_as_data_matches_per_head_patches(pair):
    """SetWhere with a [layer, head] mask equals patching each of those heads with the per-layer
    source (an independent edit), and an empty mask changes nothing."""
    _, _, m = pair
    L, H = m.cfg.n_layers, m.cfg.n_heads
    t = toks(7)
    _, cache = m.run_with_cache(toks(8), names=lambda n: n.endswith("attn.hook_z"))
    src = cache.stack("attn.hook_z")  # [L, B, P, H, dh]
    mask = np.zeros((L, H), np.float32)
    mask[0, 1] = mask[L - 1, 0] = 1.0

    def set_where(mk):
        return E.edit("attn.hook_z", E.SetWhere(E.Value(src, ("layer", "batch", "pos", "head", "d_head")),
                                                E.Value(mk[:, :, None], ("layer", "head", "d_head"))))

    ref = m(t, edits=[E.patch("attn.hook_z", src, layers=[0], heads=[1], per_layer=True),
                      E.patch("attn.hook_z", src, layers=[L - 1], heads=[0], per_layer=True)])
    close(m(t, edits=[set_where(mask)]), ref, atol=1e-6)
    close(m(t, edits=[set_where(np.zeros_like(mask))]), m(t), atol=1e-6)
