"""jinterp.saes: loading SAELens / Gemma Scope / circuit-tracer dictionaries, parity with the references.

Fixtures under tests/fixtures/saes/ come from tests/fixtures/make_sae_fixtures.py: SAELens cases were
saved by SAELens 6.54 itself and their ref.npz outputs are SAELens's encode/decode/forward; the
circuit-tracer and Gemma Scope 2 references are numpy formulas (ref.npz's `source` says which).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jinterp
from jinterp import saes
from jinterp.sites import SiteError

FIX = Path(__file__).parent / "fixtures" / "saes"
SAELENS = sorted(p.name for p in (FIX / "saelens").iterdir() if p.is_dir())
ATOL = 1e-5


def ref(folder):
    with np.load(folder / "ref.npz") as z:
        return {k: z[k] for k in z.files}


def test_fixture_cases_present():
    assert {"standard", "jumprelu", "topk", "gated", "standard_nobdec", "jumprelu_skip_transcoder", "hook_z",
            "standard_cnr", "standard_layernorm"} <= set(SAELENS)


@pytest.mark.parametrize("name", SAELENS)
def test_saelens_parity(name):
    folder = FIX / "saelens" / name
    r = ref(folder)
    assert str(r["source"]) == "saelens"
    d = saes.load(folder)
    assert isinstance(d, saes.Dictionary) and d.format == "saelens"
    assert (d.d_in, d.d_sae) == (16, 32)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert d.apply_b_dec_to_input == cfg["apply_b_dec_to_input"]
    x = r["x"]
    f = d.encode(x)
    np.testing.assert_allclose(f, r["feats"], atol=ATOL)
    dec = d.decode(r["feats"], x)
    np.testing.assert_allclose(np.asarray(dec).reshape(r["decoded"].shape), r["decoded"], atol=ATOL)
    y = d(x)
    assert y.shape == r["recon"].shape
    np.testing.assert_allclose(y, r["recon"], atol=ATOL)
    # the site comes from the cfg's hook name, in our names
    layer, local = saes.to_site(cfg["metadata"]["hook_name"])
    assert (d.layer, d.site) == (layer, local)


def test_saelens_site_and_kinds():
    tc = saes.load(FIX / "saelens" / "jumprelu_skip_transcoder")
    assert tc.is_transcoder and tc.site_name == "blocks.1.ln2.hook_normalized" and tc.out_site_name == "blocks.1.hook_mlp_out"
    assert tc.W_skip is not None and tc.architecture == "jumprelu"
    z = saes.load(FIX / "saelens" / "hook_z")
    assert z.site_name == "blocks.1.attn.hook_z" and z.hook_z
    assert saes.load(FIX / "saelens" / "topk").k == 6
    assert saes.load(FIX / "saelens" / "gated").b_enc is None


def test_gemma_scope_npz():
    folder = FIX / "gemma-scope-2b-pt-res" / "layer_1" / "width_32" / "average_l0_9"
    r = ref(folder)
    for path in (folder, folder / "params.npz"):
        d = saes.load(path)
        assert d.format == "gemma_scope" and not d.apply_b_dec_to_input
        assert d.site_name == "blocks.1.hook_resid_post"
        np.testing.assert_allclose(d.encode(r["x"]), r["feats"], atol=ATOL)
        np.testing.assert_allclose(d.decode(r["feats"]), r["decoded"], atol=ATOL)
        np.testing.assert_allclose(d(r["x"]), r["recon"], atol=ATOL)


def test_gemma_scope_2_transcoder():
    folder = FIX / "gemma-scope-2" / "transcoder_layer_0"
    r = ref(folder)
    d = saes.load(folder)
    assert d.site_name == "blocks.0.mlp.hook_in" and d.out_site_name == "blocks.0.hook_mlp_out"
    np.testing.assert_allclose(d.encode(r["x"]), r["feats"], atol=ATOL)
    np.testing.assert_allclose(d.decode(r["feats"]), r["decoded"], atol=ATOL)
    np.testing.assert_allclose(d(r["x"]), r["recon"], atol=ATOL)


def test_circuit_tracer_plt_stacked_and_single():
    folder = FIX / "circuit_tracer_plt"
    r = ref(folder)
    d = saes.load(folder)
    assert d.stacked and d.layers == (0, 1) and d.format == "circuit_tracer"
    assert (d.site, d.out_site, d.d_in, d.d_sae) == ("ln2.hook_normalized", "hook_mlp_out", 16, 32)
    np.testing.assert_allclose(d.encode(r["x"]), r["feats"], atol=ATOL)
    np.testing.assert_allclose(d.decode(r["feats"]), r["decoded"], atol=ATOL)
    np.testing.assert_allclose(d(r["x"]), r["recon"], atol=ATOL)
    # negative thresholds: circuit-tracer's JumpReLU lets negative pre-activations through
    assert (np.asarray(d.encode(r["x"])) < 0).any()
    one = saes.load(folder, layer=1)
    assert not one.stacked and one.site_name == "blocks.1.ln2.hook_normalized"
    np.testing.assert_allclose(one(r["x"][..., 1, :]), r["recon"][..., 1, :], atol=ATOL)
    np.testing.assert_allclose(d[1].encode(r["x"][..., 1, :]), r["feats"][..., 1, :], atol=ATOL)
    # a single file, layer from its name
    f = saes.load(folder / "layer_0.safetensors")
    assert f.layer == 0
    np.testing.assert_allclose(f(r["x"][..., 0, :]), r["recon"][..., 0, :], atol=ATOL)


def test_circuit_tracer_clt():
    folder = FIX / "circuit_tracer_clt"
    r = ref(folder)
    d = saes.load(folder)
    assert isinstance(d, saes.CrossLayerTranscoder) and d.n_layers == 3
    assert (d.site, d.out_site) == ("hook_resid_mid", "hook_mlp_out")
    np.testing.assert_allclose(d.encode(r["x"]), r["feats"], atol=ATOL)
    np.testing.assert_allclose(d.decode(r["feats"]), r["decoded"], atol=ATOL)
    np.testing.assert_allclose(d(r["x"]), r["recon"], atol=ATOL)


def test_pytree_jit_vmap_grad():
    d = saes.load(FIX / "saelens" / "jumprelu")
    x = jnp.asarray(ref(FIX / "saelens" / "jumprelu")["x"])
    np.testing.assert_allclose(jax.jit(lambda d, x: d(x))(d, x), d(x), atol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda x: d.encode(x))(x), d.encode(x), atol=1e-6)
    g = jax.grad(lambda d: jnp.sum(d(x) ** 2))(d)
    assert g.W_enc.shape == (16, 32) and bool(jnp.isfinite(g.W_dec).all())
    t = saes.load(FIX / "saelens" / "topk")
    assert jax.jit(lambda d, x: d.encode(x))(t, x).shape == (2, 5, 32)


def test_hook_name_mapping():
    assert saes.to_site("blocks.3.hook_resid_pre") == (3, "hook_resid_pre")
    assert saes.to_site("blocks.2.attn.hook_z") == (2, "attn.hook_z")
    assert saes.to_site("blocks.0.ln2.hook_normalized") == (0, "ln2.hook_normalized")
    assert saes.to_site("blocks.1.mlp.hook_post") == (1, "mlp.hook_post")
    assert saes.to_site("blocks.1.mlp.hook_in") == (1, "mlp.hook_in")  # circuit-tracer: the MLP's input
    assert saes.to_site("blocks.1.hook_mlp_in") == (1, "hook_resid_mid")  # TransformerLens: the residual entering ln2
    assert saes.to_site("model.layers.1.mlp.input") == (1, "mlp.hook_in")
    assert saes.to_site("blocks.1.mlp.hook_out") == (1, "hook_mlp_out")
    assert saes.to_site("blocks.4.resid_post") == (4, "hook_resid_post")
    assert saes.to_site("model.layers.5.mlp") == (5, "hook_mlp_out")
    assert saes.to_site("model.layers.5") == (5, "hook_resid_post")
    assert saes.to_site("model.layers.7.pre_feedforward_layernorm.output") == (7, "mlp.hook_in")
    assert saes.to_site("layers.2") == (2, "hook_resid_post")
    assert saes.to_site("hook_embed") == (None, "hook_embed")
    assert saes.to_site("hook_resid_mid", layer=2) == (2, "hook_resid_mid")
    with pytest.raises(SiteError, match="pass layer="):
        saes.to_site("hook_resid_mid")
    with pytest.raises(SiteError, match=r"unknown hook name 'blocks.3.hook_resid_prx'.*Did you mean.*hook_resid_pre"):
        saes.to_site("blocks.3.hook_resid_prx")
    with pytest.raises(SiteError, match="Known forms"):
        saes.to_site("transformer.h.3.mlp")


def test_unknown_hook_in_cfg(tmp_path):
    dst = tmp_path / "sae"
    shutil.copytree(FIX / "saelens" / "standard", dst)
    cfg = json.loads((dst / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.0.hook_banana"
    (dst / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SiteError, match="hook_banana.*maps to no jinterp site"):
        saes.load(dst)


@pytest.fixture(scope="module")
def model():
    return jinterp.load("induction-2l", tokenizer=False)


def test_check_against_model(model):
    assert model.config.d_model == 64
    d = saes.load(FIX / "saelens" / "standard")
    with pytest.raises(saes.DictionaryError, match=r"d_in=16 but site 'blocks.0.hook_resid_pre' of this model has width 64"):
        saes.check(d, model)
    # a dictionary of the right width passes
    good = saes.Dictionary(W_enc=jnp.zeros((64, 8)), W_dec=jnp.zeros((8, 64)), b_dec=jnp.zeros(64), b_enc=jnp.zeros(8),
                           site="hook_resid_post", layer=1)
    saes.check(good, model)
    bad_layer = good.replace(layer=7)
    with pytest.raises(saes.DictionaryError, match="out of range"):
        saes.check(bad_layer, model)
    z = saes.load(FIX / "saelens" / "hook_z")
    need = model.config.n_heads * model.config.d_head
    with pytest.raises(saes.DictionaryError, match=rf"d_in=16 but site 'blocks.1.attn.hook_z' of this model has width {need}"):
        saes.check(z, model)
    with pytest.raises(saes.DictionaryError, match="d_in=16"):
        saes.check(saes.load(FIX / "circuit_tracer_plt"), model)


def test_missing_tensor_named(tmp_path):
    dst = tmp_path / "sae"
    shutil.copytree(FIX / "saelens" / "jumprelu", dst)
    t = load_file(str(dst / "sae_weights.safetensors"))
    del t["threshold"]
    save_file(t, str(dst / "sae_weights.safetensors"))
    with pytest.raises(saes.DictionaryError, match=r"missing tensor 'threshold'.*\[32\]"):
        saes.load(dst)
    plt = tmp_path / "plt"
    plt.mkdir()
    t = load_file(str(FIX / "circuit_tracer_plt" / "layer_0.safetensors"))
    del t["W_dec"]
    save_file(t, str(plt / "layer_0.safetensors"))
    with pytest.raises(saes.DictionaryError, match="missing tensor 'W_dec'"):
        saes.load(plt)


def test_nan_weights_rejected(tmp_path):
    dst = tmp_path / "sae"
    shutil.copytree(FIX / "saelens" / "standard", dst)
    t = load_file(str(dst / "sae_weights.safetensors"))
    t["W_dec"] = t["W_dec"].copy()
    t["W_dec"][3, 5] = np.nan
    save_file(t, str(dst / "sae_weights.safetensors"))
    with pytest.raises(saes.DictionaryError, match=r"'W_dec'.*1 non-finite.*\(3, 5\)"):
        saes.load(dst)
    gs = tmp_path / "gs"
    gs.mkdir()
    with np.load(FIX / "gemma-scope-2b-pt-res/layer_1/width_32/average_l0_9/params.npz") as z:
        p = {k: z[k].copy() for k in z.files}
    p["threshold"][0] = np.inf
    np.savez(gs / "params.npz", **p)
    with pytest.raises(saes.DictionaryError, match="'threshold'"):
        saes.load(gs, hook_name="blocks.0.hook_resid_post")


def test_bad_inputs(tmp_path):
    with pytest.raises(saes.DictionaryError, match="does not exist"):
        saes.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(saes.DictionaryError, match="cannot tell the format"):
        saes.load(tmp_path / "empty")
    with pytest.raises(saes.DictionaryError, match="unknown format"):
        saes.load(FIX / "saelens" / "standard", format="sparsify")
    with pytest.raises(saes.DictionaryError, match="no transcoder for layer 5"):
        saes.load(FIX / "circuit_tracer_plt", layer=5)
    d = saes.load(FIX / "saelens" / "standard")
    with pytest.raises(ValueError, match="d_in=16"):
        d.encode(np.zeros((3, 15), np.float32))


def test_saelens_legacy_layouts(tmp_path):
    """Pre-6.0 cfg.json (flat, hook_point, activation_fn_str / kwargs) and log_threshold load the same."""
    for name in ("standard", "topk"):
        dst = tmp_path / name
        shutil.copytree(FIX / "saelens" / name, dst)
        cfg = json.loads((dst / "cfg.json").read_text())
        meta = cfg.pop("metadata")
        cfg.pop("architecture")
        cfg["hook_point"] = meta["hook_name"]
        if name == "topk":
            cfg["activation_fn_str"] = "topk"
            cfg["activation_fn_kwargs"] = {"k": cfg.pop("k")}
        (dst / "cfg.json").write_text(json.dumps(cfg))
        r = ref(dst)
        d = saes.load(dst)
        assert d.site_name == meta["hook_name"]
        np.testing.assert_allclose(d(r["x"]), r["recon"], atol=ATOL)
    dst = tmp_path / "log"
    shutil.copytree(FIX / "saelens" / "jumprelu", dst)
    t = load_file(str(dst / "sae_weights.safetensors"))
    t["log_threshold"] = np.log(t.pop("threshold"))
    save_file(t, str(dst / "sae_weights.safetensors"))
    r = ref(dst)
    np.testing.assert_allclose(saes.load(dst).encode(r["x"]), r["feats"], atol=ATOL)


def test_hub_id_resolves_through_snapshot(tmp_path, monkeypatch):
    """A hub id 'owner/repo/subfolder' downloads only that folder, then loads it like a local path."""
    import huggingface_hub

    snap = tmp_path / "snap"
    shutil.copytree(FIX / "saelens" / "standard", snap / "blocks.0.hook_resid_pre")
    calls = []

    def fake(repo, revision=None, allow_patterns=None, **kw):
        calls.append((repo, revision, allow_patterns))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    d = saes.load("someone/saes/blocks.0.hook_resid_pre@v1")
    assert calls == [("someone/saes", "v1", ["blocks.0.hook_resid_pre/*", "blocks.0.hook_resid_pre"])]
    assert d.site_name == "blocks.0.hook_resid_pre"

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(saes.DictionaryError, match="could not fetch 'someone/saes'.*Offline"):
        saes.load("someone/saes")
