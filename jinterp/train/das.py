"""Distributed alignment search: learn the subspace of an activation that carries a causal variable.

DAS (Geiger et al. 2023) learns an orthogonal rotation R of a site's activation space such that
interchanging the first k rotated coordinates between a *base* run and a *source* run makes the
model give the *counterfactual* label (what the base would say if the variable took the
source's value). With B = R[:, :k] (orthonormal columns) the patched activation is

    h' = h_b + ((h_s - h_b) B) B^T            = edits.subspace_patch(site, h_s, B)

and the loss is the cross-entropy of the patched logits (at `label_pos`) against the label.
Only B enters, so we parametrise B directly: an unconstrained W [d, k] mapped to the Q factor of
its QR decomposition (sign-fixed, so the map is smooth) — a QR retraction. Full DAS (a d x d
rotation, first k interchanged) and pyvene's low-rank DAS compute the same function class; the
[d, k] form costs d*k, which is what wide sites (mlp.hook_post) need.

Boundless DAS (Wu et al. 2023) learns the dimension as well: a rotation Q [d, m] (m = max_k,
default d) and a boundary b in (0, 1]; coordinate i is interchanged with weight
mask_i = sigmoid((b m - i - 1/2) / T), the temperature T annealed linearly from 50 to 0.1
(pyvene's schedule), plus `boundary_weight * b` in the loss so the subspace stays small. Since
((h_s - h_b) Q) diag(mask) Q^T = ((h_s - h_b) Q') Q'^T with Q' = Q diag(sqrt(mask)), the soft
interchange is the same subspace-patch edit. After training, coordinates with mask > 1/2 at
T -> 0 (i < b m - 1/2; at least one) are kept and k is their number.

Many fits at once: `layers` x `pos` are fitted together, one compiled program. Each (layer,
position) is a cell of `arch.resume_cells`: a cell at layer l re-runs only layers >= l, at
positions >= the first patched position, from one unedited base run, and every cell's loss is
differentiated in the same backward pass (the cells share no parameters, so this is the same as
fitting them one by one).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jinterp import arch
from jinterp import edits as E
from jinterp import sites as S
from jinterp.train import fitted

T_START, T_END = 50.0, 0.1  # Boundless DAS temperature schedule (pyvene's)


class DASError(ValueError):
    """Bad input to a DAS fit, or a fit that diverged."""


@dataclasses.dataclass
class DASFit:
    """What `fit` learned. Cells are (layer, position) pairs in increasing layer order.

    basis [n, d, k_max]: cell i's subspace is basis[i][:, :k[i]] (orthonormal columns);
    loss [steps, n] the training curve; train_acc / test_acc [n] interchange accuracy (argmax of
    the patched logits == label) on the training and held-out pairs; full_acc [n] the held-out
    accuracy of patching the whole activation; base_acc the held-out rate at which the unpatched
    model already gives the label; boundary [n] (Boundless) the learned boundaries."""

    site: str
    layers: tuple
    pos: tuple
    basis: np.ndarray
    k: np.ndarray
    loss: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    full_acc: np.ndarray
    base_acc: float
    boundary: np.ndarray | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def cell(self, layer: int, pos: int | None = None) -> int:
        """Index of the cell at `layer` (and `pos`, when several positions were fitted)."""
        hits = [i for i, (l, p) in enumerate(zip(self.layers, self.pos)) if l == layer and (pos is None or p == pos)]
        if len(hits) != 1:
            raise DASError(f"no single cell at layer {layer}" + (f", position {pos}" if pos is not None else "")
                           + f"; fitted cells are {list(zip(self.layers, self.pos))}")
        return hits[0]

    def subspace(self, i: int) -> np.ndarray:
        """Cell i's basis [d, k], orthonormal columns."""
        return self.basis[i][:, : int(self.k[i])]

    def edit(self, i: int, value) -> E.Edit:
        """The subspace patch of cell i, writing `value` (the source activation, e.g. [batch, pos, d])."""
        return E.subspace_patch(self.site, value, self.subspace(i), layers=self.layers[i], pos=self.pos[i])

    def table(self):
        """One row per cell: layer, pos, k, train/test interchange accuracy, full-patch accuracy."""
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "pos": self.pos, "k": self.k, "train_acc": self.train_acc,
                             "test_acc": self.test_acc, "full_patch_acc": self.full_acc})

    def save(self, path):
        arrays = {"basis": self.basis, "k": self.k, "loss": self.loss, "train_acc": self.train_acc,
                  "test_acc": self.test_acc, "full_acc": self.full_acc}
        if self.boundary is not None:
            arrays["boundary"] = self.boundary
        meta = dict(self.meta, site=self.site, layers=list(self.layers), pos=list(self.pos), base_acc=self.base_acc)
        return fitted.save(path, "das", arrays, meta)

    @classmethod
    def load(cls, path) -> "DASFit":
        a, meta = fitted.load(path, "das")
        meta = dict(meta)
        site, layers, pos, base_acc = meta.pop("site"), tuple(meta.pop("layers")), tuple(meta.pop("pos")), meta.pop("base_acc")
        np_ = {k: np.asarray(v) for k, v in a.items()}
        return cls(site, layers, pos, np_["basis"], np_["k"], np_["loss"], np_["train_acc"], np_["test_acc"],
                   np_["full_acc"], base_acc, np_.get("boundary"), meta)


# ----------------------------------------------------------------------------------------
# validation


def _site(site: str) -> tuple[str, str]:
    """Local site name and its feature axis; only [batch, pos, features] sites are fitted."""
    split = S.split_name(site)
    if split:
        raise DASError(f"give the site without its layer ({split[1]!r}) and the layers with layers=")
    local = S.ALIASES.get(site, site)
    if local not in S.BLOCK_SITES:
        raise DASError(f"unknown block site {site!r}." + S.suggest(site, list(S.BLOCK_SITES) + list(S.ALIASES)))
    lay = S.layout(local)
    if len(lay) != 3 or lay[:2] != ("batch", "pos") or lay[2] == "one":
        ok = [n for n, l in S.BLOCK_SITES.items() if len(l) == 3 and l[:2] == ("batch", "pos") and l[2] != "one"]
        raise DASError(f"DAS fits sites laid out [batch, pos, features]; {local} is {list(lay)}. Use one of {ok}")
    return local, lay[2]


def _tokens(model, x, name):
    a = np.asarray(x)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise DASError(f"{name} must be integer token ids [n_pairs, seq], got {a.dtype} {a.shape}")
    model.prepare_inputs(a)  # vocabulary and context checks
    return a.astype(np.int32)


def _positions(pos, P, name) -> tuple[int, ...]:
    ps = np.atleast_1d(np.asarray(pos))
    if ps.ndim != 1 or not np.issubdtype(ps.dtype, np.integer):
        raise DASError(f"{name} must be an int or a list of ints (one position shared by every pair), got {pos!r}")
    bad = [int(p) for p in ps if not -P <= p < P]
    if bad:
        raise DASError(f"{name} {bad} outside the prompts' {P} positions")
    return tuple(int(p) % P for p in ps)


def _check_finite(arr, what):
    a = np.asarray(arr)
    if not np.isfinite(a).all():
        raise DASError(f"{what} contain NaN or inf")


# ----------------------------------------------------------------------------------------
# the compiled pieces


def orthonormal(W):
    """QR retraction: the Q factor of W [d, k] with sign(diag R) folded in (unique and smooth)."""
    q, r = jnp.linalg.qr(W)
    return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]


def boundary_mask(b, m: int, temperature):
    """Soft interchange weights over the m rotated coordinates for boundary b in (0, 1]."""
    i = jnp.arange(m)
    return jax.nn.sigmoid((jnp.clip(b, 1e-3, 1.0) * m - i - 0.5) / temperature)


def hard_k(b, m: int) -> np.ndarray:
    """Number of coordinates kept at T -> 0 (at least 1)."""
    b = np.clip(np.asarray(b, np.float64), 1e-3, 1.0)
    return np.maximum(1, np.ceil(b * m - 0.5).astype(np.int32))


def _source_acts(params, cfg, site, tokens, mask, layers, src_pos):
    """Source activations at each cell: [n_cells, B, d]."""
    uniq = tuple(sorted(set(layers)))
    _, acts = arch.forward(params, tokens, mask, (), cfg=cfg, record={site: uniq})
    a = acts[site]  # [len(uniq), B, P, d]
    slot = np.asarray([uniq.index(l) for l in layers])
    return a[slot, :, np.asarray(src_pos)]  # [n, B, d]


def _cell_logits(params, cfg, site, feat, base, src, bases, layers, pos, label_pos):
    """Patched logits at label_pos for every cell: [n, B, V]. bases [n, d, k] (None: patch the
    whole activation); cells sorted by layer."""
    L = cfg.n_layers
    first = min(layers)
    counts = tuple(layers.count(l) for l in range(first, L))
    cells = {"i": jnp.arange(len(layers)), "layer": jnp.asarray(layers, jnp.int32), "pos": jnp.asarray(pos, jnp.int32),
             **({} if bases is None else {"basis": bases})}

    def make_edits(c):
        v = E.Value(src[c["i"]], ("batch", feat))
        op = E.Set(v) if bases is None else E.Project(v, c["basis"])  # no basis: the full activation
        return [E.edit(site, op, layers=c["layer"], pos=c["pos"])]

    rows = arch.resume_cells(params, cfg, base, make_edits, cells, counts, first, min(pos), positions=(label_pos,))
    return rows[:, :, 0].astype(jnp.float32)


def _ce(logits, labels):
    """Mean cross-entropy per cell: logits [n, B, V], labels [B] -> [n]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels[None, :]).mean(-1)


@functools.lru_cache(maxsize=16)
def _make_step(cfg, site, feat, layers, pos, src_pos, label_pos, boundless, m, boundary_weight):
    """One jitted Adam step for these cells; learning rates and temperature are traced, so fits
    that differ only in them (or in steps) share the compiled program."""
    opt = optax.scale_by_adam()

    def bases_of(p, temperature):
        q = jax.vmap(orthonormal)(p["W"])
        if boundless:
            q = q * jnp.sqrt(jax.vmap(lambda b: boundary_mask(b, m, temperature))(p["b"]))[:, None, :]
        return q

    def loss_fn(p, params, base, src, labels, temperature):
        logits = _cell_logits(params, cfg, site, feat, base, src, bases_of(p, temperature), layers, pos, label_pos)
        per_cell = _ce(logits, labels)
        if boundless:
            per_cell = per_cell + boundary_weight * jnp.clip(p["b"], 1e-3, 1.0)
        return per_cell.sum(), per_cell

    @jax.jit
    def step(p, state, params, base_tokens, base_mask, src_tokens, src_mask, labels, temperature, lrs):
        base = arch.base_run(params, base_tokens, base_mask, cfg=cfg)
        src = _source_acts(params, cfg, site, src_tokens, src_mask, layers, src_pos)
        (_, per_cell), g = jax.value_and_grad(loss_fn, has_aux=True)(p, params, base, src, labels, temperature)
        updates, state = opt.update(g, state, p)
        p = {name: p[name] - lrs[name] * updates[name] for name in p}
        return p, state, per_cell

    step.init = opt.init
    return step


def patched_logits(model, base_tokens, source_tokens, bases, *, site: str, layers, pos, source_pos=None,
                   label_pos: int = -1, attention_mask=None, source_mask=None, batch_size: int = 64):
    """Logits at label_pos [n, N, V] with each cell's subspace patched from the source run.

    bases [n, d, k] (orthonormal columns; None patches the whole activation), one per cell; layers
    and pos are per cell (sequences of length n, cells in increasing layer order). For directions
    found any way (DAS, gradients, mean differences, their rowspace/nullspace parts)."""
    local, feat = _site(site)
    cfg = model.config
    bt, st = _tokens(model, base_tokens, "base_tokens"), _tokens(model, source_tokens, "source_tokens")
    layers, pos = tuple(int(l) for l in layers), tuple(int(p) % bt.shape[1] for p in pos)
    src_pos = pos if source_pos is None else tuple(int(p) % st.shape[1] for p in source_pos)
    if sorted(layers) != list(layers):
        raise DASError("cells must be in increasing layer order")
    if bases is not None:
        bases = jnp.asarray(bases, jnp.float32)
        if bases.ndim != 3 or bases.shape[0] != len(layers):
            raise DASError(f"bases must be [n_cells, d, k] with one basis per cell ({len(layers)}), got {bases.shape}")
    fn = _eval_fn(cfg, local, feat, layers, pos, src_pos, label_pos % bt.shape[1])
    out, N = [], len(bt)
    for s in range(0, N, batch_size):  # every chunk padded to batch_size rows: one compiled program
        idx = np.minimum(np.arange(s, s + batch_size), N - 1)
        bm = None if attention_mask is None else jnp.asarray(np.asarray(attention_mask)[idx], bool)
        sm = None if source_mask is None else jnp.asarray(np.asarray(source_mask)[idx], bool)
        out.append(np.asarray(fn(model.params, bt[idx], bm, st[idx], sm, bases))[:, : min(batch_size, N - s)])
    return np.concatenate(out, axis=1)


@functools.lru_cache(maxsize=32)
def _eval_fn(cfg, site, feat, layers, pos, src_pos, label_pos):
    @jax.jit
    def fn(params, base_tokens, base_mask, src_tokens, src_mask, bases):
        base = arch.base_run(params, base_tokens, base_mask, cfg=cfg)
        src = _source_acts(params, cfg, site, src_tokens, src_mask, layers, src_pos)
        return _cell_logits(params, cfg, site, feat, base, src, bases, layers, pos, label_pos)

    return fn


def fit(model, base_tokens, source_tokens, labels, *, site: str = "hook_resid_post", layers=None, pos=-1, k: int = 1,
        source_pos=None, label_pos: int = -1, boundless: bool = False, max_k: int | None = None,
        boundary_weight: float = 1.0, boundary_lr: float = 1e-2, steps: int = 200, lr: float = 1e-2,
        batch_size: int = 64, test_frac: float = 0.2, eval_data=None, seed: int = 0, attention_mask=None,
        source_mask=None, progress: bool = True) -> DASFit:
    """Fit DAS at `site` for every (layer, position) in layers x pos at once.

    base_tokens, source_tokens [N, P] int token ids (pairs row by row); labels [N] the token the
    patched model should give at `label_pos` (the counterfactual answer). layers: an int, a list, or
    None (every layer). pos: the patched position(s), shared by all pairs (prompts aligned by
    template); source_pos: the source positions read, per entry of pos (default: pos). k: the
    subspace dimension; boundless=True learns it (up to max_k, default the site width).
    Adam at lr, decaying linearly to lr/10; minibatches of batch_size pairs. Held-out pairs:
    eval_data=(base, source, labels) or else a random test_frac of the pairs (seed).
    Raises DASError on bad input, and when the loss becomes NaN (naming the step and cell)."""
    local, feat = _site(site)
    cfg = model.config
    bt, st = _tokens(model, base_tokens, "base_tokens"), _tokens(model, source_tokens, "source_tokens")
    N, P = bt.shape
    if len(st) != N:
        raise DASError(f"base_tokens has {N} rows but source_tokens has {len(st)}; they are pairs, row by row")
    lab = np.asarray(labels)
    if lab.shape != (N,) or not np.issubdtype(lab.dtype, np.integer):
        raise DASError(f"labels must be one token id per pair, int [{N}], got {lab.dtype} {lab.shape}")
    if ((lab < 0) | (lab >= cfg.d_vocab)).any():
        raise DASError(f"labels must be token ids in 0..{cfg.d_vocab - 1}")
    width = {"d_model": cfg.d_model, "d_mlp": cfg.d_mlp}[feat]
    m = (width if max_k is None else int(max_k)) if boundless else int(k)
    if not 1 <= m <= width:
        raise DASError(f"{'max_k' if boundless else 'k'}={m} but {local} has width {width}: choose 1..{width}")
    L = cfg.n_layers
    lays = tuple(range(L)) if layers is None else tuple(int(l) for l in np.atleast_1d(layers))
    bad = [l for l in lays if not -L <= l < L]
    if bad:
        raise DASError(f"layers {bad} out of range for a model with {L} layers")
    lays = tuple(sorted({l % L for l in lays}))
    ps = _positions(pos, P, "pos")
    sps = ps if source_pos is None else _positions(source_pos, st.shape[1], "source_pos")
    if len(sps) != len(ps):
        raise DASError(f"source_pos has {len(sps)} entries but pos has {len(ps)}; give one source position per position")
    cells = list(itertools.product(lays, range(len(ps))))
    c_layers = tuple(l for l, _ in cells)
    c_pos, c_src = tuple(ps[j] for _, j in cells), tuple(sps[j] for _, j in cells)
    lp = int(label_pos) % P
    if lp < max(c_pos):
        raise DASError(f"label_pos {lp} comes before a patched position ({max(c_pos)}); the patch could not reach it")
    n = len(cells)

    bm = None if attention_mask is None else np.asarray(attention_mask, bool)
    sm = None if source_mask is None else np.asarray(source_mask, bool)
    data = {"bt": bt, "st": st, "lab": lab.astype(np.int32), "bm": bm, "sm": sm}
    rng = np.random.default_rng(seed)
    if eval_data is not None:
        eb, es, el = eval_data
        test = {"bt": _tokens(model, eb, "eval base"), "st": _tokens(model, es, "eval source"),
                "lab": np.asarray(el, np.int32), "bm": None, "sm": None}
        if test["lab"].shape != (len(test["bt"]),):
            raise DASError("eval_data labels must be one token id per eval pair")
        train = data
    else:
        n_test = int(round(test_frac * N))
        if not 1 <= n_test < N:
            raise DASError(f"test_frac={test_frac} of {N} pairs leaves {n_test} test and {N - n_test} training pairs; "
                           "need at least one of each (or pass eval_data)")
        perm = rng.permutation(N)
        take = lambda idx: {key: None if v is None else v[idx] for key, v in data.items()}
        train, test = take(perm[n_test:]), take(perm[:n_test])

    key = jax.random.PRNGKey(seed)  # each cell's start depends on its (layer, position) only
    p = {"W": jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, l), c_pos[i]), (width, m)) / np.sqrt(width)
                         for i, l in enumerate(c_layers)])}
    decay = optax.linear_schedule(lr, lr * 0.1, max(1, steps))
    if boundless:
        p["b"] = jnp.full((n,), 0.5, jnp.float32)
    step = _make_step(cfg, local, feat, c_layers, c_pos, c_src, lp, boundless, m, float(boundary_weight))
    state = step.init(p)

    n_train = len(train["bt"])
    bs = min(int(batch_size), n_train)
    order, at = rng.permutation(n_train), 0
    losses = []
    it = range(int(steps))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"DAS {local} x {n} cells", leave=False)
    temps = np.linspace(T_START, T_END, max(1, steps))
    for s in it:
        if at + bs > n_train:
            order, at = rng.permutation(n_train), 0
        idx = order[at: at + bs]
        at += bs
        get = lambda key: None if train[key] is None else jnp.asarray(train[key][idx])
        p, state, per_cell = step(p, state, model.params, get("bt"), get("bm"), get("st"), get("sm"), get("lab"),
                                  jnp.float32(temps[s]), {"W": jnp.float32(decay(s)), "b": jnp.float32(boundary_lr)})
        losses.append(per_cell)
        if (s + 1) % 25 == 0 or s + 1 == steps:
            _check_losses(losses, local, cells, ps)

    loss = np.stack([np.asarray(x) for x in losses]) if losses else np.zeros((0, n), np.float32)
    Q = np.asarray(jax.vmap(orthonormal)(p["W"]))
    if boundless:
        boundary = np.asarray(p["b"])
        kk = hard_k(boundary, m)
    else:
        boundary, kk = None, np.full(n, m, np.int32)
    Q = Q * (np.arange(m)[None, None, :] < kk[:, None, None])  # columns past k are zero: not patched
    if not np.isfinite(Q).all():
        raise DASError(f"the fitted basis at {local} is not finite; lower lr")

    ev = lambda d, bases: patched_logits(model, d["bt"], d["st"], bases, site=local, layers=c_layers, pos=c_pos,
                                         source_pos=c_src, label_pos=lp, attention_mask=d["bm"], source_mask=d["sm"])
    acc = lambda logits, d: (logits.argmax(-1) == d["lab"][None]).mean(-1)
    train_acc, test_acc = acc(ev(train, Q), train), acc(ev(test, Q), test)
    full_acc = acc(ev(test, None), test)
    base_logits = np.asarray(model(test["bt"], test["bm"], logits_at=lp))[:, 0]
    base_acc = float((base_logits.argmax(-1) == test["lab"]).mean())
    meta = fitted.provenance(model, site=local, base_tokens=bt, source_tokens=st, labels=lab)
    meta.update(k=int(k) if not boundless else None, boundless=bool(boundless), max_k=m if boundless else None,
                steps=int(steps), lr=float(lr), batch_size=bs, seed=int(seed), label_pos=lp,
                source_pos=list(c_src), n_train=n_train, n_test=len(test["bt"]))
    return DASFit(local, c_layers, c_pos, Q, kk, loss, train_acc, test_acc, full_acc, base_acc, boundary, meta)


def _check_losses(losses, site, cells, ps):
    recent = np.stack([np.asarray(x) for x in losses])
    bad = ~np.isfinite(recent)
    if bad.any():
        s, i = np.argwhere(bad)[0]
        l, j = cells[i]
        raise DASError(f"DAS loss became {recent[s, i]} at step {s} for {site} at layer {l}, position {ps[j]}; "
                       "lower lr, or check the inputs for extreme activations")
