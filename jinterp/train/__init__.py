"""Training: the generic optax loop, HF-format export, the bundled model organisms, and what is
fitted to a model's activations.

- `loop`: `init_params`, `complete`, `token_losses`, `train` (next-token loss, optax under jit).
- `hf_export`: `save_hf` (config.json + model.safetensors + tokenizer), `word_tokenizer`.
- `organisms`: `recipe(name)` imports models/NAME/recipe.py (data generator, evaluation,
  `train`); `available()` lists them.
- fitted to activations, each saved with `fitted` (orbax + a record of model, site and data):
  `das` (DAS and Boundless DAS), `masks` (learned head/neuron masks), `probes` (linear and
  difference-of-means probes on every layer), `tuned_lens` (per-layer affine translators).
"""

from jinterp.train import das, fitted, hf_export, loop, masks, organisms, probes, tuned_lens
from jinterp.train.hf_export import save_hf, word_tokenizer
from jinterp.train.loop import Trained, complete, init_params, token_losses, train
from jinterp.train.organisms import available, recipe

__all__ = [
    "Trained", "available", "complete", "das", "fitted", "hf_export", "init_params", "loop", "masks", "organisms",
    "probes", "recipe", "save_hf", "token_losses", "train", "tuned_lens", "word_tokenizer",
]
