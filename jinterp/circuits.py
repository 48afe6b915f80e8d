"""Weight-space circuit analysis, vectorised over every head.

Row-vector convention (TransformerLens): a head reads x (a residual row vector) and writes
x OV, OV = W_V W_O; its attention score between a query residual x_q and a key residual x_k is
x_q QK x_k^T, QK = W_Q W_K^T. Both are d_model x d_model of rank <= d_head, so they are kept
factored (`FactoredMatrix`) and every norm, SVD and composition score is computed from
d_head x d_head cores, never a d_model x d_model product unless `.AB` asks for it.

`fold_ln=True` (the default, like TransformerLens's from_pretrained) folds the reading norm's
weight into the reading matrices (W_Q, W_K, W_V of layer l are preceded by ln1 of layer l) and,
for LayerNorm models, centres both sides over d_model as TransformerLens's fold_ln and
center_writing_weights do: what heads write (W_O's output) and what they read (the rows of
W_Q/W_K/W_V), since a LayerNorm's output has no component along the all-ones direction. Biases
and Gemma 2's post-attention norms are left out. Composition scores are NaN (TransformerLens: 0)
for pairs whose writer is not in an earlier layer; SVDs return Vh (TransformerLens returns V).

Grouped-query models: W_K and W_V are shared by the query heads of a group; OV and QK are
per query head, with the group's key/value weights.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jinterp import arch
from jinterp.results import Labelled, axis_labels
from jax import lax

# ----------------------------------------------------------------------------------------
# factored matrices


@struct.dataclass
class FactoredMatrix:
    """The product A @ B with batch dimensions: A [..., m, r], B [..., r, n], kept lazy."""

    A: jax.Array
    B: jax.Array

    @property
    def shape(self):
        return tuple(self.A.shape[:-1]) + (self.B.shape[-1],)

    @property
    def rank_bound(self) -> int:
        return self.A.shape[-1]

    @property
    def AB(self):
        """The full product [..., m, n] (materialised)."""
        return self.A @ self.B

    @property
    def BA(self):
        """B @ A [..., r, r]: same non-zero eigenvalues as AB (square only)."""
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(jnp.swapaxes(self.B, -1, -2), jnp.swapaxes(self.A, -1, -2))

    def __getitem__(self, idx) -> "FactoredMatrix":
        """Index the batch dimensions: ov[3], ov[3, 5], ov[:, 0]."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        return FactoredMatrix(self.A[idx], self.B[idx])

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):  # (A B)(C D) = A (B C D), rank <= r
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other):
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar):
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def svd(self):
        """(U [..., m, r], S [..., r], Vh [..., r, n]) with AB = U diag(S) Vh, via QR of the factors."""
        qa, ra = jnp.linalg.qr(self.A)
        qb, rb = jnp.linalg.qr(jnp.swapaxes(self.B, -1, -2))
        uc, s, vhc = jnp.linalg.svd(ra @ jnp.swapaxes(rb, -1, -2))
        return qa @ uc, s, vhc @ jnp.swapaxes(qb, -1, -2)

    @property
    def S(self):
        return self.svd()[1]

    def norm(self):
        """Frobenius norm [...]: sqrt(tr((A^T A)(B B^T)))."""
        ga = jnp.swapaxes(self.A, -1, -2) @ self.A
        gb = self.B @ jnp.swapaxes(self.B, -1, -2)
        return jnp.sqrt(jnp.maximum(jnp.einsum("...ij,...ji->...", ga, gb), 0.0))

    def eigenvalues(self):
        """Eigenvalues of the square product, from the r x r matrix BA (complex; CPU only in JAX)."""
        return jnp.linalg.eigvals(self.BA)

    def collapse_l(self):
        """diag(S) Vh [..., r, n]: the product with its left singular basis absorbed."""
        _, s, vh = self.svd()
        return s[..., :, None] * vh

    def collapse_r(self):
        """U diag(S) [..., m, r]."""
        u, s, _ = self.svd()
        return u * s[..., None, :]


# ----------------------------------------------------------------------------------------
# the head matrices


def _expand_kv(w, cfg):
    """[L, Hkv, ...] -> [L, H, ...] (query head h uses key/value head h // group)."""
    return jnp.repeat(w, cfg.group_size, axis=1) if cfg.group_size > 1 else w


@dataclasses.dataclass(frozen=True)
class HeadWeights:
    """Reading and writing weights of every head, [L, H, ...], with norms folded as configured."""

    W_Q: jax.Array  # [L, H, D, dh]
    W_K: jax.Array
    W_V: jax.Array
    W_O: jax.Array  # [L, H, dh, D]


def head_weights(model, fold_ln: bool = True) -> HeadWeights:
    cfg = model.config
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    Wq, Wk, Wv, Wo = f32(model.W_Q), _expand_kv(f32(model.W_K), cfg), _expand_kv(f32(model.W_V), cfg), f32(model.W_O)
    if fold_ln and cfg.pre_norms:  # no norm reads the residual before attention (OLMo 2): nothing to fold
        w = f32(model.ln1_w)[:, None, :, None]  # [L, 1, D, 1]
        Wq, Wk, Wv = Wq * w, Wk * w, Wv * w
        if cfg.norm == "layernorm":
            Wq, Wk, Wv = (x - x.mean(-2, keepdims=True) for x in (Wq, Wk, Wv))
            Wo = Wo - Wo.mean(-1, keepdims=True)
    return HeadWeights(Wq, Wk, Wv, Wo)


def OV(model, fold_ln: bool = True) -> FactoredMatrix:
    """Every head's OV circuit, FactoredMatrix [L, H, D, D] = W_V @ W_O."""
    hw = head_weights(model, fold_ln)
    return FactoredMatrix(hw.W_V, hw.W_O)


def QK(model, fold_ln: bool = True) -> FactoredMatrix:
    """Every head's QK circuit, FactoredMatrix [L, H, D, D] = W_Q @ W_K^T (without the 1/sqrt(d_head) scale)."""
    hw = head_weights(model, fold_ln)
    return FactoredMatrix(hw.W_Q, jnp.swapaxes(hw.W_K, -1, -2))


def svd(model, kind: str = "OV", fold_ln: bool = True):
    """(U, S, Vh) of every head's OV or QK in one vectorised call: [L, H, D, dh], [L, H, dh], [L, H, dh, D]."""
    fm = {"OV": OV, "QK": QK}[kind.upper()](model, fold_ln)
    return _svd(fm.A, fm.B)


@jax.jit
def _svd(A, B):
    return FactoredMatrix(A, B).svd()


def svd_tokens(model, layer: int, head: int, kind: str = "OV", n_vectors: int = 5, k: int = 10, fold_ln: bool = True) -> list[dict]:
    """Read a head's top singular directions out as tokens (TransformerLens's SVDInterpreter).

    OV: each output direction (a row of Vh) through the unembedding (with the final norm's weight
    folded in, as TransformerLens's W_U is after fold_ln). QK: each query-side
    direction (a column of U) and key-side direction (a row of Vh) through the embedding W_E.
    Singular vectors have no sign, so both ends are listed. Returns one dict per direction.
    """
    cfg = model.config
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise ValueError(f"head L{layer}H{head} out of range ({cfg.n_layers} layers x {cfg.n_heads} heads)")
    u, s, vh = (np.asarray(x[layer, head]) for x in svd(model, kind, fold_ln))
    strs = _vocab_strings(model)

    def read(vecs, through):
        logits = vecs @ through  # [n, V]
        out = []
        for row in logits:
            order = np.argsort(row)
            out.append(dict(top=[(strs[i], float(row[i])) for i in order[::-1][:k]], bottom=[(strs[i], float(row[i])) for i in order[:k]]))
        return out

    n = min(n_vectors, len(s))
    if kind.upper() == "OV":  # through the effective unembedding: the final norm's weight folded in
        W_U = np.asarray(model.ln_final_w, np.float32)[:, None] * np.asarray(model.W_U, np.float32)
        reads = read(vh[:n], W_U)
        return [dict(component=i, singular_value=float(s[i]), **reads[i]) for i in range(n)]
    WE = np.asarray(model.W_E, np.float32).T
    q, kk = read(u[:, :n].T, WE), read(vh[:n], WE)
    return [dict(component=i, singular_value=float(s[i]), query=q[i], key=kk[i]) for i in range(n)]


def _vocab_strings(model):
    tok = model.tokenizer
    if tok is None:
        return [str(i) for i in range(model.config.d_vocab)]
    return [tok.decode([i]) for i in range(model.config.d_vocab)]


# ----------------------------------------------------------------------------------------
# composition scores


def _reader_factors(hw: HeadWeights, kind: str):
    """Reader matrix M = P @ R for each head: (P [L, H, D, dh], R^T Gram [L, H, dh, dh])."""
    kind = kind.upper()
    if kind == "Q":  # writer output enters the query: OV_w @ QK_r, QK = W_Q W_K^T
        P, R = hw.W_Q, hw.W_K
        return P, jnp.swapaxes(R, -1, -2) @ R
    if kind == "K":  # ... the key: OV_w @ QK_r^T = OV_w W_K W_Q^T
        P, R = hw.W_K, hw.W_Q
        return P, jnp.swapaxes(R, -1, -2) @ R
    if kind == "V":  # ... the value: OV_w @ OV_r = OV_w W_V W_O
        return hw.W_V, hw.W_O @ jnp.swapaxes(hw.W_O, -1, -2)
    raise ValueError(f"kind must be 'Q', 'K' or 'V', got {kind!r}")


def composition_scores(model, kind: str, fold_ln: bool = True) -> Labelled:
    """Labelled [writer_layer, writer_head, reader_layer, reader_head]: score of writer (l1, h1) into reader (l2, h2),

        ||OV_w M_r||_F / (||OV_w||_F ||M_r||_F),   M = QK (kind "Q"), QK^T ("K"), OV ("V"),

    for every pair at once (NaN where the writer is not in an earlier layer than the reader).
    Computed from d_head x d_head Gram matrices: ||V C R||_F^2 = tr(G_V C G_R C^T).
    """
    cfg = model.config
    hw = head_weights(model, fold_ln)
    P, GR = _reader_factors(hw, kind)
    GV = jnp.swapaxes(hw.W_V, -1, -2) @ hw.W_V  # [L, H, dh, dh]
    GO = hw.W_O @ jnp.swapaxes(hw.W_O, -1, -2)
    ov_norm = jnp.sqrt(jnp.einsum("lhij,lhji->lh", GV, GO))
    GP = jnp.swapaxes(P, -1, -2) @ P
    m_norm = jnp.sqrt(jnp.einsum("lhij,lhji->lh", GP, GR))

    def per_writer_layer(args):
        gv, wo = args  # [H, dh, dh], [H, dh, D]
        C = jnp.einsum("wad,lrdb->wlrab", wo, P)  # [H, L, H, dh, dh]
        M = jnp.einsum("wxa,wlrab,lrby->wlrxy", gv, C, GR)
        return jnp.einsum("wlrxy,wlrxy->wlr", M, C)

    num2 = lax.map(per_writer_layer, (GV, hw.W_O))  # [L, H, L, H]
    scores = jnp.sqrt(jnp.maximum(num2, 0.0)) / (ov_norm[:, :, None, None] * m_norm[None, None])
    L = cfg.n_layers
    later = np.arange(L)[:, None] < np.arange(L)[None, :]
    out = np.asarray(jnp.where(jnp.asarray(later)[:, None, :, None], scores, jnp.nan))
    lh = (axis_labels(model, "layer"), axis_labels(model, "head"))
    return Labelled(out, ("writer_layer", "writer_head", "reader_layer", "reader_head"), lh + lh, name=f"{kind.upper()}-composition")


def component_composition(model, kind: str, fold_ln: bool = True) -> Labelled:
    """Per singular component of each writer's OV (Talking Heads, methods.md section 2):
    Labelled [writer_layer, writer_head, component, reader_layer, reader_head], the score of component r of writer (l1, h1) into reader (l2, h2),

        CS_r = ||v_r M||_2 / ||M||_F,   OV_w = sum_r s_r u_r v_r^T,

    (the component writes along v_r, a row of Vh). NaN where the writer is not earlier.
    """
    cfg = model.config
    hw = head_weights(model, fold_ln)
    _, s, vh = FactoredMatrix(hw.W_V, hw.W_O).svd()  # vh [L, H, dh, D]
    P, GR = _reader_factors(hw, kind)
    GP = jnp.swapaxes(P, -1, -2) @ P
    m_norm = jnp.sqrt(jnp.einsum("lhij,lhji->lh", GP, GR))

    def per_writer_layer(v):  # v [H, dh, D]
        y = jnp.einsum("hrd,mkda->hrmka", v, P)  # v_r P: [H, dh, L, H, dh]
        return jnp.einsum("hrmka,mkab,hrmkb->hrmk", y, GR, y)

    sq = lax.map(per_writer_layer, vh)  # [L, H, dh, L, H]
    scores = jnp.sqrt(jnp.maximum(sq, 0.0)) / m_norm[None, None, None]
    L = cfg.n_layers
    later = np.arange(L)[:, None] < np.arange(L)[None, :]
    out = np.asarray(jnp.where(jnp.asarray(later)[:, None, None, :, None], scores, jnp.nan))
    lh = (axis_labels(model, "layer"), axis_labels(model, "head"))
    comp = tuple(f"C{r}" for r in range(out.shape[2]))
    return Labelled(out, ("writer_layer", "writer_head", "component", "reader_layer", "reader_head"), lh + (comp,) + lh,
                    name=f"{kind.upper()}-composition per component")


def channels(model, kinds: Sequence[str] = ("Q", "K", "V"), top: int = 10, fold_ln: bool = True):
    """The strongest communication channels: (writer head, its OV component, reader head, kind)
    ranked by the per-component composition score. Returns a pandas DataFrame."""
    import pandas as pd

    rows = []
    _, s, _ = svd(model, "OV", fold_ln)
    s = np.asarray(s)
    for kind in kinds:
        cs = np.asarray(component_composition(model, kind, fold_ln))
        flat = np.nan_to_num(cs, nan=-np.inf).reshape(-1)
        for f in np.argsort(flat)[::-1][:top]:
            l1, h1, r, l2, h2 = np.unravel_index(f, cs.shape)
            rows.append(dict(kind=kind, writer=f"L{l1}H{h1}", component=int(r), singular_value=float(s[l1, h1, r]),
                             reader=f"L{l2}H{h2}", score=float(cs[l1, h1, r, l2, h2])))
    df = pd.DataFrame(rows)
    return df.sort_values("score", ascending=False).reset_index(drop=True).head(top * len(kinds))


# ----------------------------------------------------------------------------------------
# weight edits (return new parameter pytrees)


def _set_head(params, name, layer, head, value):
    w = arch.weight(params, name)
    return arch.replace_weight(params, name, w.at[layer, head].set(value.astype(w.dtype)))


def rescale_components(model, layer: int, head: int, components, factor=0.0, kind: str = "OV", fold_ln: bool = True) -> dict:
    """New parameters in which the chosen singular components of a head's OV (or QK) are
    multiplied by `factor` (0 removes them); every other component is unchanged.

    OV = sum_r s_r u_r v_r^T: W_O <- W_O (I + (f - 1) sum_r v_r v_r^T), a projection of the head's
    output, so the OV product changes exactly as asked and W_V (shared across a GQA group) is
    untouched. QK = sum_r s_r u_r v_r^T: W_Q <- (I + (f - 1) sum_r u'_r u'_r^T) W_Q, on the query side
    (per head even under GQA). With fold_ln the components are those of the folded matrices, and the
    projection is mapped back through the norm weight. Repeated components count once; indices
    must be below d_head.
    """
    cfg = model.config
    comps = np.unique(np.atleast_1d(np.asarray(components)))
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise ValueError(f"head L{layer}H{head} out of range ({cfg.n_layers} layers x {cfg.n_heads} heads)")
    if comps.size == 0 or comps.min() < 0 or comps.max() >= cfg.d_head:
        raise ValueError(f"components must be in 0..{cfg.d_head - 1} (a head's OV/QK has rank <= d_head), got {components}")
    f = jnp.asarray(factor, jnp.float32)
    hw = head_weights(model, fold_ln)
    if kind.upper() == "OV":
        _, _, vh = FactoredMatrix(hw.W_V[layer, head], hw.W_O[layer, head]).svd()
        v = vh[comps]  # [k, D] output directions
        W_O = jnp.asarray(model.W_O[layer, head], jnp.float32)
        # W_O (I + (f-1) v^T v): only the chosen output directions change
        new = W_O + (f - 1.0) * (W_O @ v.T) @ v
        return _set_head(model.params, "W_O", layer, head, new)
    if kind.upper() == "QK":
        u, _, _ = FactoredMatrix(hw.W_Q[layer, head], hw.W_K[layer, head].T).svd()
        uc = u[:, comps]  # [D, k] query-side directions of the folded QK
        W_Q = jnp.asarray(model.W_Q[layer, head], jnp.float32)
        w = jnp.asarray(model.ln1_w[layer], jnp.float32) if fold_ln and cfg.pre_norms else jnp.ones(cfg.d_model)
        # folded: diag(w) W_Q -> (I + (f-1) u u^T) diag(w) W_Q; unfold: W_Q' = diag(1/w) (...)
        Wf = w[:, None] * W_Q
        new = (Wf + (f - 1.0) * uc @ (uc.T @ Wf)) / w[:, None]
        return _set_head(model.params, "W_Q", layer, head, new)
    raise ValueError(f"kind must be 'OV' or 'QK', got {kind!r}")


def remove_components(model, layer: int, head: int, components, kind: str = "OV", fold_ln: bool = True) -> dict:
    return rescale_components(model, layer, head, components, 0.0, kind, fold_ln)


def zero_head(model, layer: int, head: int) -> dict:
    """New parameters in which head (layer, head) writes nothing (its W_O is zero)."""
    W_O = model.W_O
    return _set_head(model.params, "W_O", layer, head, jnp.zeros_like(W_O[layer, head]))
