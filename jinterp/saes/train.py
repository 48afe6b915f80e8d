"""Training sparse dictionaries in JAX: SAEs (ReLU + L1, TopK, JumpReLU) and per-layer transcoders.

One dictionary per layer, all layers trained at once: the parameters carry a leading layer axis,
the loss is `vmap`ped over it, and each step is one jitted program that runs the model on the
next token batch (recording only the site at the requested layers) and takes one optax step for
every layer's dictionary. Activations are streamed, never stored.

    run = train.fit(model, batches, site="hook_resid_post", architecture="topk", d_sae=256, k=8,
                    steps=500, batch_size=32)
    run.dictionary                # stacked Dictionary, leaves [L, ...]; run[1] is layer 1's
    run.history["explained_variance"]      # [n_logged, L], also loss, mse, l0, dead_fraction
    run.evaluate(model, held_out)          # {layer: {l0, explained_variance, ce_loss_recovered, ...}}
    run.save("out/")                       # out/blocks.{l}.{site}/ in the SAELens format + metrics.json
    train.save_saelens(run[0], "one_sae/")  # one layer, SAELens 6 layout; SAE.load_from_disk reads it

Padded rows: a batch may be a pair (tokens, attention_mask) (batches.py). Every mean below is over
the real tokens that count (loss, normalisation, dead counts, logs); the forward sees the mask.

Per layer l, on activations x [N, d_in] (and, for a transcoder, targets y [N, d_out]; y = x for an SAE):

    x, y scaled by s_in = sqrt(d_in) / E|x|, s_out = sqrt(d_out) / E|y| (from the first batch;
        `normalize=False` turns this off), folded back into the weights when training ends
    pre   = (x - b_dec [SAE only]) @ W_enc + b_enc
    relu      f = relu(pre);                loss = E|y - f W_dec - b_dec|^2 + l1 * E sum_i f_i
    topk      f = relu(top_k(pre, k));      loss = E|y - f W_dec - b_dec|^2
    jumprelu  f = pre * H(pre - theta);     loss = E|y - ...|^2 + l0 * E sum_i H(pre_i - theta_i)
              theta = exp(log_theta); H's gradient with respect to theta is the straight-through
              estimate -(1/eps) rect((pre - theta)/eps) (Rajamanoharan et al. 2024, eps = bandwidth)

(E: the mean over tokens, |.|^2 summed over the width.) Initialisation as in SAELens: decoder rows
random unit vectors, W_enc = W_dec^T (transcoders: an independent random W_enc with unit columns),
b_enc = 0, b_dec = the mean of the first batch (of y). After every step the decoder rows are
renormalised to unit norm (the constraint of Bricken et al. 2023; we do not use the April-2024
variant that weights the L1 by decoder norms), so the saved W_dec has unit rows.

Transcoders may add a skip connection (`skip=True`): y_hat += x @ W_skip, W_skip [d_in, d_out]
initialised to 0 and trained with the rest (Paulo et al. 2025, arXiv 2501.18823; saved as W_skip).

Dead features: per layer, the number of steps since each feature last fired on a batch; a feature
is dead when that reaches `dead_window`. History records the dead fraction. Two remedies
(jinterp/saes/dead.py has the maths): TopK trains with the AuxK loss on the dead latents
(`auxk_coeff`, default 1/32; 0 turns it off), and any architecture can resample its dead features
every `resample_every` steps (Anthropic 2023: toward high-loss inputs, optimizer state reset).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jinterp import arch
from jinterp import sites as S
from jinterp.saes import batches as TB
from jinterp.saes import dead as D
from jinterp.saes.dictionary import Dictionary
from jinterp.saes.evaluate import TrainedDictionaries, site_names
from jinterp.saes.jumprelu import heaviside, jump
from jinterp.saes.saelens import save_circuit_tracer, save_saelens  # noqa: F401 (re-exported: train.save_saelens)

ARCHITECTURES = ("relu", "topk", "jumprelu")
_OURS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
# ---------------------------------------------------------------------------------------------
# the pieces of one step


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a run: it keys the compiled step."""

    cfg: object
    record: tuple
    site: str
    out_site: str
    layers: tuple
    architecture: str
    k: int | None
    bandwidth: float
    skip_bos: bool
    transcoder: bool
    optimizer: object
    skip: bool = False
    auxk_coeff: float = 0.0
    k_aux: int = 1
    dead_window: int = 100


def _acts(model_params, tokens, mask, keep, spec: _Spec):
    """Site activations at every trained layer: x [L, N, d_in], y [L, N, d_out] (y is x for an SAE),
    and w [N], 1.0 on the tokens that count (real, not BOS with skip_bos) and 0.0 elsewhere."""
    _, acts = arch.forward(model_params, tokens, mask, (), cfg=spec.cfg, record=spec.record)

    def grab(local):
        a = acts[local]  # [L_recorded, B, P, ...]
        rec = dict(spec.record)[local]
        a = a[jnp.asarray([rec.index(l) for l in spec.layers])] if tuple(rec) != spec.layers else a
        return jax.lax.stop_gradient(a.reshape(a.shape[0], a.shape[1] * a.shape[2], -1).astype(jnp.float32))

    x = grab(spec.site)
    return x, (grab(spec.out_site) if spec.transcoder else x), keep.reshape(-1).astype(jnp.float32)


def _encode(p, x, spec: _Spec):
    """(activations f [N, d_sae], pre-activations [N, d_sae]) of one layer's training parameters."""
    xc = x if spec.transcoder else x - p["b_dec"]
    pre = xc @ p["W_enc"] + p["b_enc"]
    if spec.architecture == "relu":
        return jax.nn.relu(pre), pre
    if spec.architecture == "topk":
        vals, idx = jax.lax.top_k(pre, spec.k)
        rows = jnp.arange(pre.shape[0])[:, None]
        return jnp.zeros_like(pre).at[rows, idx].set(jax.nn.relu(vals)), pre
    theta = jnp.broadcast_to(jnp.exp(p["log_threshold"]), pre.shape)
    return jump(pre, theta, spec.bandwidth), pre


def _decode(p, f, x, spec: _Spec):
    y_hat = f @ p["W_dec"] + p["b_dec"]
    return y_hat + x @ p["W_skip"] if spec.skip else y_hat


def _layer_loss(p, x, y, w, dead, coeff, spec: _Spec):
    n = jnp.maximum(w.sum(), 1.0)

    def mean(v):  # over the tokens that count
        return (v * w).sum() / n

    f, pre = _encode(p, x, spec)
    y_hat = _decode(p, f, x, spec)
    err = jnp.sum((y - y_hat) ** 2, -1)  # [N]
    mse = mean(err)
    if spec.architecture == "relu":
        sparsity = mean(jnp.abs(f).sum(-1))
    elif spec.architecture == "jumprelu":
        theta = jnp.broadcast_to(jnp.exp(p["log_threshold"]), pre.shape)
        sparsity = mean(heaviside(pre, theta, spec.bandwidth).sum(-1))
    else:
        sparsity = jnp.zeros((), mse.dtype)
    loss = mse + coeff * sparsity
    auxk = jnp.zeros((), mse.dtype)
    if spec.architecture == "topk" and spec.auxk_coeff > 0:
        # tokens that do not count get pre-activations and residual 0, so they add exactly 0 to AuxK's
        # mean over all N tokens; N / n turns that into the mean over the counted tokens
        on = w[:, None] > 0
        auxk = spec.auxk_coeff * D.auxk_loss(jnp.where(on, pre, 0.0), p["W_dec"], jnp.where(on, y - y_hat, 0.0),
                                             dead, spec.k_aux) * (w.shape[0] / n)
        loss = loss + auxk
    active = (f > 0) & (w[:, None] > 0)
    var = jnp.sum(w[:, None] * (y - (y * w[:, None]).sum(0) / n) ** 2)
    aux = {
        "mse": mse,
        "auxk": auxk,
        "l0": mean(active.sum(-1)),
        "explained_variance": 1.0 - (w * err).sum() / jnp.maximum(var, 1e-30),
        "fired": active.any(0),
    }
    return loss, aux


@functools.lru_cache(maxsize=16)
def _adam(lr: float):
    """One optax.adam per learning rate: the optimizer is part of the compiled step's static key, so
    fits with equal settings share one program."""
    return optax.adam(lr)


def _unit_rows(W):
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0, 1, 2))
def _train_step(params, opt_state, since_fired, model_params, tokens, mask, keep, scale_in, scale_out, coeff, *,
                spec: _Spec):
    x, y, w = _acts(model_params, tokens, mask, keep, spec)
    x = x * scale_in[:, None, None]
    y = y * scale_out[:, None, None]

    dead = since_fired >= spec.dead_window

    def total(p):
        one = functools.partial(_layer_loss, spec=spec)
        losses, aux = jax.vmap(one, (0, 0, 0, None, 0, 0))(p, x, y, w, dead, coeff)
        return losses.sum(), (losses, aux)

    grads, (losses, aux) = jax.grad(total, has_aux=True)(params)
    updates, opt_state = spec.optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = {**params, "W_dec": _unit_rows(params["W_dec"])}
    since_fired = jnp.where(aux.pop("fired"), 0, since_fired + 1)
    return params, opt_state, since_fired, {"loss": losses, **aux}


@functools.partial(jax.jit, static_argnames=("spec", "scale"), donate_argnums=(0, 1, 2))
def _resample_step(params, opt_state, since_fired, model_params, tokens, mask, keep, scale_in, scale_out, key, *,
                   spec: _Spec, scale: float):
    """Resample every layer's dead features on this batch (dead.py; tokens that do not count are never
    picked); returns the count per layer."""
    x, y, w = _acts(model_params, tokens, mask, keep, spec)
    x = x * scale_in[:, None, None]
    y = y * scale_out[:, None, None]
    dead = since_fired >= spec.dead_window

    def one(p, x, y, dead, key):
        f, _ = _encode(p, x, spec)
        y_hat = _decode(p, f, x, spec)
        enc_in = x if spec.transcoder else x - p["b_dec"]
        dec_dirs = y - y_hat if spec.transcoder else enc_in
        return D.resample_layer(p, dead, enc_in, dec_dirs, w * jnp.sum((y - y_hat) ** 2, -1), key, scale)

    keys = jax.random.split(key, dead.shape[0])
    params = jax.vmap(one)(params, x, y, dead, keys)
    opt_state = D.reset_optimizer_state(spec.optimizer, opt_state, D.reset_masks(params, dead))
    return params, opt_state, jnp.where(dead, 0, since_fired), dead.sum(-1)


def _first_stats(model, tokens, mask, keep, spec: _Spec):
    """Per layer, from the first batch's tokens that count: mean |x|, mean |y|, mean of y, d_in and
    d_out (through the model's own compiled run_with_cache, which evaluate reuses)."""
    names = site_names(spec.cfg, spec.site, spec.out_site)
    _, cache = model.run_with_cache(tokens, names=names, attention_mask=mask)
    rows = np.asarray(keep).reshape(-1)

    def flat(local):
        a = jnp.stack([cache[f"blocks.{l}.{local}"] for l in spec.layers]).astype(jnp.float32)
        return a.reshape(a.shape[0], a.shape[1] * a.shape[2], -1)[:, rows]

    x = flat(spec.site)
    y = flat(spec.out_site) if spec.transcoder else x
    return (jnp.linalg.norm(x, axis=-1).mean(-1), jnp.linalg.norm(y, axis=-1).mean(-1), y.mean(1),
            int(x.shape[-1]), int(y.shape[-1]))


def _init_layer(key, d_in, d_sae, d_out, transcoder, architecture, init_threshold, skip):
    k_dec, k_enc = jax.random.split(key)
    W_dec = _unit_rows(jax.random.normal(k_dec, (d_sae, d_out), jnp.float32))
    if transcoder:
        W_enc = _unit_rows(jax.random.normal(k_enc, (d_sae, d_in), jnp.float32)).T
    else:
        W_enc = W_dec.T
    p = {"W_enc": W_enc, "b_enc": jnp.zeros((d_sae,), jnp.float32), "W_dec": W_dec,
         "b_dec": jnp.zeros((d_out,), jnp.float32)}
    if architecture == "jumprelu":
        p["log_threshold"] = jnp.full((d_sae,), math.log(init_threshold), jnp.float32)
    if skip:
        p["W_skip"] = jnp.zeros((d_in, d_out), jnp.float32)
    return p


# ---------------------------------------------------------------------------------------------
# fit


def fit(
    model,
    token_batches,
    *,
    site: str = "hook_resid_post",
    layers=None,
    architecture: str = "relu",
    d_sae: int,
    l1: float = 1.0,
    k: int | None = None,
    l0: float = 0.1,
    bandwidth: float = 0.001,
    init_threshold: float = 0.001,
    steps: int,
    lr: float = 1e-3,
    batch_size: int | None = None,
    seed: int = 0,
    transcoder_out: str | None = None,
    normalize: bool = True,
    skip_bos: bool = True,
    attention_mask=None,
    dead_window: int = 100,
    log_every: int = 10,
    optimizer: optax.GradientTransformation | None = None,
    progress: bool = True,
    skip: bool = False,
    auxk_coeff: float = 1 / 32,
    k_aux: int | None = None,
    resample_every: int | None = None,
    resample_scale: float = 0.2,
) -> TrainedDictionaries:
    """Train one dictionary per layer on activations streamed from `model`, all layers in one
    jitted step (module docstring for the maths).

    token_batches: a generator/iterable of batches, a callable rng -> batch (rng = numpy's
    default_rng(seed)), or an array [N, P] (with `attention_mask` [N, P] if padded) cycled through
    in shuffled minibatches of `batch_size`; a batch is int tokens [B, P] or a pair (tokens,
    attention_mask), padded positions left out of everything (module docstring). site: the local site read (e.g. "hook_resid_post", "hook_resid_mid",
    "mlp.hook_in", the MLP's input); transcoder_out: the site predicted (e.g. "hook_mlp_out") for a per-layer
    transcoder, None for an SAE. layers: which layers (default all). architecture: "relu" (with
    coefficient `l1`, a number or one per layer), "topk" (`k` features per token), "jumprelu" (L0 coefficient `l0`, STE
    `bandwidth`, initial threshold `init_threshold`, both in normalised units). skip_bos: leave out
    each row's first real token (BOS, whose residual is an outlier) when training. Training stops early, with a
    warning, if token_batches runs out. optimizer: default optax.adam(lr). skip: a transcoder's
    linear skip connection W_skip. auxk_coeff / k_aux: the TopK AuxK loss (k_aux default d_in // 2,
    as SAELens; coefficient 0 turns it off). resample_every: resample the features dead (no firing
    for `dead_window` steps) after every that many steps, except after the last, with encoder
    columns at `resample_scale` x the live features' mean encoder norm (dead.py). The count per
    layer is in history["resampled"] ([n_resamples, L], steps in history["resample_step"]).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if d_sae < 1:
        raise ValueError(f"d_sae must be >= 1, got {d_sae}")
    if architecture == "topk" and (k is None or not 1 <= k <= d_sae):
        raise ValueError(f"a topk dictionary needs k in 1..d_sae={d_sae}, got k={k}")
    if resample_every is not None and resample_every < 1:
        raise ValueError(f"resample_every must be a number of steps >= 1 (or None for no resampling), got {resample_every}")
    if auxk_coeff < 0 or (k_aux is not None and k_aux < 1):
        raise ValueError(f"auxk_coeff must be >= 0 and k_aux >= 1, got auxk_coeff={auxk_coeff}, k_aux={k_aux}")
    cfg = model.config
    if layers is None:
        layers = tuple(range(cfg.n_layers))
    layers = tuple(int(l) for l in np.atleast_1d(layers))
    if len(set(layers)) != len(layers) or not layers:
        raise ValueError(f"layers must be distinct layer numbers, got {layers}")
    names = [f"blocks.{l}.{site}" for l in layers]
    out_names = [f"blocks.{l}.{transcoder_out}" for l in layers] if transcoder_out else []
    record = S.select(cfg, names + out_names)  # validates names and layer ranges
    local = S.parse(cfg, names[0])[1]
    out_local = S.parse(cfg, out_names[0])[1] if transcoder_out else local
    if local in S.GLOBAL_SITES:
        raise ValueError(f"{site!r} is a global site; training reads a per-layer site (e.g. hook_resid_post)")
    transcoder = out_local != local
    if skip and not transcoder:
        raise ValueError("skip=True is a transcoder's skip connection; pass transcoder_out=... (e.g. 'hook_mlp_out')")
    custom_optimizer = optimizer is not None
    optimizer = optimizer or _adam(float(lr))
    spec = _Spec(cfg=cfg, record=tuple(sorted(record.items())), site=local, out_site=out_local, layers=layers,
                 architecture=architecture, k=k if architecture == "topk" else None, bandwidth=float(bandwidth),
                 skip_bos=skip_bos, transcoder=transcoder, optimizer=optimizer, skip=skip,
                 auxk_coeff=float(auxk_coeff) if architecture == "topk" else 0.0, k_aux=1, dead_window=int(dead_window))
    coeff = np.asarray({"relu": l1, "topk": 0.0, "jumprelu": l0}[architecture], np.float32)
    if coeff.ndim > 1 or (coeff.ndim == 1 and len(coeff) != len(layers)):
        raise ValueError(f"l1 / l0 is one number or one per trained layer ({len(layers)}), got {coeff.tolist()}")
    coeff = jnp.broadcast_to(jnp.asarray(coeff), (len(layers),))

    it = TB.iterate(token_batches, batch_size, seed, attention_mask)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("token_batches gave no batches") from None

    def prepare(b):
        return TB.prepare(model, *b, skip_bos=skip_bos)

    tokens, mask, keep = prepare(first)
    context_size = int(tokens.shape[1])
    mp = model.params
    norm_x, norm_y, mean_y, d_in, d_out = _first_stats(model, tokens, mask, keep, spec)
    if normalize:
        scale_in = jnp.sqrt(jnp.float32(d_in)) / jnp.maximum(norm_x, 1e-12)
        scale_out = jnp.sqrt(jnp.float32(d_out)) / jnp.maximum(norm_y, 1e-12)
    else:
        scale_in = scale_out = jnp.ones((len(layers),), jnp.float32)
    if not transcoder:
        scale_out = scale_in
    spec = dataclasses.replace(spec, k_aux=int(k_aux or max(d_in // 2, 1)))
    key = jax.random.PRNGKey(seed)
    per_layer = [_init_layer(jax.random.fold_in(key, l), d_in, d_sae, d_out, transcoder, architecture, init_threshold,
                             skip) for l in layers]
    params = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_layer)
    params["b_dec"] = mean_y * scale_out[:, None]
    opt_state = optimizer.init(params)
    since = jnp.zeros((len(layers), d_sae), jnp.int32)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"training {architecture} x {len(layers)} layers", unit="step")
    logged, logged_steps, resampled = [], [], []
    resample_key = jax.random.fold_in(key, 10**6)
    t0 = time.time()
    done = 0
    batch = (tokens, mask, keep)
    for s in range(steps):
        if s > 0:
            try:
                batch = prepare(next(it))
            except StopIteration:
                warnings.warn(f"token_batches ran out after {s} steps (of {steps})", stacklevel=2)
                break
        params, opt_state, since, m = _train_step(params, opt_state, since, mp, *batch, scale_in, scale_out, coeff,
                                                  spec=spec)
        done = s + 1
        if resample_every and done % resample_every == 0 and done < steps:
            params, opt_state, since, n = _resample_step(params, opt_state, since, mp, *batch, scale_in, scale_out,
                                                         jax.random.fold_in(resample_key, done), spec=spec,
                                                         scale=float(resample_scale))
            resampled.append((done, n))
        if s == 0 or done % log_every == 0 or done == steps:
            m = dict(m)
            m["dead_fraction"] = (since >= dead_window).mean(-1)
            logged.append(m)
            logged_steps.append(done)
            if bar is not None:
                bar.set_postfix(loss=f"{float(m['loss'].mean()):.3f}", ev=f"{float(m['explained_variance'].mean()):.3f}")
        if bar is not None:
            bar.update()
    jax.block_until_ready(params)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    history = {"step": np.asarray(logged_steps)}
    for name in ("loss", "mse", "auxk", "l0", "explained_variance", "dead_fraction"):
        history[name] = np.stack([np.asarray(m[name]) for m in logged])
    history["resample_step"] = np.asarray([r[0] for r in resampled], np.int64)
    history["resampled"] = np.asarray([np.asarray(r[1]) for r in resampled], np.int64).reshape(-1, len(layers))

    # fold the normalisation back in (module docstring): W_dec keeps unit rows, activations in model units
    r = (scale_in / scale_out)[:, None, None]
    so = scale_out[:, None]
    d = Dictionary(
        W_enc=params["W_enc"] * r, W_dec=params["W_dec"], b_dec=params["b_dec"] / so, b_enc=params["b_enc"] / so,
        threshold=jnp.exp(params["log_threshold"]) / so if architecture == "jumprelu" else None,
        W_skip=params["W_skip"] * r if skip else None,
        architecture=_OURS[architecture], k=spec.k, clamp=True, apply_b_dec_to_input=not transcoder,
        hook_z=local == "attn.hook_z", site=local, out_site=out_local if transcoder else None, layers=layers,
        hook_name=None, format="jinterp", source=None,
    )
    config = {
        "site": local, "transcoder_out": out_local if transcoder else None, "layers": list(layers),
        "architecture": architecture, "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "l1": np.asarray(l1).tolist() if architecture == "relu" else None,
        "k": spec.k, "l0": np.asarray(l0).tolist() if architecture == "jumprelu" else None,
        "bandwidth": bandwidth if architecture == "jumprelu" else None, "steps": done, "lr": lr,
        "optimizer": "custom" if custom_optimizer else "adam", "batch_shape": list(tokens.shape),
        "seed": seed, "normalize": normalize, "scale_in": np.asarray(scale_in).tolist(),
        "scale_out": np.asarray(scale_out).tolist(), "skip_bos": skip_bos, "dead_window": dead_window,
        "decoder": "unit-norm rows (renormalised after every step)", "model": getattr(model, "name", None),
        "skip": skip, "auxk_coeff": spec.auxk_coeff if architecture == "topk" else None,
        "k_aux": spec.k_aux if architecture == "topk" else None, "resample_every": resample_every,
        "resample_scale": resample_scale if resample_every else None,
    }
    return TrainedDictionaries(d, history, np.asarray(since), config, seconds, getattr(model, "name", None), context_size)
