import gc
import os

import pytest

# Multi-device code is tested on 8 virtual CPU devices; this must run before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# No persistent compilation cache: the suite writes nothing to the user's cache, and its timings do not
# depend on earlier runs (tests/test_scale_runtime.py turns it on in its own subprocesses).
os.environ["JINTERP_COMPILE_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop compiled executables after each module: a long run otherwise keeps hundreds of them alive."""
    yield
    jax.clear_caches()
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
}


# the per-recipe checks on the sliding-window family (gpt2 and llama-gqa cover every recipe; sliding
# windows in sweeps stay covered by test_every_variants[mistral-sliding] and the parity tests)
SLOW_PREFIXES = ("tests/test_patching.py::test_layer_pos_recipes[mistral-sliding-",
                 "tests/test_patching.py::test_head_by_pos_recipes[mistral-sliding-")


# zoo variants (tests/hf_zoo.py) whose every test in a module is slow: a default-run variant covers the family
SLOW_ZOO = {"tests/test_parity.py": {"phi3-sliding"}}


def _slow_zoo(item) -> bool:
    spec = getattr(item, "callspec", None)
    return spec is not None and spec.id in SLOW_ZOO.get(item.nodeid.split("::")[0], ())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_VARIANTS or item.nodeid.startswith(SLOW_PREFIXES) or _slow_zoo(item):
            item.add_marker(pytest.mark.slow)
