import gc
import os
import warnings

import pytest

# Multi-device code is tested on 8 virtual CPU devices; this must run before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# No persistent compilation cache: the suite writes nothing to the user's cache, and its timings do not
# depend on earlier runs (tests/test_scale_runtime.py turns it on in its own subprocesses).
os.environ["JINTERP_COMPILE_CACHE"] = "0"
# The suite's models are tiny, so XLA's LLVM optimisation costs far more than it saves: compile without
# it (jax's own switch; subprocesses inherit it through the environment). Results are the same
# computations, checked to the same tolerances; benchmarks and users keep the default.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

from jinterp import compile_cache  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="module")
def _bounded_jax_caches():
    """Modules share compiled programs (the same tiny configs recur), but a long run would otherwise keep
    so many alive that the process nears vm.max_map_count, where XLA:CPU aborts (BUILD_NOTES): after a
    module, clear JAX's caches once the process holds 40% of the limit (about every ten modules), or
    26k maps where the limit is higher (about 3.5 GB of resident memory here)."""
    yield
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = 65530
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_cache.guard_map_count(share=min(0.4, 26_000 / limit))
    gc.collect()


# Family variants whose code path a default-run variant already covers; they run with `pytest -m slow`
# (the default suite must stay within its 15-minute budget on 2 cores; timings in BUILD_NOTES).
SLOW_VARIANTS = {
    "tests/test_patching.py::test_driver_options_agree[mistral-sliding]",
    "tests/test_patching.py::test_driver_options_agree[llama-gqa-untied-bias]",
    "tests/test_patching.py::test_back_patching[mistral-sliding]",
    "tests/test_edits.py::test_stop_gradient[llama-gqa-untied-bias]",
    "tests/test_edits.py::test_grad_and_vmap_through_edits[llama-gqa-untied-bias]",
    "tests/test_edits.py::test_new_op_is_one_small_class[llama-gqa-untied-bias]",
    "tests/test_edits.py::test_selected_per_layer_equals_full[llama-gqa-untied-bias]",
    "tests/test_patching.py::test_back_patching[llama-gqa-untied-bias]",
    "tests/test_sharding.py::test_sharded_model_matches_one_device[shape0-gpt2]",
    "tests/test_sharding.py::test_sharded_model_matches_one_device[shape1-llama]",
    "tests/test_sharding.py::test_sharded_model_matches_one_device[shape2-gpt2]",
    # 2026-12-01 (issue 11/12/14 tests added): shape0-llama keeps the sharded-model check by default
    "tests/test_sharding.py::test_sharded_model_matches_one_device[shape1-gpt2]",
    "tests/test_sharding.py::test_sharded_model_matches_one_device[shape2-llama]",
    "tests/test_patching.py::test_every_variants[mistral-sliding]",
    "tests/test_edits.py::test_value_shape_rules_against_numpy[llama-gqa-untied-bias]",
    "tests/test_edits.py::test_set_where_mask_as_data_matches_per_head_patches[llama-gqa-untied-bias]",
    "tests/test_edits.py::test_patch_and_subspace_patch_mlp_post[llama-gqa-untied-bias]",
    "tests/test_analysis.py::test_attribution_shapes_and_gradients[llama-gqa-untied-bias]",
    "tests/test_circuits.py::test_zero_head_equals_ablating_it_and_runs_through_sweeps[llama-gqa-untied-bias]",
    "tests/test_parity.py::test_bf16_close_to_fp32[gemma2-softcap-alternating]",
    "tests/test_parity.py::test_bf16_close_to_fp32[qwen3-qknorm-headdim]",
    "tests/test_parity.py::test_bf16_close_to_fp32[gemma3-local-global]",
    "tests/test_masks.py::test_neuron_mask_hard_concrete_and_round_trip",
}
# left-padded generation is one mechanism (position ids and the KV cache under padding): the default run
# keeps gpt2, a sliding-window + soft-capping family, longrope, and llama3 rope; the others are slow
SLOW_VARIANTS |= {f"tests/test_parity.py::test_left_padded_generation_matches_unpadded[{v}]" for v in (
    "gemma-mqa", "gpt2-untied", "llama-mqa-tied", "llama-rope-linear", "mistral-sliding", "qwen2-bias-sliding",
    "qwen3-qknorm-headdim", "olmo2-postnorm-qknorm", "gptj-parallel-interleaved", "gpt2-n_inner-gelu")}


# 2026-12-02 (new families, graphs, experiments added): the sliding-window family keeps only the
# window-specific sweep checks by default, and llama-gqa the recipes where key/value heads differ
# from query heads; gpt2 runs every driver feature
SLOW_VARIANTS |= {f"tests/test_patching.py::{t}" for t in (
    "test_prefix_skipping_only_for_the_models_own_unedited_cache[mistral-sliding]",
    "test_metric_reading_all_positions_and_per_example[mistral-sliding]",
    "test_identity_full_patch_at_layer0_gives_clean_metric[mistral-sliding]",
    "test_path_patching_matches_algorithm[mistral-sliding-receivers1]",
    "test_back_patching_judge_and_ragged_targets[mistral-sliding]",
    "test_resume_from_checkpoint[mistral-sliding]",
    "test_mesh_over_8_devices_matches_one_device[mistral-sliding]",
    "test_every_variants[gpt2]",
    "test_path_patching_matches_algorithm[llama-gqa-untied-bias-receivers1]",
    "test_metric_reading_all_positions_and_per_example[llama-gqa-untied-bias]",
    "test_prefix_skipping_only_for_the_models_own_unedited_cache[llama-gqa-untied-bias]",
    "test_back_patching_judge_and_ragged_targets[llama-gqa-untied-bias]",
    "test_identity_full_patch_at_layer0_gives_clean_metric[llama-gqa-untied-bias]",
    "test_resume_from_checkpoint[llama-gqa-untied-bias]",
    "test_layer_pos_recipes[llama-gqa-untied-bias-resid_mid-hook_resid_mid]",
    "test_layer_pos_recipes[llama-gqa-untied-bias-attn_out-hook_attn_out]",
    "test_layer_pos_recipes[llama-gqa-untied-bias-mlp_out-hook_mlp_out]",
)}
# the Uniform op in generation stays covered by test_uniform_op_against_naive
SLOW_VARIANTS.add("tests/test_exp_retrieval.py::test_uniform_on_decoding_steps_matches_a_naive_loop")
# 2026-12-02 (second session): left-padded generation keeps the variants the comment above names (partial
# rotary stays covered by phi3's); bf16 and greedy generation drop the GPT-2 / GPT-J option variants whose
# dtype and decoding paths gpt2, llama-gqa, phi3 and olmo2 already run
SLOW_VARIANTS |= {f"tests/test_parity.py::{t}" for t in (
    "test_left_padded_generation_matches_unpadded[gemma3-local-global]",
    "test_left_padded_generation_matches_unpadded[neox-parallel-partial-rotary]",
    "test_bf16_close_to_fp32[gpt2-n_inner-gelu]", "test_bf16_close_to_fp32[gptj-parallel-interleaved]",
    "test_bf16_close_to_fp32[neox-parallel-partial-rotary]",
    "test_greedy_generation_matches_hf[gpt2-n_inner-gelu]", "test_greedy_generation_matches_hf[gptj-parallel-interleaved]")}

# the per-recipe checks on the sliding-window family (gpt2 and llama-gqa cover every recipe; sliding
# windows in sweeps stay covered by test_every_variants[mistral-sliding] and the parity tests)
SLOW_PREFIXES = ("tests/test_patching.py::test_layer_pos_recipes[mistral-sliding-",
                 "tests/test_patching.py::test_head_by_pos_recipes[mistral-sliding-",
                 "tests/test_patching.py::test_head_all_pos_recipes[mistral-sliding-")


# zoo variants (tests/hf_zoo.py) whose every test in a module is slow: a default-run variant covers the family
SLOW_ZOO = {"tests/test_parity.py": {"phi3-sliding"}}

# zoo variants that, by default, run only the parity check of the logits and every residual site: one
# variant per family (gpt2, neox-parallel-partial-rotary, llama-gqa-untied-bias, qwen3, gemma2, gemma3,
# olmo2, phi3-partial-longrope, gptj) runs the padding, generation, bf16 and shape checks too
SITES_ONLY_ZOO = {"gpt2-untied", "neox-sequential-nobias", "llama-mha", "llama-mqa-tied", "llama-rope-linear",
                  "llama3-rope", "mistral-sliding", "qwen2-bias-sliding", "gemma-mqa"}
# issue 14 item 3 option variants: sites-only here; their generation and padding checks that matter are in
# tests/test_rope_options.py
SITES_ONLY_ZOO |= {"llama-rope-dynamic", "llama-rope-yarn", "qwen3-rope-yarn", "llama-rope-proportional",
                   "neox-rotary5-sequential", "neox-rotary6-parallel", "gpt2-inverse-layer-upcast"}


def _slow_zoo(item) -> bool:
    spec = getattr(item, "callspec", None)
    if spec is None:
        return False
    if spec.id in SLOW_ZOO.get(item.nodeid.split("::")[0], ()):
        return True
    return (item.nodeid.startswith("tests/test_parity.py::") and spec.id in SITES_ONLY_ZOO
            and "test_logits_and_every_residual_site" not in item.nodeid)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_VARIANTS or item.nodeid.startswith(SLOW_PREFIXES) or _slow_zoo(item):
            item.add_marker(pytest.mark.slow)
