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
