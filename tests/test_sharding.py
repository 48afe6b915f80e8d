"""Parameters sharded on a device mesh (jinterp.load(..., mesh=)): the placements follow the
partition rules, and every entry point gives the single-device numbers (8 virtual CPU devices)."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers as tf
from jax.sharding import AxisType

import jinterp
from jinterp import attribution, metrics, patching, sharding

V = 96
CONFIGS = {
    # 8 heads and d_mlp 64 divide by every model axis; 2 kv heads are split on model=2 and replicated above
    "llama": tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=2, vocab_size=V, max_position_embeddings=64),
    # vocabulary 97 divides by nothing: the (un)embedding splits d_model over both axes instead
    "gpt2": tf.GPT2Config(n_layer=2, n_embd=32, n_head=8, vocab_size=97, n_positions=64),
}
MESHES = [(8, 1), (2, 4), (1, 8)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        m = tf.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d)
        out[name] = (str(d), jinterp.load(d, tokenizer=False))
    return out


def mesh(shape, auto=True):
    kw = dict(axis_types=(AxisType.Auto,) * 2) if auto else {}
    return jax.make_mesh(shape, ("data", "model"), **kw)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_model_matches_one_device(saved, name, shape):
    d, ref = saved[name]
    m = jinterp.load(d, tokenizer=False, mesh=mesh(shape, auto=shape != (2, 4)))  # (2, 4): jax's default Explicit mesh
    data, model = shape
    # placements, read back from the arrays
    assert m.mesh is not None and dict(m.mesh.shape) == {"data": data, "model": model}
    spec = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
    M, D = ("model" if model > 1 else None), ("data" if data > 1 else None)
    assert spec(m.params["blocks"]["attn"]["W_Q"]) == (None, M, D, None)
    assert spec(m.params["blocks"]["mlp"]["W_out"]) == (None, M, D)
    kv = M if m.cfg.n_kv_heads % model == 0 else None
    assert spec(m.params["blocks"]["attn"]["W_K"]) == (None, kv, D, None)
    if m.cfg.d_vocab % model == 0:
        assert spec(m.params["embed"]["W_E"]) == (M, D)
    else:
        both = tuple(a for a in (D, M) if a) or None
        assert spec(m.params["embed"]["W_E"]) == (None, both if both and len(both) > 1 else (both[0] if both else None))
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every entry point gives the single-device numbers
    rs = np.random.RandomState(0)
    toks = rs.randint(0, m.cfg.d_vocab, (2, 7))
    corr = rs.randint(0, m.cfg.d_vocab, (2, 7))
    np.testing.assert_allclose(np.asarray(m(toks)), np.asarray(ref(toks)), atol=2e-5)
    names = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post"]
    _, c1 = m.run_with_cache(toks, names=names)
    _, c0 = ref.run_with_cache(toks, names=names)
    for n in names:
        np.testing.assert_allclose(np.asarray(c1[n]), np.asarray(c0[n]), atol=2e-5)
    prompt = np.asarray(toks[:, :4])
    np.testing.assert_array_equal(np.asarray(m.generate(prompt, max_new_tokens=3)),
                                  np.asarray(ref.generate(prompt, max_new_tokens=3)))
    metric = metrics.logit_diff(rs.randint(0, m.cfg.d_vocab, (2, 2)))
    _, clean = ref.run_with_cache(toks)
    _, clean_s = m.run_with_cache(toks)
    np.testing.assert_allclose(patching.resid_pre(m, corr, clean_s, metric, progress=False).values,
                               patching.resid_pre(ref, corr, clean, metric, progress=False).values, atol=2e-5)
    got = attribution.attribution_patching(m, toks, corr, metric)
    want = attribution.attribution_patching(ref, toks, corr, metric)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k].values), np.asarray(want[k].values), atol=2e-5)


def test_mesh_that_does_not_fit(saved, tmp_path):
    d, _ = saved["llama"]
    bad = jax.make_mesh((1, 8), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    cfg = jinterp.Config(family="llama", n_layers=1, d_model=32, n_heads=4, n_kv_heads=4, d_head=8, d_mlp=64,
                         d_vocab=V, n_ctx=64, norm="rmsnorm", mlp="gated", act="silu", positional="rotary",
                         rotary_dim=8)
    with pytest.raises(sharding.ShardingError, match=r"n_heads=4 does not divide by the 'model' axis \(8\).*data=2,model=4"):
        sharding.check_mesh(cfg, bad)
    with pytest.raises(sharding.ShardingError, match="name them 'data' and/or 'model'"):
        jinterp.load(d, mesh=jax.make_mesh((8,), ("x",)))
    # refused before any weight is read: a checkpoint with no weights at all still gets the mesh error
    (tmp_path / "config.json").write_text(open(f"{d}/config.json").read().replace('"num_attention_heads": 8', '"num_attention_heads": 4'))
    with pytest.raises(sharding.ShardingError, match="n_heads=4"):
        jinterp.load(tmp_path, mesh=bad)


def test_bf16_sharded_keeps_norms_fp32(saved):
    d, _ = saved["llama"]
    m = jinterp.load(d, dtype=jnp.bfloat16, tokenizer=False, mesh=mesh((2, 4)))
    assert m.params["blocks"]["attn"]["W_Q"].dtype == jnp.bfloat16
    assert m.params["blocks"]["ln1"]["w"].dtype == jnp.float32 and m.params["ln_final"]["w"].dtype == jnp.float32


LOAD_PEAK = r"""
import json, sys
import numpy as np
from safetensors.numpy import save_file
d = sys.argv[1]
L, D, F, V, H, K = 8, 512, 2048, 8000, 8, 2
rs = np.random.RandomState(0)
t = {"model.embed_tokens.weight": rs.randn(V, D).astype(np.float32), "model.norm.weight": np.ones(D, np.float32),
     "lm_head.weight": rs.randn(V, D).astype(np.float32)}
for l in range(L):
    p = f"model.layers.{l}."
    for n, s in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (K * D // H, D)), ("self_attn.v_proj", (K * D // H, D)),
                 ("self_attn.o_proj", (D, D)), ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)), ("mlp.down_proj", (D, F))):
        t[p + n + ".weight"] = rs.randn(*s).astype(np.float32)
    t[p + "input_layernorm.weight"] = np.ones(D, np.float32)
    t[p + "post_attention_layernorm.weight"] = np.ones(D, np.float32)
save_file(t, d + "/model.safetensors")
json.dump(dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=D, intermediate_size=F,
               num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=K, vocab_size=V,
               max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False), open(d + "/config.json", "w"))
file_bytes = sum(a.nbytes for a in t.values())
del t
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
import jax, jax.numpy as jnp, jinterp
from jinterp import planner
jnp.zeros(1).block_until_ready()
planner.config_of(d)  # imports transformers and parses the config: not loading's own memory
import resource, gc
gc.collect()
# VmHWM is this process's peak so far (the random tensors above): measure loading's own peak with a fresh mark
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
m = jinterp.load(d, tokenizer=False)
nbytes = sum(a.nbytes for a in jax.tree.leaves(m.params))
print(json.dumps(dict(model=nbytes, peak=rss("VmHWM:") - before)))
"""


def test_loading_peak_memory(tmp_path):
    """Loading holds the placed parameters plus one in flight: its peak resident memory stays within
    1.2x the parameters' bytes (+ 16 MB for the allocator's and jax's bookkeeping)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={"JINTERP_COMPILE_CACHE": "0", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["model"] > 100e6
    assert got["peak"] <= 1.2 * got["model"] + 16e6, got


@pytest.fixture(scope="module")
def on_mesh(saved):
    """The llama model sharded data=2 x model=4 and on one device, two token batches and a metric."""
    d, ref = saved["llama"]
    rs = np.random.RandomState(1)
    toks, corr = rs.randint(0, V, (2, 6)), rs.randint(0, V, (2, 6))
    return jinterp.load(d, tokenizer=False, mesh=mesh((2, 4))), ref, toks, corr, metrics.logit_diff(rs.randint(0, V, (2, 2)))


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.slow  # ~20 sweep programs partitioned over the mesh (about a minute)
def test_every_recipe_on_a_sharded_model(on_mesh):
    """Every patching recipe (the three `*_every` groups, head ablation, path patching, back-patching)
    on sharded parameters gives the single-device numbers."""
    from jinterp import path_patching

    m, ref, toks, corr, metric = on_mesh
    _, c_ref = ref.run_with_cache(toks)
    _, c_m = m.run_with_cache(toks)
    for group in (patching.block_every, patching.attn_head_all_pos_every, patching.attn_head_by_pos_every):
        got, want = group(m, corr, c_m, metric, progress=False), group(ref, corr, c_ref, metric, progress=False)
        assert list(got) == list(want)
        for k in want:
            close(got[k].values, want[k].values)
    close(patching.head_ablation(m, toks, metric, progress=False).values,
          patching.head_ablation(ref, toks, metric, progress=False).values)
    close(path_patching.path_patching(m, toks, corr, metric, progress=False).values,
          path_patching.path_patching(ref, toks, corr, metric, progress=False).values)
    bp = lambda model: patching.back_patching(model, toks, metric=metric, progress=False).metric.values
    close(bp(m), bp(ref))


@pytest.mark.slow  # ~25 s of SPMD compiles (a DAS fit among them); the default run keeps the entry points above
def test_dictionaries_and_das_on_a_sharded_model(on_mesh):
    """On sharded parameters, a spliced sparse dictionary (reconstruction, features, their attribution)
    and DAS (patched logits, and a short fit) give the single-device numbers."""
    import jax.numpy as jnp

    from jinterp import saes
    from jinterp.saes import splicing
    from jinterp.train import das

    m, ref, toks, corr, metric = on_mesh
    r = np.random.default_rng(0)
    sae = saes.Dictionary(W_enc=jnp.asarray(r.normal(0, 0.3, (32, 48)), jnp.float32),
                          W_dec=jnp.asarray(r.normal(0, 0.1, (48, 32)), jnp.float32),
                          b_dec=jnp.zeros(32, jnp.float32), b_enc=jnp.asarray(r.normal(-0.1, 0.1, 48), jnp.float32),
                          architecture="standard", site="hook_resid_post", layer=0)
    close(m(toks, edits=[splicing.splice(sae, keep_error=False)]), ref(toks, edits=[splicing.splice(sae, keep_error=False)]))
    (_, f_m), (_, f_ref) = splicing.run_with_features(m, toks, [sae]), splicing.run_with_features(ref, toks, [sae])
    for k in f_ref:
        close(f_m[k], f_ref[k])
    close(splicing.feature_attribution(m, sae, toks, metric), splicing.feature_attribution(ref, sae, toks, metric))

    basis = np.linalg.qr(r.normal(size=(1, 32, 2)))[0].astype(np.float32)
    close(das.patched_logits(m, toks, corr, basis, site="hook_resid_post", layers=[1], pos=[3]),
          das.patched_logits(ref, toks, corr, basis, site="hook_resid_post", layers=[1], pos=[3]))
    rs = np.random.RandomState(2)
    base, src, labels = rs.randint(0, V, (16, 6)), rs.randint(0, V, (16, 6)), rs.randint(0, V, 16)
    kw = dict(site="hook_resid_post", layers=[1], pos=-1, steps=3, batch_size=8, seed=0, progress=False)
    got, want = das.fit(m, base, src, labels, **kw), das.fit(ref, base, src, labels, **kw)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.basis, want.basis, atol=1e-4)
