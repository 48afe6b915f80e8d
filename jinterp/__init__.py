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

_LAZY = {"das": "jinterp.train.das", "masks": "jinterp.train.masks", "probes": "jinterp.train.probes",
         "tuned_lens": "jinterp.train.tuned_lens", "patchscopes": "jinterp.patchscopes", "lens": "jinterp.lens"}


def __getattr__(name):
    """jinterp.das, jinterp.probes, ...: imported on first use (they bring optax with them)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'jinterp' has no attribute {name!r}")
