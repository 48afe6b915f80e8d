"""The generic training loop: a fresh model from a Config, next-token loss, optax steps under jit.

    params = init_params(cfg, jax.random.PRNGKey(seed))      # the trainable leaves only
    full = complete(params, cfg)                              # + tied W_U, fixed zeros: what forward reads
    nll, correct = token_losses(full, cfg, tokens)            # [batch, pos - 1] each
    run = train(cfg, batches, optax.adamw(1e-3), steps=1000, seed=0)

`batches(rng)` draws one batch of token ids [batch, pos] from a `numpy.random.Generator` seeded
with `seed`; the parameters are initialised from `jax.random.PRNGKey(seed)`. Same seed, same
model (on the same backend).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jinterp import arch
from jinterp.config import Config

# Each weight matrix draws from its own fixed key index, so adding a kind of weight (W_gate, an
# untied W_U) never changes how the others are initialised.
_INIT_ORDER = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_gate", "W_U")


def init_params(cfg: Config, key, *, std: float = 0.02, biases: bool = True) -> dict:
    """Trainable parameters of a fresh model with this config, GPT-2 style.

    Weight matrices ~ N(0, std^2), norm weights 1, biases 0. Works for every family the decoder
    supports (the shapes come from `arch.param_shapes`). Left out, and filled in by `complete`:
    the unembedding when `cfg.tied_embeddings` (it is W_E transposed), `unembed.b_U` (HF
    checkpoints have no unembedding bias), and all biases when `biases=False` (families whose
    checkpoints have none, e.g. Llama).
    """
    keys = jax.random.split(key, len(_INIT_ORDER))

    def leaf(path, s):
        name = path[-1].key
        if name in _INIT_ORDER:
            return std * jax.random.normal(keys[_INIT_ORDER.index(name)], s.shape, s.dtype)
        if name == "w":  # a norm's weight
            return jnp.ones(s.shape, s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    full = jax.tree_util.tree_map_with_path(leaf, arch.param_shapes(cfg))
    drop = {"b_U"} | ({"W_U"} if cfg.tied_embeddings else set())
    return _prune(full, lambda name: name in drop or (not biases and name.startswith("b")))


def complete(params: dict, cfg: Config) -> dict:
    """The full parameter pytree the decoder reads: the trainable `params` plus the leaves
    `init_params` left out (W_U = W_E^T when tied; zeros for everything else missing)."""
    W_E = params["embed"]["W_E"]

    def fill(shapes, have):
        out = {}
        for k, s in shapes.items():
            if isinstance(s, dict):
                out[k] = fill(s, have.get(k, {}))
            elif k in have:
                out[k] = have[k]
            elif k == "W_U" and cfg.tied_embeddings:
                out[k] = W_E.T
            else:
                out[k] = jnp.zeros(s.shape, W_E.dtype)
        return out

    return fill(arch.param_shapes(cfg, W_E.dtype), params)


def token_losses(params: dict, cfg: Config, tokens, attention_mask=None):
    """Next-token cross-entropy [batch, pos - 1] and whether the argmax was right, of a complete
    parameter pytree on tokens [batch, pos]."""
    logits, _ = arch.forward(params, tokens, attention_mask, (), cfg=cfg)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    target = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
    return nll, logp.argmax(-1) == target


@dataclasses.dataclass
class Trained:
    """What `train` returns: the complete parameters, (step, loss) pairs, and the wall time."""

    params: dict
    history: list[tuple[int, float]]
    seconds: float


def train(
    cfg: Config,
    batches: Callable[[np.random.Generator], np.ndarray | tuple[np.ndarray, np.ndarray]],
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    seed: int = 0,
    params: dict | None = None,
    log_every: int = 100,
    progress: bool = True,
    desc: str = "training",
) -> Trained:
    """Minimise the mean next-token loss for `steps` optax steps (one jitted program, reused by later
    calls with the same cfg and optimizer object).

    batches: draws token ids [batch, pos] from the numpy Generator seeded with `seed`, or
    (tokens, weights) with weights [batch, pos - 1] on the next-token losses (e.g. 1 on the answer
    token only); the loss is then the weighted mean.
    params: trainable parameters to start from (default `init_params(cfg, PRNGKey(seed))`).
    The loss is recorded at step 1 and every `log_every` steps (and shown on the tqdm bar).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if params is None:
        params = init_params(cfg, jax.random.PRNGKey(seed))
    state = optimizer.init(params)
    step = functools.partial(_step, cfg=cfg, optimizer=optimizer)  # compiled once per (cfg, optimizer, shapes)
    rng = np.random.default_rng(seed)
    history = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step")
    t0 = time.time()
    for s in range(steps):
        batch = batches(rng)
        tokens, weights = batch if isinstance(batch, tuple) else (batch, None)
        params, state, loss = step(params, state, jnp.asarray(tokens), None if weights is None else jnp.asarray(weights, jnp.float32))
        if s == 0 or (s + 1) % log_every == 0:
            history.append((s + 1, float(loss)))
            if bar is not None:
                bar.set_postfix(loss=f"{history[-1][1]:.3f}")
        if bar is not None:
            bar.update()
    jax.block_until_ready(params)
    if bar is not None:
        bar.close()
    return Trained(complete(params, cfg), history, time.time() - t0)


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer"))
def _step(params, state, tokens, weights, *, cfg: Config, optimizer: optax.GradientTransformation):
    def loss_fn(p):
        nll = token_losses(complete(p, cfg), cfg, tokens)[0]
        return nll.mean() if weights is None else (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


def _prune(tree: dict, drop: Callable[[str], bool]) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            v = _prune(v, drop)
            if v:
                out[k] = v
        elif not drop(k):
            out[k] = v
    return out


def plot_history(history, path, *, ylabel: str = "loss", title: str = "") -> None:
    """The (step, loss) pairs `train` recorded, as a PNG (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, l = zip(*history)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(s, l)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
