"""jinterp: a compiled mechanistic-interpretability engine in JAX."""

from jinterp import edits, sites
from jinterp.cache import ActivationCache
from jinterp.config import Config
from jinterp.loading import bundled, load
from jinterp.model import InputError, Model

__all__ = ["ActivationCache", "Config", "InputError", "Model", "bundled", "edits", "load", "sites"]
__version__ = "0.1.0"
