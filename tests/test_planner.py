"""The memory planner (jinterp.planner, `jinterp plan`) against independent counts."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from typer.testing import CliRunner

import jinterp
from jinterp import planner, sharding
from jinterp.arch import param_shapes
from jinterp.cli import app
from jinterp.engine import plan as engine_plan

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
             "max_position_embeddings": 8192, "tie_word_embeddings": False, "rms_norm_eps": 1e-05,
             "hidden_act": "silu"}


@pytest.fixture
def llama70b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    return tmp_path


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_params_per_device_equal_real_shards(shape):
    cfg = jinterp.load("induction-2l", tokenizer=False).cfg
    cfg = cfg.replace(n_heads=8, d_head=cfg.d_model // 8, n_kv_heads=8) if cfg.n_heads % 8 else cfg
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    placed = jax.tree.map(lambda s, sh: jax.device_put(np.zeros(s.shape, np.float32), sh),
                          param_shapes(cfg), sharding.param_shardings(cfg, mesh))
    on_one = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(placed))
    assert planner.plan(cfg, 1, 8, mesh={"data": shape[0], "model": shape[1]}).params == on_one


def test_70b_from_config_alone(llama70b):
    D, L, F, V, H, K = 8192, 80, 28672, 128256, 64, 8
    dh = D // H
    # by hand: attention q, o (D x D), k, v (D x K*dh); gated MLP 3 x D x F; 2 norms per layer;
    # embedding and unembedding; final norm. jinterp also keeps zero biases (b_Q.. b_out, b_U).
    weights = L * (2 * D * D + 2 * D * K * dh + 3 * D * F) + 2 * V * D
    norms = L * 2 * D + D
    biases = L * (H * dh + 2 * K * dh + D + 2 * F + D) + V
    p = planner.plan(llama70b, 1, 16)
    assert p.params == 4 * (weights + norms + biases)
    assert 70.5e9 < weights < 70.6e9
    bf = planner.plan(llama70b, 1, 16, dtype="bfloat16")
    assert bf.params == 2 * (weights + biases) + 4 * norms
    tp = planner.plan(llama70b, 1, 16, mesh={"data": 1, "model": 8}, dtype="bfloat16")
    replicated = 4 * norms + 2 * L * 2 * D  # norms, and the d_model-sized biases b_O, b_out
    assert tp.params == (bf.params - replicated) / 8 + replicated


def test_chunk_size_is_the_drivers(llama70b):
    cfg = planner.config_of(llama70b)
    p = planner.plan(cfg, 2, 8, mesh={"model": 8}, dtype="bfloat16", memory=80 * planner.GiB)
    free = 80 * planner.GiB - p.params - p.activations  # what the driver sees once the model is loaded
    n = cfg.n_layers * 8
    chunks = engine_plan.plan(np.zeros(n, int), np.zeros(n, int), np.arange(n), cfg=cfg, batch=2, P=8,
                              positions=(7,), vocab=(1, 2), itemsize=2, buckets=False,
                              memory_budget=engine_plan.chunk_budget(free))
    assert chunks[0].size == p.chunk_cells
    assert engine_plan.device_memory() > 0


def test_cli(llama70b):
    run = CliRunner().invoke
    ok = run(app, ["plan", str(llama70b), "--batch", "2", "--seq", "8", "--mesh", "data=1,model=8", "--dtype",
                   "bfloat16", "--memory", "80"])
    assert ok.exit_code == 0 and "fits" in ok.output and "parameters" in ok.output
    no = run(app, ["plan", str(llama70b / "config.json"), "--batch", "2", "--seq", "8", "--memory", "80"])
    assert no.exit_code == 1 and "does not fit" in no.output and "GiB per device over" in no.output
    assert "--mesh data=" in no.output  # a mesh that would fit
    bad = run(app, ["plan", str(llama70b), "--mesh", "data2"])
    assert bad.exit_code == 2 and "data=2,model=4" in bad.output
    odd = run(app, ["plan", str(llama70b), "--mesh", "data=1,model=3"])
    assert odd.exit_code == 2 and "n_heads=64" in odd.output and "Traceback" not in odd.output
