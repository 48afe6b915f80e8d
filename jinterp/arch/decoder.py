"""The generic decoder: one block for every family, written as pure functions over a parameter pytree.

Parameters: TransformerLens names stacked on a leading layer axis (see arch/params.py). This
module is internal to arch/: `forward.py` assembles its pieces into the public entry points.

Every activation passes through a named site (`Ctx.site`), where edits apply and requested
values are recorded. Layers run under `lax.scan`; a traced `start` skips layers below it with
`lax.cond`, and attention reads keys/values from a buffer covering every column, so the same
code serves a plain forward, KV-cached decoding, and partial re-runs that begin at a layer and
a position (the sweep engine's "compute only what changes").
"""

from __future__ import annotations

import copy
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jinterp.arch import moe
from jinterp.arch.packing import packed
from jinterp.config import Config, rope_attention_factor, rope_inv_freq

F32 = jnp.float32


class Ctx:
    """Per-call context: config, edits grouped by site, what to record, and the sequence geometry.

    `seen`, when a list, collects every site name the decoder passes through (site discovery)."""

    def __init__(self, cfg: Config, edits=(), record=None, *, n_prompt=0, n_keys=0, pos_ids=None, key_valid=None, seen=None):
        self.cfg = cfg
        self.edits = tuple(edits)
        self.by_site: dict[str, list] = {}
        for e in self.edits:
            self.by_site.setdefault(e.site, []).append(e)
        self.record = dict(record or {})  # local name -> layers tuple (block sites) or None (global)
        self.n_prompt = n_prompt
        self.n_keys = n_keys
        self.pos_ids = pos_ids  # [B, n_keys] position id of every column
        self.key_valid = key_valid  # [B, n_keys] bool: column holds a real token
        self.windows = jnp.asarray(cfg.layer_windows)
        self.prec = lax.Precision.HIGHEST if cfg.matmul_precision == "highest" else None
        self.seen = seen
        # packing (arch.resume_cells): under a vmap over cells, `pack` [cells, rows] (static) marks the rows
        # the projections compute; `live` [rows] is this cell's row of it (traced)
        self.pack = None
        self.live = None

    def wants(self, name):
        return name in self.by_site or name in self.record or self.seen is not None

    def site(self, name, x, layer, cols, acts):
        if self.seen is not None:
            self.seen.append((name, layer is None))
        for e in self.by_site.get(name, ()):
            x = e.apply(x, layer=layer, cols=cols, n_prompt=self.n_prompt, n_keys=self.n_keys, n_layers=self.cfg.n_layers)
        if name in self.record:
            acts[name] = x
        return x

    def ein(self, spec, a, b):
        return jnp.einsum(spec, a, b, precision=self.prec)

    def dense(self, spec, x, w):
        """A projection of x [B, S, ...] by weights w: only the live rows when packing (`packed`)."""
        if self.pack is None:
            return self.ein(spec, x, w)
        return packed(lambda x, w: self.ein(spec, x, w), x, w, self.pack)

    def narrow(self, sel):
        """This context for the rows `sel` (static indices) of the current ones."""
        if sel is None or self.pack is None:
            return self
        out = copy.copy(self)
        out.pack, out.live = self.pack[:, sel], self.live[sel]
        return out


# ----------------------------------------------------------------------------------------
# pieces


def activation(name: str, x):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return x * jax.nn.sigmoid(x)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unsupported activation {name!r}")


def norm(ctx: Ctx, p, x, name, layer, cols, acts):
    """LayerNorm / RMSNorm in fp32, with TransformerLens's hook_scale (the divisor) and hook_normalized
    (as in TransformerLens: before the weight and bias, (x - mean) / scale or x / rms, in fp32; an edit
    there goes on through w and b). What the sublayer reads (after w, b) is attn.hook_in / mlp.hook_in."""
    cfg = ctx.cfg
    xf = x.astype(F32)
    if cfg.norm == "layernorm":
        xf = xf - xf.mean(-1, keepdims=True)
    scale = jnp.sqrt((xf * xf).mean(-1, keepdims=True) + cfg.norm_eps)
    scale = ctx.site(f"{name}.hook_scale", scale, layer, cols, acts)
    y = xf / scale
    if name in ("ln1", "ln2", "ln_final"):
        y = ctx.site(f"{name}.hook_normalized", y, layer, cols, acts).astype(F32)
    y = y * p["w"].astype(F32)
    if "b" in p:
        y = y + p["b"].astype(F32)
    return y.astype(x.dtype)


def _rms_heads(x, w, eps, scope="head"):
    """QK-norm on x [B, S, heads, dh]: RMSNorm over each head's dims ("head", w [dh]) or over all heads
    at once ("all", w [heads, dh])."""
    xf = x.astype(F32)
    axes = (-1,) if scope == "head" else (-2, -1)
    xf = xf * lax.rsqrt((xf * xf).mean(axes, keepdims=True) + eps)
    return (w.astype(F32) * xf).astype(x.dtype)


def rotate(cfg: Config, x, pos, seq=None, local=None):
    """Rotary embedding on the first rotary_dim dims of each head (HF rotate_half convention, or
    GPT-J's rotate_every_two when cfg.rotary_interleaved).

    x: [B, S, heads, dh]; pos: [B, S] position ids; seq: [B] each row's sequence length so far, for the
    scalings decided per call (longrope's long factors, dynamic's grown base; see _rope_seq_lens); None:
    the static frequencies (longrope's short set); local: traced bool, this layer is a sliding-window one
    and rotates with cfg.local_rope_theta / local_rope_scaling (read only when local_rope_theta is set).
    """
    inv = jnp.asarray(rope_inv_freq(cfg))[None]  # [1, rd/2]
    if seq is not None:
        inv = _per_call_inv_freq(cfg, seq, inv)  # [B, rd/2]
    factor = rope_attention_factor(cfg)
    if cfg.local_rope_theta is not None and local is not None:
        inv = jnp.where(local, jnp.asarray(rope_inv_freq(cfg, local=True))[None], inv)
        f_local = rope_attention_factor(cfg, local=True)
        if f_local != factor:
            factor = jnp.where(local, jnp.float32(f_local), jnp.float32(factor))
    ang = pos.astype(F32)[..., None] * inv[:, None, :]  # [B, S, rd/2]
    if cfg.rotary_interleaved:
        ang = jnp.repeat(ang, 2, axis=-1)[:, :, None, :]
    else:
        ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if not (isinstance(factor, float) and factor == 1.0):
        cos, sin = cos * factor, sin * factor
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    rd = cfg.rotary_dim
    xr, xp = x[..., :rd], x[..., rd:]
    if cfg.rotary_interleaved:
        rot = jnp.stack([-xr[..., 1::2], xr[..., ::2]], -1).reshape(xr.shape)
    else:
        half = rd // 2
        rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], -1)
    return jnp.concatenate([xr * cos + rot * sin, xp], -1)


def _per_call_inv_freq(cfg: Config, seq, inv):
    """[B, rd/2] frequencies of rows whose sequences are seq [B] long: past original_max_position_embeddings,
    longrope's long set, or dynamic's, computed as transformers' _compute_dynamic_ntk_parameters does with
    seq_len = largest position + 1 (in float32, as there); within it, the static set inv [1, rd/2]."""
    s = dict(cfg.rope_scaling)
    orig = s["original_max_position_embeddings"]
    if s["rope_type"] == "longrope":
        return jnp.where((seq > orig)[:, None], jnp.asarray(rope_inv_freq(cfg, long=True)), inv)
    dim, factor = cfg.rotary_base_dim or cfg.rotary_dim, s["factor"]
    n = jnp.maximum(seq, orig).astype(F32)
    base = jnp.float32(cfg.rope_theta) * ((factor * n / orig) - (factor - 1)) ** (dim / (dim - 2))
    shape = jnp.asarray(np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    return jnp.where((seq > orig)[:, None], 1.0 / (base[:, None] ** shape[None]), inv)


def _rope_seq_lens(ctx: Ctx, cols):
    """[B] each row's sequence length so far (real tokens up to the last of the columns `cols` being
    computed), for the rotary scalings transformers decides per call from the largest position id: longrope
    (long factors past original_max_position_embeddings; its Phi-3 generation recomputes the cache once a
    sequence outgrows the limit, as arch.generate does) and dynamic (the base grows with the length; cached
    keys keep the base they were rotated with, as in transformers' generation). Deciding per row gives each
    sequence of a padded batch what transformers gives it alone. None for the other scalings."""
    if dict(ctx.cfg.rope_scaling).get("rope_type") not in ("longrope", "dynamic"):
        return None
    upto = ctx.key_valid & (jnp.arange(ctx.key_valid.shape[1]) <= cols[-1])[None]
    return jnp.max(jnp.where(upto, ctx.pos_ids, -1), axis=1) + 1


def attention(ctx: Ctx, p, h, layer, cols, qsel, kv, acts):
    """Self-attention for the rows `cols` of h; kv = (K, V) buffers over all columns or None.

    Returns (attn_out [B, Sq, D], updated kv or None).
    """
    cfg = ctx.cfg
    h = ctx.site("attn.hook_in", h, layer, cols, acts)
    B, S, _ = h.shape
    hq = h if qsel is None else h[:, qsel]
    qcols = cols if qsel is None else cols[qsel]
    cq = ctx.narrow(qsel)  # the query rows' context
    q = cq.dense("bsd,hde->bshe", hq, p["W_Q"]) + p["b_Q"]
    k = ctx.dense("bsd,hde->bshe", h, p["W_K"]) + p["b_K"]
    v = ctx.dense("bsd,hde->bshe", h, p["W_V"]) + p["b_V"]
    q = ctx.site("attn.hook_q", q, layer, qcols, acts)
    k = ctx.site("attn.hook_k", k, layer, cols, acts)
    v = ctx.site("attn.hook_v", v, layer, cols, acts)
    if cfg.qk_norm:
        q = _rms_heads(q, p["q_norm"]["w"], cfg.norm_eps, cfg.qk_norm_scope)
        k = _rms_heads(k, p["k_norm"]["w"], cfg.norm_eps, cfg.qk_norm_scope)
    if cfg.positional == "rotary":
        seq = _rope_seq_lens(ctx, cols)
        local = ctx.windows[layer] > 0
        q = ctx.site("attn.hook_rot_q", rotate(cfg, q, jnp.take(ctx.pos_ids, qcols, axis=1), seq, local), layer, qcols, acts)
        k = ctx.site("attn.hook_rot_k", rotate(cfg, k, jnp.take(ctx.pos_ids, cols, axis=1), seq, local), layer, cols, acts)
    if kv is None:
        keys, vals, kcols = k, v, cols
    else:
        if ctx.live is not None:  # rows left out of the projections keep the buffer's (the base run's) keys
            live = ctx.live[None, :, None, None]
            k = jnp.where(live, k, lax.dynamic_slice_in_dim(kv[0], cols[0], S, axis=1).astype(k.dtype))
            v = jnp.where(live, v, lax.dynamic_slice_in_dim(kv[1], cols[0], S, axis=1).astype(v.dtype))
        keys = lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), cols[0], axis=1)
        vals = lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), cols[0], axis=1)
        kv = (keys, vals)
        kcols = jnp.arange(keys.shape[1])
    T = keys.shape[1]
    Sq = q.shape[1]
    Hkv, G = cfg.n_kv_heads, cfg.group_size
    qg = q.reshape(B, Sq, Hkv, G, cfg.d_head)
    if cfg.attn_upcast:  # GPT-2's reorder_and_upcast_attn: scores and softmax in float32
        qg, keys = qg.astype(F32), keys.astype(F32)
    scale = jnp.asarray(cfg.scale, qg.dtype)
    if cfg.attn_scale_inverse_layer:  # GPT-2's scale_attn_by_inverse_layer_idx, in Python floats as transformers
        scale = jnp.asarray(cfg.scale / np.arange(1, cfg.n_layers + 1), qg.dtype)[layer]
    scores = ctx.ein("bqkgd,btkd->bkgqt", qg, keys).reshape(B, cfg.n_heads, Sq, T) * scale
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    valid = ctx.key_valid if kv is not None else jnp.take(ctx.key_valid, cols, axis=1)
    w = ctx.windows[layer]
    diff = qcols[:, None] - kcols[None, :]
    allowed = (diff >= 0) & ((w == 0) | (diff < w))
    allowed = allowed[None, None] & valid[:, None, None, :]
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    scores = ctx.site("attn.hook_attn_scores", scores, layer, qcols, acts)
    pattern = jax.nn.softmax(scores.astype(F32), axis=-1).astype(q.dtype)
    pattern = ctx.site("attn.hook_pattern", pattern, layer, qcols, acts)
    z = ctx.ein("bkgqt,btkd->bqkgd", pattern.reshape(B, Hkv, G, Sq, T), vals).reshape(B, Sq, cfg.n_heads, cfg.d_head)
    return attn_output(cq, p, z, layer, qcols, acts), kv


def attn_output(ctx: Ctx, p, z, layer, cols, acts):
    """z [B, S, H, dh] (site attn.hook_z) -> the attention block's output [B, S, D]."""
    z = ctx.site("attn.hook_z", z, layer, cols, acts)
    if ctx.wants("attn.hook_result"):
        result = ctx.dense("bqhe,hed->bqhd", z, p["W_O"])
        result = ctx.site("attn.hook_result", result, layer, cols, acts)
        return result.sum(2) + p["b_O"]
    return ctx.dense("bqhe,hed->bqd", z, p["W_O"]) + p["b_O"]


def mlp(ctx: Ctx, p, h, layer, cols, acts):
    cfg = ctx.cfg
    h = ctx.site("mlp.hook_in", h, layer, cols, acts)
    if cfg.mlp == "moe":
        return moe.mlp(ctx, p, h, layer, cols, acts, activation)
    inner = ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")
    if ctx.pack is not None and not any(ctx.wants(n) for n in inner):  # nothing to see inside: pack it whole
        plain = Ctx(cfg)
        return packed(lambda h, p: mlp(plain, p, h, layer, cols, {}), h, p, ctx.pack)
    gated = cfg.mlp == "gated"
    pre = ctx.dense("bsd,df->bsf", h, p["W_gate" if gated else "W_in"]) + p["b_gate" if gated else "b_in"]
    pre = ctx.site("mlp.hook_pre", pre, layer, cols, acts)
    post = activation(cfg.act, pre)
    if gated:
        lin = ctx.dense("bsd,df->bsf", h, p["W_in"]) + p["b_in"]
        lin = ctx.site("mlp.hook_pre_linear", lin, layer, cols, acts)
        post = post * lin
    post = ctx.site("mlp.hook_post", post, layer, cols, acts)
    return ctx.dense("bsf,fd->bsd", post, p["W_out"]) + p["b_out"]


def block(ctx: Ctx, p, x, layer, cols, kv=None, qsel=None, z=None):
    """One decoder block on rows `cols` of the residual. qsel: static indices of rows whose outputs
    are needed. z: given, the block resumes from these attention mixes (site attn.hook_z on) instead of
    recomputing attention; the caller guarantees no edit targets an earlier site of this block."""
    acts: dict[str, Any] = {}
    if z is None:
        x = ctx.site("hook_resid_pre", x, layer, cols, acts)
        h = _pre_norm(ctx, p, "ln1", x, layer, cols, acts)
        a, kv = attention(ctx, p["attn"], h, layer, cols, qsel, kv, acts)
        if qsel is not None:
            x, cols = x[:, qsel], cols[qsel]
            h = h[:, qsel]
            ctx = ctx.narrow(qsel)
    else:
        a = attn_output(ctx, p["attn"], z, layer, cols, acts)
        # resuming from z: the shared norm's output is recomputed (with no edit before attn.hook_z it is the same)
        h = _pre_norm(ctx, p, "ln1", x, layer, cols, {}) if ctx.cfg.shared_norm else None
    return _after_attention(ctx, p, x, a, layer, cols, acts, h), kv, acts


def _pre_norm(ctx: Ctx, p, name, x, layer, cols, acts):
    """The norm a sublayer reads the residual through (the residual itself without pre-norms)."""
    return norm(ctx, p[name], x, name, layer, cols, acts) if ctx.cfg.pre_norms else x


def _after_attention(ctx: Ctx, p, x, a, layer, cols, acts, h1=None):
    """h1: ln1's output at rows `cols`, which the MLP reads under cfg.shared_norm."""
    cfg = ctx.cfg
    if cfg.post_norms:
        a = norm(ctx, p["ln1_post"], a, "ln1_post", layer, cols, acts)
    a = ctx.site("hook_attn_out", a, layer, cols, acts)
    if cfg.parallel_residual:
        h2 = h1 if cfg.shared_norm else _pre_norm(ctx, p, "ln2", x, layer, cols, acts)
        m = mlp(ctx, p["mlp"], h2, layer, cols, acts)
        if cfg.post_norms:
            m = norm(ctx, p["ln2_post"], m, "ln2_post", layer, cols, acts)
        m = ctx.site("hook_mlp_out", m, layer, cols, acts)
        x = (m + a) + x
    else:
        x = ctx.site("hook_resid_mid", x + a, layer, cols, acts)
        m = mlp(ctx, p["mlp"], _pre_norm(ctx, p, "ln2", x, layer, cols, acts), layer, cols, acts)
        if cfg.post_norms:
            m = norm(ctx, p["ln2_post"], m, "ln2_post", layer, cols, acts)
        m = ctx.site("hook_mlp_out", m, layer, cols, acts)
        x = x + m
    return ctx.site("hook_resid_post", x, layer, cols, acts)


# ----------------------------------------------------------------------------------------
# the layer stack


def run_stack(ctx: Ctx, blocks, x, cols, *, kv=None, start=None, final_qsel=None, want_kv=False, resume_z=None):
    """Run every block under lax.scan.

    x: [B, S, D] residual for columns `cols` [S] (contiguous). kv: (K, V) stacked [L, B, T, Hkv, dh]
    holding keys/values for every column (a decoding cache, or a base run's keys for columns
    before the window), or None when cols covers the whole sequence. start: traced layer index;
    blocks below it are skipped (x must then be the residual entering block `start`), and touch
    no weights. final_qsel: static row indices; the last block computes outputs only for those rows.
    resume_z: [L, B, S, H, dh] attention mixes of a base run; block `start` (if not the last) then
    resumes from them rather than recomputing attention (valid when no edit at that block targets a
    site before attn.hook_z).

    Returns (x_out, kv_out or None, acts) where acts maps each recorded local site name to an
    array stacked over its requested layers.
    """
    cfg = ctx.cfg
    L = cfg.n_layers
    block_rec = {n: ls for n, ls in ctx.record.items() if ls is not None}
    if final_qsel is not None and block_rec:
        raise ValueError("recording block activations needs every row of the last block (final_qsel=None)")
    if want_kv and (start is not None or final_qsel is not None):
        raise ValueError("want_kv (decoding) runs every block on every row: no start or final_qsel")
    n_scan = L - 1 if final_qsel is not None else L
    at = lambda tree, i: jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)

    def layer_fn(x, i):
        # weights are sliced here, inside the branch that runs, so skipped layers read none
        x, kv_l, acts = block(ctx, at(blocks, i), x, i, cols, None if kv is None else at(kv, i))
        return x, (kv_l if want_kv else None), acts

    # shapes of one layer's recorded activations, for record buffers and the skip branch
    probe = jax.eval_shape(layer_fn, x, jnp.int32(0))
    full = {n for n, ls in block_rec.items() if len(ls) == L}
    part = {n: ls for n, ls in block_rec.items() if len(ls) < L}
    slots = {n: np.full(L, -1, np.int32) for n in part}
    for n, ls in part.items():
        slots[n][list(ls)] = np.arange(len(ls))
    bufs0 = {n: jnp.zeros((len(ls),) + probe[2][n].shape, probe[2][n].dtype) for n, ls in part.items()}

    def body(carry, i):
        x, bufs = carry
        if start is None:
            x2, kv2, acts = layer_fn(x, i)
        else:
            skip = lambda x: (x, None, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), probe[2]))
            if resume_z is None:
                x2, kv2, acts = lax.cond(i >= start, lambda x: layer_fn(x, i), skip, x)
            else:
                def from_z(x):
                    x, _, acts = block(ctx, at(blocks, i), x, i, cols, z=at(resume_z, i))
                    return x, None, acts

                branch = (i >= start).astype(jnp.int32) + (i > start).astype(jnp.int32)
                x2, kv2, acts = lax.switch(branch, [skip, from_z, lambda x: layer_fn(x, i)], x)
        new_bufs = {}
        for n, buf in bufs.items():
            slot = jnp.asarray(slots[n])[i]
            s = jnp.maximum(slot, 0)
            new_bufs[n] = buf.at[s].set(jnp.where(slot >= 0, acts[n], buf[s]))
        return (x2, new_bufs), ({n: acts[n] for n in full}, kv2)

    (x, bufs), (ys, kv_out) = lax.scan(body, (x, bufs0), jnp.arange(n_scan))
    if final_qsel is not None:
        kv_last = None if kv is None else at(kv, L - 1)
        x, _, _ = block(ctx, at(blocks, L - 1), x, L - 1, cols, kv_last, qsel=np.asarray(final_qsel))
    acts = dict(ys)
    acts.update(bufs)
    return x, kv_out, acts


def embed(ctx: Ctx, params, tokens, cols, acts):
    cfg = ctx.cfg
    x = jnp.take(params["embed"]["W_E"], tokens, axis=0)
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    x = ctx.site("hook_embed", x, None, cols, acts)
    if cfg.positional == "learned":
        pe = jnp.take(params["pos_embed"]["W_pos"], jnp.take(ctx.pos_ids, cols, axis=1), axis=0)
        pe = ctx.site("hook_pos_embed", pe, None, cols, acts)
        x = x + pe
    return x


def final(ctx: Ctx, params, x, cols, acts, vocab=None):
    """Final norm and unembedding; vocab: static token ids to compute logits for (default all)."""
    cfg = ctx.cfg
    x = norm(ctx, params["ln_final"], x, "ln_final", None, cols, acts)
    W_U, b_U = params["unembed"]["W_U"], params["unembed"]["b_U"]
    if vocab is not None:
        W_U, b_U = W_U[:, np.asarray(vocab)], b_U[np.asarray(vocab)]
    logits = ctx.ein("bsd,dv->bsv", x, W_U) + b_U
    if cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits
