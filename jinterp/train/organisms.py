"""Model organisms: the bundled models, each trained by the recipe that lives next to it.

An organism is a directory `models/NAME/` holding the model in HF format, its card (README.md,
training.json) and `recipe.py`: its data generator, its evaluation, and
`train(out_dir, *, seed=0, steps=None, progress=True, **kw) -> card dict`, built on
`jinterp.train.loop`. `recipe(NAME)` imports that file, so the recipe's functions (the data
generator above all) serve tests and experiments too:

    induction = organisms.recipe("induction-2l")
    tokens = induction.induction_batch(np.random.default_rng(0), 8, 20, induction.VOCAB_SIZE)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def models_dir() -> Path:
    """The directory of the bundled models (`$JINTERP_MODELS` if set, else models/ in the repo):
    the one `jinterp.load` and `jinterp.bundled` read."""
    import jinterp

    # the directory is defined next to jinterp.bundled, wherever that lives
    return Path(importlib.import_module(jinterp.bundled.__module__).MODELS_DIR)


def available() -> list[str]:
    """Names of the organisms that have a recipe (models/NAME/recipe.py)."""
    d = models_dir()
    return sorted(p.parent.name for p in d.glob("*/recipe.py")) if d.is_dir() else []


def recipe(name: str) -> ModuleType:
    """models/NAME/recipe.py, imported (once per process) as module `jinterp.train.organisms.NAME`
    (dashes and dots in NAME become underscores)."""
    path = models_dir() / name / "recipe.py"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe for {name!r} ({path} does not exist); organisms with a recipe: {available()}")
    mod_name = f"{__name__}." + name.replace("-", "_").replace(".", "_")
    mod = sys.modules.get(mod_name)
    if mod is not None and Path(mod.__file__).resolve() == path.resolve():
        return mod
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return mod
