"""Bad input gets a clear error that names the problem and the fix."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jinterp
from jinterp import CheckpointError, UnsupportedArchitecture
from jinterp.sites import SiteError
from tests import hf_zoo


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return hf_zoo.save(hf_zoo.build("gpt2"), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def model(gpt2_dir):
    return jinterp.load(gpt2_dir)


def _copy_with(src, dst, edit):
    """Copy an HF dir, applying edit(tensors) -> tensors to its safetensors."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture) as e:
        jinterp.load(tmp_path)
    msg = str(e.value)
    assert "BertForMaskedLM" in msg or "bert" in msg
    for fam in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        assert fam in msg


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_model", "architectures": ["X"]}))
    with pytest.raises(UnsupportedArchitecture, match="supports model types"):
        jinterp.load(tmp_path)


def test_missing_tensor_is_named(gpt2_dir, tmp_path):
    from pathlib import Path

    bad = _copy_with(Path(gpt2_dir), tmp_path / "m", lambda t: {k: v for k, v in t.items() if "h.1.mlp.c_fc.weight" not in k})
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        jinterp.load(bad)


def test_misshaped_tensor_is_named(gpt2_dir, tmp_path):
    from pathlib import Path

    def edit(t):
        t = dict(t)
        t["transformer.h.0.attn.c_proj.weight"] = t["transformer.h.0.attn.c_proj.weight"][:, :-1].copy()
        return t

    bad = _copy_with(Path(gpt2_dir), tmp_path / "m", edit)
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.attn\.c_proj\.weight' has shape \[32, 31\].*\[32, 32\]"):
        jinterp.load(bad)


def test_truncated_checkpoint(gpt2_dir, tmp_path):
    from pathlib import Path

    src = Path(gpt2_dir)
    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted|could not read"):
        jinterp.load(dst)


def test_no_weights(tmp_path, gpt2_dir):
    from pathlib import Path

    (tmp_path / "config.json").write_text((Path(gpt2_dir) / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        jinterp.load(tmp_path)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="bundled"):
        jinterp.load("./no/such/dir")


def test_token_outside_vocabulary(model):
    toks = np.zeros((2, 5), np.int32)
    toks[1, 3] = hf_zoo.V + 7
    with pytest.raises(jinterp.InputError, match=rf"token id {hf_zoo.V + 7} at batch 1, position 3 .*0\.\.{hf_zoo.V - 1}"):
        model(toks)
    with pytest.raises(jinterp.InputError, match="token id -1"):
        model(np.array([[1, -1]]))


def test_sequence_longer_than_context(model):
    n = model.cfg.n_ctx
    with pytest.raises(jinterp.InputError, match=rf"{n + 1} tokens is longer than this model's context of {n}"):
        model(np.zeros((1, n + 1), np.int32))
    with pytest.raises(jinterp.InputError, match="plus 10 to generate"):
        model.generate(np.zeros((1, n - 5), np.int32), max_new_tokens=10)


def test_non_integer_tokens_and_bad_mask(model):
    with pytest.raises(jinterp.InputError, match="integer ids"):
        model(np.zeros((1, 4), np.float32))
    with pytest.raises(jinterp.InputError, match="attention_mask has shape"):
        model(np.zeros((1, 4), np.int32), attention_mask=np.ones((1, 5)))


def test_unknown_site_suggests_closest(model):
    with pytest.raises(SiteError, match=r"Did you mean 'blocks\.1\.hook_resid_pre'"):
        model.run_with_cache(np.zeros((1, 3), np.int32), names=["blocks.1.hook_resid_pr"])
    with pytest.raises(SiteError, match=r"layer 7 .* out of range: this model has 3 layers"):
        model.run_with_cache(np.zeros((1, 3), np.int32), names=["blocks.7.hook_resid_pre"])
    with pytest.raises(SiteError, match="per-layer site"):
        model.run_with_cache(np.zeros((1, 3), np.int32), names=["hook_resid_pre"])
    # rotary-only site on a learned-position model
    with pytest.raises(SiteError, match="unknown site 'blocks.0.attn.hook_rot_q'"):
        model.run_with_cache(np.zeros((1, 3), np.int32), names=["blocks.0.attn.hook_rot_q"])


def test_generate_needs_left_padding(model):
    toks = np.ones((2, 4), np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    with pytest.raises(jinterp.InputError, match="left-padded"):
        model.generate(toks, 3, attention_mask=mask)


# ------------------------------------------------------------------ Config validation

_TINY = dict(family="llama", n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=32, d_vocab=10, n_ctx=8)


def _config(**over):
    return jinterp.Config(**{**_TINY, **over})


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(norm="batchnorm"), "unknown norm 'batchnorm'; valid: layernorm, rmsnorm"),
        (dict(positional="alibi"), "unknown positional 'alibi'; valid: learned, rotary"),
        (dict(act="gelu_python"), "unknown act 'gelu_python'; valid: gelu_new, gelu, gelu_pytorch_tanh, gelu_fast, silu, relu"),
        (dict(mlp="mixture"), "unknown mlp 'mixture'; valid: dense, gated, moe"),
        (dict(mlp="moe", n_experts=4, top_k=5), "top_k=5 experts per token is more than n_experts=4"),
        (dict(matmul_precision="high"), "unknown matmul_precision 'high'; valid: highest, default"),
        (dict(positional="rotary", rotary_dim=4, rope_scaling={"rope_type": "ntk", "factor": 2.0}),
         "unknown rope_type 'ntk'; valid: default, linear, llama3"),
        (dict(positional="rotary", rotary_dim=4, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
         "rope_type 'llama3' needs rope_scaling keys factor, low_freq_factor, high_freq_factor, "
         "original_max_position_embeddings; missing low_freq_factor, high_freq_factor, original_max_position_embeddings"),
        (dict(positional="rotary", rotary_dim=6), r"rotary_dim must be even and in 2..d_head \(4\) for rotary positions, got 6"),
        (dict(positional="rotary", rotary_dim=3), r"rotary_dim must be even .* got 3"),
        (dict(positional="rotary", rotary_dim=0), r"rotary_dim must be even .* got 0"),
        (dict(windows=(4, 0, 4)), r"windows lists 3 entries; it needs one per layer \(n_layers=2\) or none"),
        (dict(windows=(4, -1)), r"windows must be non-negative integers"),
        (dict(d_mlp=0), "d_mlp must be a positive integer, got 0"),
        (dict(n_layers=2.0), "n_layers must be a positive integer, got 2.0"),
        (dict(n_kv_heads=3), "n_heads=4 is not a multiple of n_kv_heads=3"),
    ],
)
def test_config_rejects_bad_options(over, message):
    with pytest.raises(ValueError, match=message):
        _config(**over)


def test_config_normalises_json_shapes():
    """Lists and dicts (as JSON gives them) become the hashable tuples the decoder keys jit on."""
    c = _config(positional="rotary", rotary_dim=4, rope_scaling={"rope_type": "linear", "factor": 2.0}, windows=[0, 4])
    assert c.rope_scaling == (("factor", 2.0), ("rope_type", "linear")) and c.windows == (0, 4)
    assert hash(c) == hash(_config(positional="rotary", rotary_dim=4, rope_scaling=[["rope_type", "linear"], ["factor", 2.0]],
                                   windows=(0, 4)))


def test_load_rejects_bad_precision(gpt2_dir):
    with pytest.raises(ValueError, match="unknown matmul_precision 'fast'; valid: highest, default"):
        jinterp.load(gpt2_dir, precision="fast")


def test_old_saved_model_with_gated_mlp_loads(model, tmp_path):
    """Models saved before Config.mlp replaced the boolean gated_mlp still load."""
    model.save(tmp_path / "saved")
    meta_file = tmp_path / "saved" / "jinterp.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["gated_mlp"] = meta["config"].pop("mlp") == "gated"
    meta_file.write_text(json.dumps(meta))
    again = jinterp.load(tmp_path / "saved")
    assert again.cfg == model.cfg and again.cfg.mlp == "dense"


# ------------------------------------------------------------------ the unembedding decision (families/common.py)


def test_untied_config_without_output_tensor_is_named(gpt2_dir, tmp_path):
    from pathlib import Path

    bad = _copy_with(Path(gpt2_dir), tmp_path / "m", lambda t: t)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match=r"not tied \(tie_word_embeddings false\), but the checkpoint in .* has no output matrix 'lm_head\.weight'"):
        jinterp.load(bad)


def test_tied_config_with_a_separate_output_tensor_uses_it(gpt2_dir, tmp_path):
    """As transformers does: a stored output matrix that differs from W_E is not tied away."""
    from pathlib import Path

    W = np.random.RandomState(0).randn(hf_zoo.V, 32).astype(np.float32)
    m = jinterp.load(_copy_with(Path(gpt2_dir), tmp_path / "m", lambda t: {**t, "lm_head.weight": W}))
    assert m.cfg.tied_embeddings
    np.testing.assert_array_equal(np.asarray(m.W_U), W.T)


# ------------------------------------------------------------------ no silent failures (issue 14 item 5)


def test_nan_or_inf_in_edit_values_and_bases_is_named(model):
    """A NaN or inf steering vector, patch value or basis is refused at the boundary, naming the edit and field."""
    from jinterp import edits as E

    toks = np.zeros((1, 4), np.int32)
    D = model.cfg.d_model
    vec = np.ones(D, np.float32)
    vec[5] = np.nan
    with pytest.raises(E.EditError, match=r"edits\[1\] \(Add at hook_resid_pre\): Add\.value holds 1 NaN or inf .* index \(5,\)"):
        model(toks, edits=[E.zero_ablate("blocks.0.hook_mlp_out"), E.steer("blocks.1.hook_resid_pre", vec)])
    val = np.zeros((1, 4, D), np.float32)
    val[0, 2, 0] = np.inf
    with pytest.raises(E.EditError, match=r"Set\.value holds 1 NaN or inf .* index \(0, 2, 0\)"):
        model.run_with_cache(toks, names=["blocks.0.hook_resid_post"], edits=[E.patch("blocks.0.hook_resid_post", val)])
    basis = np.eye(D, 2, dtype=np.float32)
    basis[0, 1] = np.nan
    with pytest.raises(E.EditError, match=r"Project\.basis holds 1 NaN"):
        model.generate(toks, 1, edits=[E.subspace_patch("blocks.0.hook_resid_post", np.zeros(D, np.float32), basis)])
    with pytest.raises(E.EditError, match="Add.value holds"):  # an infinite coefficient too
        model(toks, edits=[E.steer("blocks.1.hook_resid_pre", np.ones(D, np.float32), coeff=np.inf)])
    # traced values (inside a compiled sweep) have nothing to check and pass
    import jax

    jax.jit(lambda v: (E.core.check_finite("edit", "value", v), v)[1])(jax.numpy.full(3, jax.numpy.nan))


def test_nan_or_inf_in_loaded_weights_is_named(gpt2_dir, tmp_path):
    from pathlib import Path

    def poison(name, value, index):
        def edit(t):
            t = dict(t)
            t[name] = t[name].copy()
            t[name][index] = value
            return t
        return edit

    bad = _copy_with(Path(gpt2_dir), tmp_path / "a", poison("transformer.h.1.mlp.c_fc.weight", np.nan, (3, 5)))
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' \(parameter \['blocks'\]\['mlp'\]\['W_in'\].*"
                                              r"1 NaN value, the first at index \(3, 5\).*corrupt or was saved in a dtype that overflowed"):
        jinterp.load(bad, tokenizer=False)
    assert jinterp.load(bad, tokenizer=False, check_finite=False).cfg.n_layers == 3  # the escape hatch
    bad = _copy_with(Path(gpt2_dir), tmp_path / "b", poison("transformer.wte.weight", -np.inf, (7, 0)))
    with pytest.raises(CheckpointError, match=r"'transformer\.wte\.weight' .* 1 inf value, the first at index \(7, 0\)"):
        jinterp.load(bad, tokenizer=False)
    # integer (quantized) storage is refused, not cast to floats
    bad = _copy_with(Path(gpt2_dir), tmp_path / "c", lambda t: {**t, "transformer.h.0.mlp.c_fc.weight":
                                                                 t["transformer.h.0.mlp.c_fc.weight"].astype(np.int8)})
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight' .* stored as I8, not as floats"):
        jinterp.load(bad, tokenizer=False)


def test_all_finite_scan():
    import ml_dtypes

    from jinterp.io.safetensors import all_finite

    for dt in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        a = np.random.RandomState(0).randn(3, 1000).astype(dt)
        assert all_finite(a)
        for v in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[2, 999] = v
            assert not all_finite(b), (dt, v)
    assert all_finite(np.full(10, 1e30, np.float32))  # a sum of squares that overflows is rescanned, not refused
    assert all_finite(np.arange(5))


def test_sweep_nan_names_the_cell(model):
    import dataclasses

    import jax.numpy as jnp

    from jinterp import metrics
    from jinterp.engine import driver

    @dataclasses.dataclass(frozen=True)
    class NanAt:
        def __call__(self, cell, data, runner):
            bad = (cell["layer"] == 1) & (cell["pos"] == 2)
            return runner.score(()) + jnp.where(bad, jnp.nan, 0.0)

    toks = np.arange(8, dtype=np.int32).reshape(2, 4)
    metric = metrics.logit_diff([[1, 2], [3, 4]])
    axes = {"layer": ["L0", "L1", "L2"], "pos": ["a", "b", "c", "d"]}
    with pytest.raises(driver.SweepError, match=r"nan sweep: the result is NaN at 1 of 12 cells, the first at "
                                                r"layer=L1 \(index 1\), pos=c \(index 2\).*allow_nan=True") as e:
        driver.sweep_grid(model, toks, axes, NanAt(), name="nan sweep", metric=metric, progress=False)
    assert e.value.cell == 6 and np.isnan(e.value.results[6]) and np.isfinite(np.delete(e.value.results, 6)).all()
    r = driver.sweep_grid(model, toks, axes, NanAt(), name="nan sweep", metric=metric, progress=False, allow_nan=True)
    assert np.isnan(r.values[1, 2]) and np.isfinite(r.values).sum() == 11


def test_metric_answer_outside_vocabulary_and_bad_positions(model):
    from jinterp import metrics

    V = hf_zoo.V
    toks = np.zeros((2, 5), np.int32)
    logits = model(toks)
    with pytest.raises(ValueError, match=rf"answer token id {V + 3} is outside the vocabulary of {V} tokens \(0\.\.{V - 1}\)"):
        metrics.logit_diff([[1, 2], [4, V + 3]])(logits)
    with pytest.raises(ValueError, match=rf"log_prob: answer token id {V} is outside the vocabulary"):
        metrics.log_prob([V, 1])(logits)
    with pytest.raises(ValueError, match=rf"answer token id {V} is outside"):  # the sweep driver asks before compiling
        metrics.logit_diff([[V, 1], [2, 3]]).reads(5, V)
    with pytest.raises(ValueError, match="holds token id -1"):
        metrics.logit_diff([[1, -1], [2, 3]])
    with pytest.raises(ValueError, match="integer token ids"):
        metrics.log_prob([1.5, 2.0])
    with pytest.raises(ValueError, match=r"metric position 5 is outside the sequence of 5 positions \(valid: -5\.\.4\)"):
        metrics.logit_diff([[1, 2], [3, 4]], pos=5)(logits)
    with pytest.raises(ValueError, match="answers for 3 examples but the logits have a batch of 2"):
        metrics.logit_diff([[1, 2], [3, 4], [5, 6]])(logits)
    with pytest.raises(ValueError, match="scores the clean logits nan"):
        metrics.normalized(metrics.logit_diff([[1, 2], [3, 4]]), np.full(logits.shape, np.nan), logits)


def test_unknown_dtype_lists_the_accepted_ones(gpt2_dir):
    import jax.numpy as jnp

    from jinterp.loading import resolve_dtype

    with pytest.raises(ValueError, match=r"unknown dtype 'bf17'; accepted: float32, bfloat16, float16, float64"):
        jinterp.load(gpt2_dir, dtype="bf17")
    assert resolve_dtype("bf16") == jnp.bfloat16 and resolve_dtype(jnp.float16) == np.float16
    assert resolve_dtype(" Float32 ") == np.float32
    with pytest.raises(ValueError, match="parameters need a float dtype, got int8"):
        resolve_dtype(np.int8)
    with pytest.raises(ValueError, match="is not a dtype"):
        resolve_dtype(object())
    with pytest.raises(ValueError, match="float64 parameters need jax's 64-bit mode"):
        resolve_dtype("float64")
    # the planner and the dictionary loader take the same names and give the same error
    from jinterp import planner, saes

    with pytest.raises(ValueError, match=r"unknown dtype 'fp33'; accepted: float32"):
        planner.plan(gpt2_dir, 1, 4, dtype="fp33")
    assert planner.plan(gpt2_dir, 1, 4, dtype="bf16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"unknown dtype 'fp33'; accepted: float32"):
        saes.load(Path(__file__).parents[1] / "models" / "induction-2l" / "dictionaries" / "transcoders", dtype="fp33")


@pytest.mark.parametrize("cls,kw,match", [
    (hf_zoo.tf.GemmaConfig, dict(use_bidirectional_attention=True, head_dim=8, **hf_zoo.LLAMA),
     "gemma with use_bidirectional_attention=True"),
    (hf_zoo.tf.Qwen2Config, dict(layer_types=["full_attention", "chunked_attention", "full_attention"], **hf_zoo.LLAMA),
     r"qwen2 layer_types \['chunked_attention'\] are not supported"),
    # GPT-2's scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn and rope types yarn / dynamic are
    # implemented now (tests/test_rope_options.py); a rotary_pct transformers rotates no dims with is not
    (hf_zoo.tf.GPTNeoXConfig, dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=8,
                                   rotary_pct=0.1, **hf_zoo.SMALL),
     r"partial_rotary_factor \(rotary_pct\) 0.1 with head_dim 8 gives 0 rotary dims"),
])
def test_config_options_we_do_not_implement_are_named(tmp_path, cls, kw, match):
    cls(**kw).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedArchitecture, match=match):
        jinterp.load(tmp_path)


def test_quantized_checkpoint_is_refused(gpt2_dir, tmp_path):
    from pathlib import Path

    bad = _copy_with(Path(gpt2_dir), tmp_path / "m", lambda t: t)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(UnsupportedArchitecture, match="quantized checkpoint .*'gptq'.*unquantized"):
        jinterp.load(bad)


def test_model_arguments_out_of_range(model):
    toks = np.zeros((1, 4), np.int32)
    with pytest.raises(jinterp.InputError, match=r"logits_at position 4 is outside the sequence of 4 tokens \(valid: -4\.\.3\)"):
        model(toks, logits_at=[0, 4])
    assert model(toks, logits_at=-1).shape[1] == 1
    with pytest.raises(jinterp.InputError, match="padding_side must be 'left' or 'right'"):
        model.to_tokens("hi", padding_side="middle")
    with pytest.raises(jinterp.InputError, match=rf"token id {hf_zoo.V} is outside the vocabulary"):
        model.tokens_to_residual_directions([1, hf_zoo.V])
    with pytest.raises(jinterp.InputError, match="at least 1"):
        model.warmup(0, 4)
