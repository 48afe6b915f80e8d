"""jinterp: a compiled mechanistic-interpretability engine in JAX."""

from jinterp import edits, sites
from jinterp.cache import ActivationCache
from jinterp.config import Config
from jinterp.io.hf import UnsupportedArchitecture
from jinterp.io.safetensors import CheckpointError
from jinterp.loading import bundled, load
from jinterp.model import InputError, Model

__all__ = [
    "ActivationCache", "CheckpointError", "Config", "InputError", "Model", "UnsupportedArchitecture", "bundled",
    "edits", "load", "sites",
]
__version__ = "0.1.0"
