"""Training: the generic optax loop, HF-format export, and the bundled model organisms.

- `loop`: `init_params`, `complete`, `token_losses`, `train` (next-token loss, optax under jit).
- `hf_export`: `save_hf` (config.json + model.safetensors + tokenizer), `word_tokenizer`.
- `organisms`: `recipe(name)` imports models/NAME/recipe.py (data generator, evaluation,
  `train`); `available()` lists them.
"""

from jinterp.train import hf_export, loop, organisms
from jinterp.train.hf_export import save_hf, word_tokenizer
from jinterp.train.loop import Trained, complete, init_params, token_losses, train
from jinterp.train.organisms import available, recipe

__all__ = [
    "Trained", "available", "complete", "hf_export", "init_params", "loop", "organisms", "recipe", "save_hf",
    "token_losses", "train", "word_tokenizer",
]
