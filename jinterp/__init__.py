"""jinterp: a compiled mechanistic-interpretability engine in JAX."""

from jinterp import compile_cache, distributed, edits, sites
from jinterp.cache import ActivationCache
from jinterp.config import Config
from jinterp.io.hf import UnsupportedArchitecture
from jinterp.io.safetensors import CheckpointError
from jinterp.loading import bundled, load
from jinterp.model import InputError, Model

compile_cache.enable_default()  # compiled programs persist across processes ($JINTERP_COMPILE_CACHE=0: off)

__all__ = [
    "ActivationCache", "CheckpointError", "Config", "InputError", "Model", "UnsupportedArchitecture", "bundled",
    "compile_cache", "distributed", "edits", "load", "sites",
]
__version__ = "0.1.0"
