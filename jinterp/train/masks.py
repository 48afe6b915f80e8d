"""Learned masks: a differentiable mask over heads (or MLP neurons) trained to keep a metric while
keeping as few units as possible; the units it keeps are a circuit (subnetwork probing, Cao et
al. 2021; the learned-mask baseline of Conmy et al. 2023).

Each unit u (a head's z at attn.hook_z, or a neuron at mlp.hook_post) gets a gate m_u in [0, 1],
and the forward runs with

    x_u' = m_u * x_u + (1 - m_u) * a_u

where a is the ablation value: the dataset mean at each position ("mean"), zero ("zero"), or
values you pass (e.g. a corrupted run's activations, or per-template means). The gate is one of

    hard_concrete   (Louizos, Welling & Kingma 2018) log_alpha per unit; in training
                    u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
                    m = clip(s * (zeta - gamma) + gamma, 0, 1), beta = 2/3, (gamma, zeta) = (-0.1, 1.1);
                    penalty = expected L0 = sum_u sigmoid(log_alpha - beta log(-gamma / zeta));
                    deterministic gate clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)
    sigmoid         m = sigmoid(logit / T), T annealed geometrically from 1 to `t_min`;
                    penalty = L1 = sum_u m

and the loss is task + sparsity * penalty (the penalty counts units, so `sparsity` is what one
kept unit must be worth in task loss). The task term keeps

    a metric      ((metric(masked) - target) / |target|)^2, target = metric of the unmasked model
                  (answers=[B, 2] gives the logit difference at `pos`)
    the outputs   (no metric) KL(p_clean || p_masked) per position, averaged over real positions
                  (or over `pos`)

A unit is kept when its deterministic gate exceeds 0.5 (log_alpha > 0, or logit > 0).
`Mask.edits(ablation)` turns the kept set into ordinary edits (the hard circuit), and
`Mask.save` / `Mask.load` store it with its provenance (kind "mask", `jinterp.train.fitted`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jinterp import arch
from jinterp import edits as E
from jinterp import metrics as M
from jinterp import sites as S
from jinterp.train import fitted

KIND = "mask"
SITES = {"attn.hook_z": ("head",), "mlp.hook_post": ("d_mlp",)}
KINDS = ("hard_concrete", "sigmoid")
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


class MaskError(ValueError):
    """Bad input to masks.fit, or a training run that diverged."""


# ----------------------------------------------------------------------------------------
# gates


def hard_concrete_sample(log_alpha, key):
    """A stretched, clipped hard-concrete sample (Louizos et al. 2018, eq. 10-11)."""
    u = jax.random.uniform(key, log_alpha.shape, minval=1e-6, maxval=1 - 1e-6)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def hard_concrete_gate(log_alpha):
    """The deterministic (test-time) gate."""
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def expected_l0(log_alpha):
    """P(gate != 0) per unit (Louizos et al. 2018, eq. 12)."""
    return jax.nn.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


# ----------------------------------------------------------------------------------------
# the masked forward


def _unit_axes(site):
    return ("layer",) + SITES[site] + (("d_head",) if site == "attn.hook_z" else ())


def mask_edits(site: str, m, ablation: E.Value) -> tuple:
    """Edits computing x' = m * x + (1 - m) * a at `site` for a gate m [L, units] (traceable, so a
    gradient reaches m): a Scale by m, then an Add of (1 - m) * a."""
    m = jnp.asarray(m)
    g = m[..., None] if site == "attn.hook_z" else m  # [L, H, 1] or [L, F]
    a = ablation.array
    lay = ablation.axes
    # (1 - m) broadcast against the ablation's axes: it carries "layer" and the unit axes
    shape = [1] * a.ndim
    shape[lay.index("layer")] = g.shape[0]
    unit = SITES[site][0]
    shape[lay.index(unit)] = g.shape[1]
    add = (1.0 - m).reshape(shape).astype(a.dtype) * a
    return (E.edit(site, E.Scale(E.Value(g, _unit_axes(site)[: g.ndim]))), E.edit(site, E.Add(E.Value(add, lay))))


def _ablation_value(model, site, tokens, attention_mask, ablation) -> E.Value:
    """The ablation value a as an edits.Value with a "layer" axis."""
    cfg = model.config
    L = cfg.n_layers
    unit = (cfg.n_heads, cfg.d_head) if site == "attn.hook_z" else (cfg.d_mlp,)
    unit_axes = S.layout(site)[2:]  # ("head", "d_head") or ("d_mlp",)
    B, P = tokens.shape
    if isinstance(ablation, str):
        if ablation == "zero":
            return E.Value(jnp.zeros((1,) + (1,) * len(unit), jnp.float32), ("layer",) + unit_axes)
        if ablation != "mean":
            raise MaskError(f"ablation must be 'mean', 'zero' or an array of values, got {ablation!r}")
        _, cache = model.run_with_cache(tokens, names=lambda n: n.endswith(site), attention_mask=attention_mask)
        x = cache.stack(site).astype(jnp.float32)  # [L, B, P, *unit]
        w = jnp.ones((B, P)) if attention_mask is None else jnp.asarray(attention_mask, jnp.float32)
        w = w.reshape((1, B, P) + (1,) * len(unit))
        mean = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)  # [L, P, *unit]: the mean over the data, per position
        return E.Value(mean, ("layer", "pos") + unit_axes)
    a = jnp.asarray(ablation)
    layouts = {len(unit) + 1: ("layer",), len(unit) + 2: ("layer", "pos"), len(unit) + 3: ("layer", "batch", "pos")}
    lead = layouts.get(a.ndim)
    want = {("layer",): (L,), ("layer", "pos"): (L, P), ("layer", "batch", "pos"): (L, B, P)}
    if lead is None or tuple(a.shape) != want[lead] + unit:
        raise MaskError(
            f"ablation values for {site} must be [layer, *unit], [layer, pos, *unit] or [layer, batch, pos, *unit] with "
            f"layer={L}, batch={B}, pos={P}, unit={list(unit)}; got shape {tuple(a.shape)}")
    return E.Value(a.astype(jnp.float32), lead + unit_axes)


# ----------------------------------------------------------------------------------------
# the fitted object


@dataclasses.dataclass
class Mask:
    """A learned mask: `logits` [L, units] (log_alpha for hard_concrete, the sigmoid's logit
    otherwise), the site, and what it was fitted on."""

    site: str
    kind: str
    logits: np.ndarray
    sparsity: float
    history: dict = dataclasses.field(default_factory=dict)  # per step: loss, task, metric, expected_kept, kept
    info: dict = dataclasses.field(default_factory=dict)     # target, metric_kept, t_min, ... (JSON-able)
    provenance: dict = dataclasses.field(default_factory=dict)

    def soft(self) -> np.ndarray:
        """The deterministic gate in [0, 1], [L, units]."""
        lg = jnp.asarray(self.logits, jnp.float32)
        if self.kind == "hard_concrete":
            return np.asarray(hard_concrete_gate(lg))
        return np.asarray(jax.nn.sigmoid(lg / self.info.get("t_min", 1.0)))

    def kept(self) -> np.ndarray:
        """bool [L, units]: the units whose deterministic gate exceeds 0.5 (the circuit)."""
        return self.soft() > 0.5

    @property
    def n_kept(self) -> int:
        return int(self.kept().sum())

    def heads(self) -> list[tuple[int, int]]:
        """The kept (layer, unit) pairs."""
        return [tuple(map(int, x)) for x in np.argwhere(self.kept())]

    def edits(self, model, tokens, ablation="mean", attention_mask=None) -> tuple:
        """The hard circuit as ordinary edits: every unit not kept set to its ablation value."""
        tokens, attention_mask = model.prepare_inputs(tokens, attention_mask)
        a = _ablation_value(model, self.site, tokens, attention_mask, ablation)
        drop = jnp.asarray(~self.kept(), jnp.float32)
        drop = drop[..., None] if self.site == "attn.hook_z" else drop
        return (E.edit(self.site, E.SetWhere(a, E.Value(drop, _unit_axes(self.site)[: drop.ndim]))),)

    def __repr__(self):
        L, U = np.shape(self.logits)
        return f"Mask({self.kind} at {self.site}, {self.n_kept} of {L * U} kept, sparsity {self.sparsity})"

    # ------------------------------------------------------------------ persistence
    def save(self, path, provenance: dict | None = None) -> Path:
        """Save with orbax (jinterp.train.fitted, kind "mask"); provenance defaults to the one
        recorded by fit (model, site, tokens' fingerprint, settings)."""
        arrays = {"logits": np.asarray(self.logits, np.float32)}
        arrays.update({f"history_{k}": np.asarray(v, np.float32) for k, v in self.history.items()})
        meta = dict(site=self.site, kind=self.kind, sparsity=float(self.sparsity), info=self.info,
                    provenance=self.provenance if provenance is None else provenance)
        return fitted.save(path, KIND, arrays, meta)

    @classmethod
    def load(cls, path) -> "Mask":
        arrays, meta = fitted.load(path, KIND)
        hist = {k[len("history_"):]: np.asarray(v) for k, v in arrays.items() if k.startswith("history_")}
        return cls(meta["site"], meta["kind"], np.asarray(arrays["logits"]), meta["sparsity"], hist,
                   meta.get("info", {}), meta.get("provenance", {}))


def load(path) -> Mask:
    return Mask.load(path)


# ----------------------------------------------------------------------------------------
# training


def _resolve_site(cfg, site):
    try:
        local = S.resolve_local(cfg, site)
    except S.SiteError as e:
        raise MaskError(f"masks.fit: {e}") from None
    if local not in SITES:
        raise MaskError(f"masks.fit masks heads at 'attn.hook_z' or neurons at 'mlp.hook_post', not {site!r}")
    return local


def _kl_positions(pos, B, P, attention_mask):
    """Weights [B, P] over which the KL objective averages."""
    w = np.ones((B, P), np.float32) if attention_mask is None else np.asarray(attention_mask, np.float32)
    if pos is None:
        return w
    p = np.asarray(pos)
    sel = np.zeros((B, P), np.float32)
    if p.ndim == 0:
        sel[:, int(p) % P] = 1
    elif p.shape == (B,):
        sel[np.arange(B), p % P] = 1
    else:
        raise MaskError(f"pos must be an int or one position per example [{B}], got shape {p.shape}")
    return sel * w


def _task(logits, ref, consts, metric):
    """(task loss, task value): the squared relative deviation of the metric from its target, or
    the KL to the reference log-probabilities averaged with weights kl_w."""
    if metric is not None:
        v = jnp.mean(jnp.asarray(metric(logits), jnp.float32))
        return ((v - consts["tgt"]) / consts["scale"]) ** 2, v
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    kl = (jnp.exp(ref) * (ref - lp)).sum(-1)
    v = (kl * consts["kl_w"]).sum() / consts["kl_w"].sum()
    return v, v


def _gate(theta, key, temp, kind):
    """(gate sample [L, units], penalty: expected L0 or L1)."""
    if kind == "hard_concrete":
        return hard_concrete_sample(theta, key), expected_l0(theta).sum()
    m = jax.nn.sigmoid(theta / temp)
    return m, m.sum()


@functools.partial(jax.jit, static_argnames=("cfg", "site", "axes", "kind", "metric", "lr"))
def _step(theta, state, key, temp, params, tokens, amask, a_arr, ref, consts, *, cfg, site, axes, kind, metric, lr):
    """One Adam step on the mask logits (compiled once per model, site, kind, metric and lr)."""
    opt = optax.adam(lr)

    def loss_fn(theta):
        m, pen = _gate(theta, key, temp, kind)
        logits = arch.forward(params, tokens, amask, mask_edits(site, m, E.Value(a_arr, axes)), cfg=cfg)[0]
        t, v = _task(logits, ref, consts, metric)
        return t + consts["sparsity"] * pen, (t, v, pen)

    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(theta)
    upd, state = opt.update(g, state, theta)
    return optax.apply_updates(theta, upd), state, loss, aux


def fit(
    model,
    tokens,
    metric=None,
    *,
    answers=None,
    pos=None,
    site: str = "attn.hook_z",
    ablation="mean",
    sparsity: float = 1e-2,
    kind: str = "hard_concrete",
    steps: int = 300,
    lr: float = 0.1,
    init: float = 3.0,
    t_min: float = 0.05,
    target: float | None = None,
    seed: int = 0,
    attention_mask=None,
    progress: bool = True,
) -> Mask:
    """Train a mask over the units at `site` (see the module docstring) -> Mask.

    tokens [B, P]; metric: a JAX function of logits [B, P, V] (mean over a per-example result)
    to keep at `target` (default: its value on the unmasked model); or answers [B, 2] (correct,
    incorrect ids) for the logit difference at `pos` (default the last position); neither: KL to
    the unmasked model's outputs at `pos` (default every real position). ablation: "mean" (over
    the batch, per position), "zero", or values [L, (B,) (P,) *unit]. sparsity: the penalty per
    kept unit (>= 0). init: the starting logit (every gate open). Adam with learning rate `lr`,
    full batch, one jitted step; raises MaskError naming the step if the loss turns NaN.
    """
    cfg = model.config
    site = _resolve_site(cfg, site)
    if kind not in KINDS:
        raise MaskError(f"kind must be one of {KINDS}, got {kind!r}")
    if not (isinstance(sparsity, (int, float, np.floating)) and np.isfinite(sparsity) and sparsity >= 0):
        raise MaskError(f"sparsity (the penalty per kept unit) must be a finite number >= 0, got {sparsity!r}")
    if int(steps) < 1:
        raise MaskError(f"steps must be at least 1, got {steps}")
    if not 0 < t_min <= 1:
        raise MaskError(f"t_min (the final sigmoid temperature) must be in (0, 1], got {t_min}")
    tokens, attention_mask = model.prepare_inputs(tokens, attention_mask)
    B, P = tokens.shape
    if metric is not None and answers is not None:
        raise MaskError("pass a metric or answers (for the logit difference), not both")
    if answers is not None:
        a = np.asarray(answers)
        if a.ndim != 2 or a.shape != (B, 2):
            raise MaskError(f"answers must be [batch, 2] (correct, incorrect) with batch {B} (the tokens' batch), got shape {a.shape}")
        if pos is not None and np.ndim(pos) == 1 and len(pos) != B:
            raise MaskError(f"pos gives {len(pos)} positions for a batch of {B}")
        metric = M.logit_diff(a, pos=-1 if pos is None else pos)
    abl = _ablation_value(model, site, tokens, attention_mask, ablation)
    L = cfg.n_layers
    U = cfg.n_heads if site == "attn.hook_z" else cfg.d_mlp
    clean = model(tokens, attention_mask)
    kl_w = None
    if metric is None:
        kl_w = jnp.asarray(_kl_positions(pos, B, P, None if attention_mask is None else np.asarray(attention_mask)))
        ref = jax.nn.log_softmax(clean.astype(jnp.float32), -1)
        tgt = 0.0
    else:
        ref = jnp.zeros(())
        tgt = float(np.mean(np.asarray(metric(clean)))) if target is None else float(target)
        if not np.isfinite(tgt):
            raise MaskError(f"the metric's target is {tgt}; pass a finite target=")
    scale = abs(tgt) if abs(tgt) > 1e-6 else 1.0
    objective = "kl" if metric is None else "metric"
    kw = dict(cfg=cfg, site=site, axes=abl.axes, kind=kind, metric=metric, lr=float(lr))
    consts = dict(tgt=jnp.float32(tgt), scale=jnp.float32(scale), kl_w=kl_w if kl_w is not None else jnp.zeros(()),
                  sparsity=jnp.float32(sparsity))
    theta = jnp.full((L, U), float(init), jnp.float32)
    state = optax.adam(lr).init(theta)
    key = jax.random.PRNGKey(seed)
    temps = np.geomspace(1.0, t_min, int(steps)) if kind == "sigmoid" else np.ones(int(steps))
    hist = {k: [] for k in ("loss", "task", "metric", "expected_kept", "kept")}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(steps), desc=f"mask ({kind}, {site})", leave=False)
    a_arr = abl.array
    for i in range(int(steps)):
        key, sub = jax.random.split(key)
        theta, state, loss, (t, v, pen) = _step(theta, state, sub, jnp.float32(temps[i]), model.params, tokens,
                                                attention_mask, a_arr, ref, consts, **kw)
        loss = float(loss)
        if not np.isfinite(loss):
            if bar is not None:
                bar.close()
            raise MaskError(f"mask training diverged: the loss is {'NaN' if np.isnan(loss) else loss} at step {i} (of {steps}); "
                            f"try a smaller lr (now {lr}) or check the metric and ablation values for NaN")
        hard = (theta > 0).sum()
        for k, x in zip(hist, (loss, t, v, pen, hard)):
            hist[k].append(float(x))
        if bar is not None:
            bar.update(1)
            if i % 10 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{loss:.4f}", kept=int(hist["kept"][-1]))
    if bar is not None:
        bar.close()
    theta = np.asarray(theta)
    info = dict(target=tgt, objective=objective, t_min=float(t_min) if kind == "sigmoid" else 1.0,
                steps=int(steps), lr=float(lr), init=float(init), seed=int(seed),
                ablation=ablation if isinstance(ablation, str) else "values")
    mask = Mask(site, kind, theta, float(sparsity), {k: np.asarray(v) for k, v in hist.items()}, info)
    # the hard circuit's task value, through the same masked forward with m in {0, 1}
    hard_m = jnp.asarray(mask.kept(), jnp.float32)
    _, v_hard = _task(model(tokens, attention_mask, edits=mask_edits(site, hard_m, abl)), ref, consts, metric)
    info["metric_kept"] = float(v_hard)
    info["n_kept"] = mask.n_kept
    info["n_units"] = int(L * U)
    mask.provenance = fitted.provenance(
        model, site=site, tokens=np.asarray(tokens), kind=kind, sparsity=float(sparsity), objective=info["objective"],
        ablation=info["ablation"],
        **({"ablation_values": np.asarray(a_arr)} if not isinstance(ablation, str) else {}),
        **({"answers": np.asarray(answers)} if answers is not None else {}))
    return mask
