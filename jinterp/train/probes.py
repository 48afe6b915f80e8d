"""Linear probes on activations: logistic (softmax) regression and difference of means, fitted on
every layer at once.

    acts = probes.collect(model, tokens, "hook_resid_post", pos=-1)      # [L, N, d]
    ps = probes.fit(acts, labels, kind="logistic", l2=1e-3)              # one jitted, vmapped program
    ps.test_acc, ps.directions                                            # [L], [L, d] (binary)
    ps = probes.fit_model(model, tokens, labels, site="resid_post")      # collect + fit + provenance
    ps.save("runs/probe-l"); probes.load("runs/probe-l")

Every layer's logistic probe is fitted in ONE jitted XLA program (`jax.vmap` over the layer axis;
one compile per (L, n_train, d, classes) shape); difference-of-means is closed form. Every layer
sees the same stratified train/test split, so accuracies compare across layers. Checks, the split
and accuracies run on the host in numpy (the activations are copied there once).

Logistic objective, per layer, on the training rows (features standardised with the training
mean and standard deviation when `standardize=True`; the weights are folded back so `W`, `b`
act on raw activations)::

    mean cross-entropy + l2/2 * ||W||^2      (bias not penalised)

Binary problems fit one sigmoid direction w (as scikit-learn does), stored as the two columns
W = [-w/2, w/2], so `directions` (W[..., 1] - W[..., 0]) is w. Multi-class problems fit a
multinomial softmax. scikit-learn's LogisticRegression minimises
C * sum cross-entropy + 1/2 ||W||^2, the same problem for **C = 1 / (l2 * n_train)** (binary and
multinomial alike). Solved with optax L-BFGS (zoom line search) to `tol` on the gradient norm.

Difference of means (`kind="mean_diff"`, raw activations, no optimisation): binary direction
mean(class 1) - mean(class 0), thresholded at the midpoint of the class means; multi-class:
nearest class mean (Euclidean). Both are the linear rule W[:, c] = mu_c - m,
b_c = -m . W[:, c] - ||W[:, c]||^2 / 2 with m the mean of the class means.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jinterp import sites as S
from jinterp.train import fitted
from jinterp.train.collect import ProbeError, check_layers, collect

FITTED_KIND = "probes"
KINDS = ("logistic", "mean_diff")
_HI = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# the fitted object


@dataclasses.dataclass
class ProbeSet:
    """Probes for L layers: logits = acts @ W[l] + b[l] on raw activations.

    W [L, d, C], b [L, C], classes [C] (the label values, in column order), train_idx / test_idx
    (the split, shared by every layer), train_acc / test_acc [L], n_iter [L] (optimiser iterations;
    0 for mean_diff), meta (kind, hyperparameters, layers, data fingerprints, provenance).
    """

    kind: str
    W: np.ndarray
    b: np.ndarray
    classes: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    n_iter: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.W.shape[0])

    @property
    def layers(self) -> list:
        return list(self.meta.get("layers", range(self.n_layers)))

    @property
    def directions(self) -> np.ndarray:
        """Binary: the decision direction W[..., 1] - W[..., 0], [L, d] (for mean_diff exactly
        mean(class 1) - mean(class 0)). Multi-class: W itself, [L, d, C]."""
        return self.W[..., 1] - self.W[..., 0] if self.W.shape[-1] == 2 else self.W

    def _acts(self, acts, layer):
        a = np.asarray(acts, np.float32)
        d = self.W.shape[1]
        if layer is not None:
            if a.ndim != 2 or a.shape[1] != d:
                raise ProbeError(f"with layer=, pass activations [N, {d}]; got shape {a.shape}")
            li = self.layers.index(layer) if layer in self.layers else None
            if li is None:
                raise ProbeError(f"no probe for layer {layer!r}; probes exist for layers {self.layers}")
            return a[None], self.W[li : li + 1], self.b[li : li + 1], True
        if a.ndim == 2 and self.n_layers == 1:
            a, squeeze = a[None], True
        else:
            squeeze = False
        if a.ndim != 3 or a.shape[0] != self.n_layers or a.shape[2] != d:
            raise ProbeError(
                f"activations have shape {a.shape}; expected [{self.n_layers}, N, {d}] (one slice per probed "
                "layer), or [N, d] with layer=..."
            )
        return a, self.W, self.b, squeeze

    def logits(self, acts, layer=None) -> np.ndarray:
        """[L, N, C] (or [N, C] with layer= or a single-layer set), computed on the host."""
        a, W, b, squeeze = self._acts(acts, layer)
        z = _logits(a, W, b)
        return z[0] if squeeze else z

    def predict(self, acts, layer=None) -> np.ndarray:
        """Predicted labels (values from `classes`): [L, N], or [N] with layer=."""
        return self.classes[self.logits(acts, layer).argmax(-1)]

    def accuracy(self, acts, labels, layer=None) -> np.ndarray:
        """Fraction correct per layer, [L] (a float with layer=)."""
        y = np.asarray(labels)
        pred = self.predict(acts, layer)
        if y.shape != pred.shape[-1:]:
            raise ProbeError(f"labels have shape {y.shape}; expected one label per example, ({pred.shape[-1]},)")
        return (pred == y).mean(-1)

    def save(self, path, provenance: dict | None = None):
        """Save to the new directory `path` (orbax + fitted.json; refuses a non-empty one).
        provenance: e.g. fitted.provenance(model, site=..., tokens=...); merged into meta."""
        meta = dict(self.meta)
        meta["probe_kind"] = self.kind
        if provenance is not None:
            meta["provenance"] = {**meta.get("provenance", {}), **provenance}
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("kind", "meta")}
        return fitted.save(path, FITTED_KIND, arrays, meta)

    @classmethod
    def load(cls, path) -> "ProbeSet":
        arrays, meta = fitted.load(path, FITTED_KIND)
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        return cls(kind=meta["probe_kind"], meta=meta, **arrays)

    def __repr__(self):
        acc = ", ".join(f"{l}: {a:.3f}" for l, a in zip(self.layers, self.test_acc))
        return f"ProbeSet({self.kind}, {self.n_layers} layers, {len(self.classes)} classes, test acc {{{acc}}})"


def load(path) -> ProbeSet:
    """A ProbeSet saved by ProbeSet.save."""
    return ProbeSet.load(path)


# ---------------------------------------------------------------------------------------------
# fitting


def fit(acts, labels, *, kind: str = "logistic", test_frac: float = 0.2, seed: int = 0, l2: float = 1e-3,
        C: float | None = None, steps: int = 500, tol: float = 1e-6, standardize: bool = True,
        split=None, layers=None) -> ProbeSet:
    """Fit one probe per layer on acts [L, N, d] (or [N, d], one layer) and labels [N] (ints,
    binary or multi-class); logistic probes of all layers in one jitted, vmapped program.

    kind: "logistic" (softmax regression; binary: sigmoid) or "mean_diff" (difference of class means).
    test_frac, seed: a stratified split (every class keeps a training example); or pass
        split=(train_idx, test_idx) explicitly.
    l2: penalty l2/2 ||W||^2 on the mean training loss. C: scikit-learn's convention instead
        (l2 = 1 / (C * n_train)). standardize: fit on standardised features (logistic only;
        weights are folded back to raw activations). steps, tol: L-BFGS iteration cap and
        gradient-norm tolerance.
    layers: labels for the layers (default 0..L-1), used in messages and meta.
    """
    if kind not in KINDS:
        raise ProbeError(f"kind must be one of {KINDS}, got {kind!r}")
    a = _check_acts(acts)
    L, N, d = a.shape
    layers = list(range(L)) if layers is None else [int(l) for l in np.atleast_1d(layers)]
    if len(layers) != L:
        raise ProbeError(f"layers names {len(layers)} layers but acts have {L} (axis 0)")
    classes, y = _check_labels(labels, N)
    bad = ~np.isfinite(a).all(axis=(1, 2))
    if bad.any():
        raise ProbeError(
            f"activations at layer {layers[int(np.argmax(bad))]} contain NaN or inf; fix the run that "
            "produced them (e.g. a lower-precision dtype overflowing) before fitting"
        )
    train_idx, test_idx = _split(y, len(classes), test_frac, seed) if split is None else _check_split(split, N, y)
    n_train = len(train_idx)
    if C is not None:
        if not C > 0:
            raise ProbeError(f"C must be positive, got {C!r}")
        l2 = 1.0 / (C * n_train)
    if not l2 >= 0:
        raise ProbeError(f"l2 must be >= 0, got {l2!r}")
    if int(steps) < 1:
        raise ProbeError(f"steps must be >= 1, got {steps!r}")
    n_classes = len(classes)
    Xtr = a[:, train_idx]
    ytr = y[train_idx]
    if kind == "logistic":
        W, b, n_iter = _fit_logistic(Xtr, ytr, jnp.float32(l2), jnp.float32(tol), n_classes=n_classes,
                                     steps=int(steps), standardize=bool(standardize))
    else:
        W, b = _fit_mean_diff(Xtr, ytr, n_classes=n_classes)  # closed form, no optimiser
        n_iter = np.zeros(L, np.int32)
    W, b = np.asarray(W), np.asarray(b)
    bad = ~(np.isfinite(W).all(axis=(1, 2)) & np.isfinite(b).all(axis=1))
    if bad.any():
        raise ProbeError(
            f"the {kind} probe at layer {layers[int(np.argmax(bad))]} has non-finite weights (the fit overflowed "
            "or diverged); rescale the activations, use standardize=True, or raise l2"
        )
    pred = _logits(a, W, b).argmax(-1)  # [L, N] class indices
    correct = pred == y[None]
    meta = {
        "probe_kind": kind,
        "hyperparameters": {
            "test_frac": test_frac if split is None else None, "seed": seed, "l2": float(l2), "C_sklearn":
            (1.0 / (l2 * n_train) if l2 > 0 else None), "steps": int(steps), "tol": float(tol),
            "optimizer": "optax.lbfgs" if kind == "logistic" else None,
            "standardize": bool(standardize) if kind == "logistic" else False, "split": "given" if split is not None
            else "stratified",
        },
        "layers": layers,
        "n_examples": N, "n_train": n_train, "n_test": len(test_idx), "d": d,
        "data": {"acts": {"shape": [L, N, d], "sha256": fitted.fingerprint(a)},
                 "labels": {"shape": [N], "sha256": fitted.fingerprint(np.asarray(labels))}},
    }
    return ProbeSet(
        kind=kind, W=W, b=b, classes=classes, train_idx=train_idx, test_idx=test_idx,
        train_acc=correct[:, train_idx].mean(1, dtype=np.float32),
        test_acc=correct[:, test_idx].mean(1, dtype=np.float32),
        n_iter=np.asarray(n_iter), meta=meta,
    )


def fit_model(model, tokens, labels, *, site: str = "hook_resid_post", pos=-1, attention_mask=None, layers=None,
              batch_size: int | None = None, **kw) -> ProbeSet:
    """collect(model, tokens, site, pos, ...) then fit(acts, labels, **kw), recording in meta
    ["provenance"] the model, site, position, layers and fingerprints of the tokens and labels."""
    acts = collect(model, tokens, site, pos, attention_mask, layers=layers, batch_size=batch_size)
    lay = check_layers(model.config, layers)
    ps = fit(acts, labels, layers=lay, **kw)
    toks, mask = model.prepare_inputs(tokens, attention_mask)
    prov: dict[str, Any] = {
        "site": S.resolve_local(model.config, site),
        "pos": pos if isinstance(pos, (int, str)) else np.asarray(pos),
        "layers": lay,
        "tokens": np.asarray(toks),
        "labels": np.asarray(labels),
    }
    if mask is not None:
        prov["attention_mask"] = np.asarray(mask)
    ps.meta["provenance"] = fitted.provenance(model, **prov)
    return ps


# ---- validation


def _check_acts(acts) -> np.ndarray:
    """float32 [L, N, d] on the host (checks, the split and accuracies run there; the fit on device)."""
    try:
        a = np.asarray(acts)
    except (TypeError, ValueError) as e:
        raise ProbeError(f"activations must be a numeric array [L, N, d] or [N, d]: {e}") from e
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) and a.dtype != jnp.bfloat16:
        raise ProbeError(f"activations must be numeric, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ProbeError(f"activations must be [L, N, d] (or [N, d] for one layer), got shape {a.shape}")
    if 0 in a.shape:
        raise ProbeError(f"activations are empty (shape {a.shape})")
    return a.astype(np.float32, copy=False)


def _check_labels(labels, N: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes [C], class index per example [N])."""
    y = np.asarray(labels)
    if y.ndim != 1:
        hint = "; for one-hot labels pass labels.argmax(-1)" if y.ndim == 2 else ""
        raise ProbeError(f"labels must be 1-D class ids, one per example, shape ({N},); got shape {y.shape}{hint}")
    if len(y) != N:
        raise ProbeError(
            f"labels have {len(y)} entries but the activations have {N} examples (axis 1 of [L, N, d]); "
            "pass one label per example"
        )
    if y.dtype == bool:
        y = y.astype(np.int32)
    if not np.issubdtype(y.dtype, np.integer):
        raise ProbeError(f"labels must be integer class ids (or bools), got dtype {y.dtype}; map them to ints first")
    classes, idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ProbeError(
            f"labels hold a single class ({classes.tolist()}); a probe needs examples of at least two classes"
        )
    return classes, idx.astype(np.int32)


def _split(y: np.ndarray, n_classes: int, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified: about test_frac of each class to test, at least one example of each class to train."""
    if not 0 < test_frac < 1:
        raise ProbeError(
            f"test_frac={test_frac!r} leaves no {'test' if test_frac <= 0 else 'training'} examples; "
            "choose 0 < test_frac < 1 (e.g. 0.2)"
        )
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(int(round(test_frac * len(idx))), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(test) == 0:
        raise ProbeError(
            f"test_frac={test_frac} of {len(y)} examples leaves no test examples; raise test_frac or pass more examples"
        )
    return train, test


def _check_split(split, N: int, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        tr, te = (np.asarray(s) for s in split)
    except (TypeError, ValueError) as e:
        raise ProbeError("split must be a pair (train_idx, test_idx) of int arrays") from e
    for name, s in (("train", tr), ("test", te)):
        if s.ndim != 1 or len(s) == 0 or not np.issubdtype(s.dtype, np.integer):
            raise ProbeError(f"split's {name} indices must be a non-empty 1-D int array, got {s!r}")
        if (s < 0).any() or (s >= N).any():
            raise ProbeError(f"split's {name} indices must lie in 0..{N - 1}")
    if np.intersect1d(tr, te).size:
        raise ProbeError("split's train and test indices overlap; the test set must be held out")
    if len(np.unique(y[tr])) < 2:
        raise ProbeError("split's training examples hold a single class; a probe needs at least two")
    return np.sort(tr), np.sort(te)


# ---- the compiled fits (vmapped over the layer axis)


def _logits(a, W, b):
    """[L, N, d] @ [L, d, C] + [L, C], float32 on the host."""
    return np.matmul(a, W) + b[:, None, :]


def _logistic_one(X, y, l2, tol, *, n_classes: int, steps: int, standardize: bool):
    """One layer: X [n, d] (train rows), y [n] class indices -> (W [d, C], b [C], iterations)."""
    d = X.shape[1]
    if standardize:
        mu = X.mean(0)
        sd = X.std(0)
        sd = jnp.where(sd > 1e-12 * (1.0 + jnp.abs(mu)), sd, 1.0)  # constant features stay as they are
    else:
        mu, sd = jnp.zeros(d, X.dtype), jnp.ones(d, X.dtype)
    Z = (X - mu) / sd
    n_out = 1 if n_classes == 2 else n_classes

    def loss(p):
        z = jnp.dot(Z, p["W"], precision=_HI) + p["b"]
        if n_out == 1:  # binary: sigmoid cross-entropy, as scikit-learn's binary problem
            ce = jax.nn.softplus(z[:, 0]) - y * z[:, 0]
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
        return ce.mean() + 0.5 * l2 * jnp.sum(p["W"] ** 2)

    p0 = {"W": jnp.zeros((d, n_out), X.dtype), "b": jnp.zeros((n_out,), X.dtype)}
    opt = optax.lbfgs()  # zoom line search (a plain backtracking search stalls short of tol in float32)
    vg = optax.value_and_grad_from_state(loss)

    def body(carry):
        p, s = carry
        v, g = vg(p, state=s)
        u, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss)
        return optax.apply_updates(p, u), s

    def cond(carry):
        _, s = carry
        k = optax.tree_utils.tree_get(s, "count")
        g = optax.tree_utils.tree_get(s, "grad")
        return (k == 0) | ((k < steps) & (optax.tree_utils.tree_norm(g) >= tol))

    p, s = jax.lax.while_loop(cond, body, (p0, opt.init(p0)))
    W, b = p["W"], p["b"]
    if n_out == 1:  # two columns whose difference is the sigmoid's logit
        W = jnp.concatenate([-W / 2, W / 2], axis=1)
        b = jnp.concatenate([-b / 2, b / 2])
    W_raw = W / sd[:, None]
    b_raw = b - jnp.dot(mu / sd, W, precision=_HI)
    return W_raw, b_raw, optax.tree_utils.tree_get(s, "count")


@functools.partial(jax.jit, static_argnames=("n_classes", "steps", "standardize"))
def _fit_logistic(X, y, l2, tol, *, n_classes: int, steps: int, standardize: bool):
    one = functools.partial(_logistic_one, n_classes=n_classes, steps=steps, standardize=standardize)
    return jax.vmap(one, in_axes=(0, None, None, None))(X, y, l2, tol)


def _fit_mean_diff(X, y, *, n_classes: int):
    """All layers at once on the host: X [L, n, d], y [n] -> (W [L, d, C], b [L, C]), float32 like the
    activations (an overflowing class sum gives inf, which fit() reports)."""
    onehot = np.eye(n_classes, dtype=np.float32)[y]  # [n, C]
    with np.errstate(over="ignore", invalid="ignore"):
        means = np.matmul(onehot.T, X) / onehot.sum(0)[:, None]  # [L, C, d]
        m = means.mean(1, keepdims=True)
        W = np.swapaxes(means - m, 1, 2)  # [L, d, C]
        b = -np.matmul(m, W)[:, 0] - 0.5 * (W**2).sum(1)
    return W, b
