"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions with the Tuned Lens").

The logit lens reads the residual stream entering layer l straight through the final norm and
unembedding. The tuned lens first applies a learned affine *translator* per layer,

    h  ->  h + h @ A[l] + b[l]          (A [L, d_model, d_model], b [L, d_model]; zero = identity)

then the model's own final norm and unembedding (`arch.unembed`, exactly as `jinterp.lens` does).
The translators are trained, all layers at once, to minimise

    sum_l  mean_{batch, positions}  KL(p_final || p_lens_l)

where p_final is the model's output distribution (the final residual unembedded) and the mean runs
over every real (attention-mask) position. The residuals are the logit lens's: `blocks.{l}.hook_resid_pre`
for l = 0..L-1 (labels "0_pre", ...), plus the final residual ("final_post") which needs no
translator (it *is* the output; its KL is 0).

    tr = tuned_lens.train(model, tokens, attention_mask=mask, steps=300)   # Translators
    tr.save("runs/tl-ioi")                         # orbax + fitted.json (model, site, data hash)
    tr = tuned_lens.Translators.load("runs/tl-ioi")
    res = jinterp.lens.tuned_lens(model, held_out, tr, positions=None)     # res.kl vs res.logit_kl

Optimiser: the paper uses SGD with Nesterov momentum (lr 1.0, 250 steps of 2^18 tokens) on large
corpora. On the small data sets bundled models are studied with, Adam (lr 1e-3 by default, cosine
decay to 0, gradient clipping at global norm 1) converges reliably in a few hundred steps from the
identity initialisation, so that is what `train` uses. The residuals come from a frozen forward
pass per minibatch; only A and b are trained (one jitted optax step for all layers).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jinterp import arch
from jinterp import sites as S
from jinterp.model import InputError
from jinterp.train import fitted

KIND = "tuned_lens"
SITE = "blocks.{l}.hook_resid_pre"
F32 = jnp.float32


@dataclasses.dataclass
class Translators:
    """One affine translator per layer: h -> h + h @ A[l] + b[l] for the residual entering layer l.

    A [L, d_model, d_model] (input dim first), b [L, d_model], history: the training loss
    (summed over layers) per step, meta: what they were fitted on (`fitted.provenance`)."""

    A: jax.Array
    b: jax.Array
    history: list = dataclasses.field(default_factory=list)
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.A.shape[-1])

    @classmethod
    def identity(cls, model) -> "Translators":
        """Zero translators: the tuned lens reads exactly what the logit lens reads."""
        L, d = model.config.n_layers, model.config.d_model
        return cls(jnp.zeros((L, d, d), F32), jnp.zeros((L, d), F32), [], fitted.provenance(model, site=SITE))

    def check(self, model) -> None:
        """Raise InputError if these translators were fitted for a model of another shape."""
        c = model.config
        L, d = self.n_layers, self.d_model
        if (L, d) != (c.n_layers, c.d_model) or self.A.shape != (L, d, d) or self.b.shape != (L, d):
            src = self.meta.get("model", "another model")
            raise InputError(
                f"these translators were fitted for {src} with n_layers={L}, d_model={d} "
                f"(A {list(self.A.shape)}, b {list(self.b.shape)}), but {model.name} has "
                f"n_layers={c.n_layers}, d_model={c.d_model}; train translators for this model"
            )

    def save(self, path, provenance: dict | None = None):
        """Write to the new directory `path` (orbax arrays + fitted.json). provenance: what they were
        fitted on (`fitted.provenance(model, ...)`); default: the record `train` made."""
        meta = dict(self.meta if provenance is None else provenance)
        meta.setdefault("site", SITE)
        arrays = {"A": self.A, "b": self.b, "history": np.asarray(self.history, np.float32).reshape(-1)}
        return fitted.save(path, KIND, arrays, meta)

    @classmethod
    def load(cls, path) -> "Translators":
        arrays, meta = fitted.load(path, KIND)
        return cls(arrays["A"], arrays["b"], [float(x) for x in np.asarray(arrays["history"])], meta)


# ---------------------------------------------------------------------------------- computation

def translate(A, b, h):
    """Apply translators to residuals h [L, ..., d_model] (layer first) -> same shape and dtype.
    Computed in float32; zero A and b return h unchanged, bit for bit."""
    h32 = h.astype(F32)
    Ah = jnp.einsum("l...d,lde->l...e", h32, A.astype(F32), precision=jax.lax.Precision.HIGHEST)
    bb = b.astype(F32).reshape(b.shape[:1] + (1,) * (h.ndim - 2) + b.shape[1:])
    return (h32 + Ah + bb).astype(h.dtype)


def kl_to_final(logits, weights=None):
    """KL(p_final || p_l) per layer: logits [n, batch, pos, vocab] whose last entry is the final
    distribution; weights [batch, pos] (e.g. the attention mask; default all 1). Returns [n],
    the weighted mean over batch and positions, in float32 (the last entry is 0)."""
    logp = jax.nn.log_softmax(logits.astype(F32), -1)
    final = logp[-1]
    kl = jnp.sum(jnp.exp(final) * (final - logp), -1)  # [n, batch, pos]
    if weights is None:
        return kl.mean((1, 2))
    w = jnp.asarray(weights, F32)
    return (kl * w).sum((1, 2)) / jnp.maximum(w.sum(), 1e-9)


def _per_layer_kl(tr, params, stack, weights, cfg):
    """stack [L + 1, B, P, d] (resid_pre 0..L-1, then the final residual) -> KL per translated layer [L]."""
    h = translate(tr["A"], tr["b"], stack[:-1])
    logits = arch.unembed(params, cfg, jnp.concatenate([h, stack[-1:]], 0))
    return kl_to_final(logits, weights)[:-1]


def residuals(model, tokens, attention_mask=None, positions=None):
    """(stack [L + 1, B, npos, d], labels, weights [B, npos] float32): the residual entering each
    layer and the final residual, at `positions` (None: all), and the mask there (1 if no mask)."""
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    P = tokens.shape[1]
    pos = None if positions is None else [int(p) % P for p in np.atleast_1d(np.asarray(positions))]
    names = lambda n: n.endswith(("hook_resid_pre", "hook_resid_post"))
    _, cache = model.run_with_cache(tokens, names=names, attention_mask=mask)
    stack, labels = cache.accumulated_resid(pos_slice=pos, return_labels=True)
    w = np.ones(tokens.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
    if pos is not None:
        w = w[:, np.asarray(pos)]
    return stack, list(labels), w


def lens_logits(model, tokens, translators: Translators | None = None, positions=-1, attention_mask=None):
    """(logits [L + 1, B, npos, vocab], labels, weights [B, npos]): the logit lens (translators None)
    or the tuned lens; the last entry is the model's final distribution in both."""
    from jinterp.lens import unembed  # the logit lens's own compiled unembedding: identical logits

    if translators is not None:
        translators.check(model)
    stack, labels, w = residuals(model, tokens, attention_mask, positions)
    if not float(w.sum()) > 0:
        raise InputError("the selected positions are all masked out (attention_mask is 0 there); choose other positions")
    if translators is not None:
        stack = translate_stack(translators, stack)
    return unembed(model, stack), labels, w


_translate_jit = jax.jit(translate)


def translate_stack(translators: Translators, stack):
    """Residuals [L + 1, ...] (the last one final) -> each of the first L through its translator."""
    return jnp.concatenate([_translate_jit(translators.A, translators.b, stack[:-1]), stack[-1:]], 0)


@jax.jit
def summarise(logits, weights):
    """(KL to the final distribution per layer [n], log-probabilities of the first example and
    position per layer [n, vocab]) in one compiled program (what `jinterp.lens` reports)."""
    return kl_to_final(logits, weights), jax.nn.log_softmax(logits[:, 0, 0].astype(F32), -1)


# ---------------------------------------------------------------------------------- training

def train(
    model,
    tokens,
    *,
    attention_mask=None,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    init: Translators | None = None,
) -> Translators:
    """Fit one affine translator per layer (all layers at once) to the model's final distribution.

    tokens [N, P] token ids (streamed in shuffled minibatches of `batch_size` rows, reshuffled every
    epoch; incomplete last minibatches are dropped so that one program serves every step);
    attention_mask [N, P]: positions with 0 are left out of the loss. Adam(lr) with cosine decay
    to 0 over `steps` and gradient clipping at global norm 1; init: translators to start from
    (default identity). Raises FloatingPointError naming the step if the loss stops being finite.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    toks, mask = model.prepare_inputs(tokens, attention_mask)  # validate the whole set at the boundary
    toks = np.asarray(toks)
    mask = None if mask is None else np.asarray(mask)
    N = toks.shape[0]
    bs = min(batch_size, N)
    cfg = model.config

    tr0 = init if init is not None else Translators.identity(model)
    tr0.check(model)
    params_tr = {"A": jnp.asarray(tr0.A, F32), "b": jnp.asarray(tr0.b, F32)}
    opt = _optimizer(float(lr), int(steps))
    state = opt.init(params_tr)
    L = cfg.n_layers
    record = tuple(sorted(S.select(cfg, [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]).items()))
    step = functools.partial(_step, cfg=cfg, record=record, opt=opt)  # compiled once per (cfg, lr, steps, shapes)

    rng = np.random.default_rng(seed)
    order, at = rng.permutation(N), 0
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="tuned lens", unit="step")
    t0 = time.time()
    try:
        for s in range(steps):
            if at + bs > N:
                order, at = rng.permutation(N), 0
            idx = np.sort(order[at:at + bs])
            at += bs
            m = np.ones((bs, toks.shape[1]), bool) if mask is None else mask[idx]
            new, new_state, loss, per = step(params_tr, state, model.params, jnp.asarray(toks[idx]), jnp.asarray(m))
            loss = float(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"tuned-lens training diverged: the loss is {loss} at step {s + 1} of {steps} "
                    f"(per layer {np.asarray(per).round(4).tolist()}); lower lr (now {lr}) or check the inputs"
                )
            params_tr, state = new, new_state
            history.append(loss)
            if bar is not None:
                bar.set_postfix(kl=f"{loss:.4f}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    for k, v in params_tr.items():
        if not bool(jnp.isfinite(v).all()):
            raise FloatingPointError(f"tuned-lens training produced non-finite {k} after step {steps}; lower lr (now {lr})")
    meta = fitted.provenance(
        model, site=SITE, tokens=toks, attention_mask=mask, n_examples=N, steps=steps, lr=lr,
        batch_size=bs, seed=seed, optimizer="adam+cosine_decay+clip1", final_loss=history[-1],
        labels=[f"{l}_pre" for l in range(cfg.n_layers)], seconds=round(time.time() - t0, 2),
    )
    if mask is None:
        meta.pop("attention_mask")
    return Translators(params_tr["A"], params_tr["b"], history, meta)


@functools.lru_cache(maxsize=16)
def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """Adam with cosine decay to 0 and global-norm clipping (cached: a repeated fit reuses the compiled step)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(lr, steps)))


@functools.partial(jax.jit, static_argnames=("cfg", "record", "opt"))
def _step(p, state, params, tokens, mask, *, cfg, record, opt):
    """One optax step on all translators: a frozen forward pass records the residuals, then the
    summed per-layer KL to the model's output is differentiated with respect to A and b only."""
    _, acts = arch.forward(params, tokens, mask, (), cfg=cfg, record=record)
    stack = jax.lax.stop_gradient(jnp.concatenate([acts["hook_resid_pre"], acts["hook_resid_post"][-1:]], 0))
    w = mask.astype(F32)

    def loss_fn(q):
        per = _per_layer_kl(q, params, stack, w, cfg)
        return per.sum(), per

    (loss, per), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss, per
