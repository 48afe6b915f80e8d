"""ln*.hook_normalized has TransformerLens's meaning (before the norm's weight and bias) and
attn.hook_in / mlp.hook_in hold what the sublayers read (after them), checked against numpy from the
residual and the norm weights and against what HF's MLP / attention modules receive."""

import numpy as np
import pytest
import torch

import jinterp
from jinterp import edits as E
from jinterp import saes
from tests import hf_zoo

TOKS = np.random.RandomState(3).randint(0, hf_zoo.V, (2, 6)).astype(np.int32)


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa-untied-bias"])
def hf_and_model(request, tmp_path_factory):
    hf = hf_zoo.build(request.param)
    return request.param, hf, jinterp.load(hf_zoo.save(hf, tmp_path_factory.mktemp("norm")), tokenizer=False)


def _hf_inputs(hf, layer):
    """What HF's attention and MLP modules of `layer` receive (forward pre-hooks)."""
    got = {}
    blk = hf_zoo.layers(hf)[layer]
    attn = getattr(blk, "attn", None) or blk.self_attn
    def keep(key):
        def hook(mod, args, kwargs):
            got[key] = args[0] if args else kwargs["hidden_states"]
        return hook

    hs = [attn.register_forward_pre_hook(keep("attn"), with_kwargs=True),
          blk.mlp.register_forward_pre_hook(keep("mlp"), with_kwargs=True)]
    with torch.no_grad():
        hf(torch.as_tensor(TOKS, dtype=torch.long))
    for h in hs:
        h.remove()
    return {k: v.numpy() for k, v in got.items()}


def test_hook_normalized_is_before_the_affine_and_hook_in_after(hf_and_model):
    name, hf, m = hf_and_model
    _, c = m.run_with_cache(TOKS)
    ln = lambda i, l: {k: np.asarray(v[l], np.float64) for k, v in m.params["blocks"][f"ln{i}"].items()}  # noqa: E731
    L = m.cfg.n_layers - 1
    for i, resid, sub in ((1, "hook_resid_pre", "attn"), (2, "hook_resid_mid", "mlp")):
        x = np.asarray(c[f"blocks.{L}.{resid}"], np.float64)
        if name == "gpt2":  # LayerNorm: (x - mean) / sqrt(var + eps)
            xc = x - x.mean(-1, keepdims=True)
            n = xc / np.sqrt((xc**2).mean(-1, keepdims=True) + m.cfg.norm_eps)
        else:  # RMSNorm: x / rms
            n = x / np.sqrt((x**2).mean(-1, keepdims=True) + m.cfg.norm_eps)
        np.testing.assert_allclose(np.asarray(c[f"blocks.{L}.ln{i}.hook_normalized"]), n, rtol=1e-4, atol=1e-5)
        p = ln(i, L)
        post = n * p["w"] + p.get("b", 0.0)
        np.testing.assert_allclose(np.asarray(c[f"blocks.{L}.{sub}.hook_in"]), post, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(c[f"blocks.{L}.{sub}.hook_in"]), _hf_inputs(hf, L)[sub], rtol=1e-4, atol=1e-5)
    # ln_final too: logits = (hook_normalized * w + b) @ W_U + b_U
    f = m.params["ln_final"]
    fin = np.asarray(c["ln_final.hook_normalized"], np.float64) * np.asarray(f["w"]) + np.asarray(f.get("b", 0.0))
    logits = fin @ np.asarray(m.W_U, np.float64) + np.asarray(m.b_U)
    np.testing.assert_allclose(np.asarray(m(TOKS)), logits, rtol=1e-4, atol=1e-4)


def test_edit_at_hook_normalized_goes_through_the_affine(hf_and_model):
    """Adding v at ln2.hook_normalized adds v * w to what the MLP reads (TransformerLens's semantics)."""
    _, _, m = hf_and_model
    D = m.cfg.d_model
    v = np.random.RandomState(0).randn(D).astype(np.float32)
    _, clean = m.run_with_cache(TOKS, names=["blocks.0.mlp.hook_in"])
    _, edited = m.run_with_cache(TOKS, names=["blocks.0.mlp.hook_in", "blocks.0.ln2.hook_normalized"],
                                 edits=[E.steer("ln2.hook_normalized", v, layers=[0])])
    w = np.asarray(m.params["blocks"]["ln2"]["w"][0])
    np.testing.assert_allclose(np.asarray(edited["blocks.0.mlp.hook_in"]) - np.asarray(clean["blocks.0.mlp.hook_in"]),
                               np.broadcast_to(v * w, (2, 6, D)), rtol=1e-4, atol=1e-5)


def test_hook_name_mappings():
    assert saes.to_site("blocks.2.ln2.hook_normalized") == (2, "ln2.hook_normalized")  # literal TransformerLens: pre-affine
    assert saes.to_site("blocks.2.mlp.hook_in") == (2, "mlp.hook_in")  # circuit-tracer / SAELens: the MLP's input
    assert saes.to_site("blocks.2.attn.hook_in") == (2, "attn.hook_in")
    assert saes.to_site("model.layers.2.mlp.input") == (2, "mlp.hook_in")
    assert saes.to_site("model.layers.2.pre_feedforward_layernorm.output") == (2, "mlp.hook_in")
    assert saes.to_site("blocks.2.hook_mlp_in") == (2, "hook_resid_mid")  # TransformerLens: the residual entering ln2


def test_tl_hook_mlp_in_fits_sequential_blocks_and_is_named_on_parallel_ones():
    import jax.numpy as jnp

    kw = dict(family="gpt2", n_layers=2, d_model=8, n_heads=2, n_kv_heads=2, d_head=4, d_mlp=16, d_vocab=11, n_ctx=16,
              norm="layernorm", positional="learned", act="gelu_new")
    d = saes.Dictionary(W_enc=jnp.zeros((8, 4)), b_enc=jnp.zeros(4), W_dec=jnp.zeros((4, 8)), b_dec=jnp.zeros(8),
                        site="hook_resid_mid", layer=1, hook_name="blocks.1.hook_mlp_in")
    saes.check(d, jinterp.Config(**kw))
    with pytest.raises(saes.DictionaryError, match="hook_mlp_in.*parallel-block.*hook_resid_pre"):
        saes.check(d, jinterp.Config(**kw, parallel_residual=True))
