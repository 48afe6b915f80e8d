"""Bad input gets a clear error that names the problem and the fix."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jinterp
from jinterp.arch.families import CheckpointError, UnsupportedArchitecture
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
