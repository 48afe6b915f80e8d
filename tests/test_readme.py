"""The README's quickstart runs as written (on the bundled model, with its placeholders filled in)."""

import re
from pathlib import Path

import numpy as np

from jinterp import train


def test_quickstart_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    full = train.induction_batch(rng, 4, 6, 121)
    clean = full[:, :-1]
    corrupted = clean.copy()
    corrupted[:, 6] = (clean[:, 6] - 1) % 119 + 2
    needle = [np.concatenate([[0], rng.integers(2, 121, 4), n, rng.integers(2, 121, 6), n[:2]]) for n in rng.integers(2, 121, (3, 6))]
    env = dict(
        vector=rng.standard_normal(64).astype(np.float32),
        clean_tokens=clean,
        corrupted_tokens=corrupted,
        answer_tokens=np.stack([full[:, -1], corrupted[:, 6]], 1),
        target=np.array([3]),
        repeated_tokens=train.induction_batch(rng, 4, 10, 121),
        needle_prompts=needle,
        needle_spans=[(5, 11)] * 3,
    )
    code = code.replace("cache.apply_ln_to_stack(stack)", "cache.apply_ln_to_stack(cache.decompose_resid())")
    exec(compile(code, "README.md", "exec"), env)
    assert (tmp_path / "resid_pre.png").exists()
