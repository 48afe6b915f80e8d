"""The generic decoder: one block for every family, written as pure functions over a parameter pytree.

Parameters (TransformerLens names, stacked on a leading layer axis):

    embed.W_E [V, D]            pos_embed.W_pos [n_ctx, D]           (learned positions only)
    blocks.ln1.{w,b} [L, D]     blocks.ln2.{w,b}                     (b only for LayerNorm)
    blocks.ln1_post.w, blocks.ln2_post.w                             (post-norms, Gemma 2)
    blocks.attn.W_Q [L, H, D, dh]     b_Q [L, H, dh]
    blocks.attn.W_K [L, Hkv, D, dh]   b_K [L, Hkv, dh]   W_V, b_V likewise
    blocks.attn.W_O [L, H, dh, D]     b_O [L, D]
    blocks.attn.q_norm.w, k_norm.w [L, dh]                           (QK-norm, Qwen3)
    blocks.mlp.W_in [L, D, F]  b_in [L, F]  W_gate, b_gate (gated)  W_out [L, F, D]  b_out [L, D]
    ln_final.{w,b} [D]          unembed.W_U [D, V]   unembed.b_U [V]

Every activation passes through a named site (`Ctx.site`), where edits apply and requested
values are recorded. Layers run under `lax.scan`; a traced `start` skips layers below it with
`lax.cond`, and attention reads keys/values from a buffer covering every column, so the same
code serves a plain forward, KV-cached decoding, and partial re-runs that begin at a layer and
a position (the sweep engine's "compute only what changes").
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jinterp import edits as E
from jinterp.config import Config, rope_inv_freq

F32 = jnp.float32


class Ctx:
    """Per-call context: config, edits grouped by site, what to record, and the sequence geometry."""

    def __init__(self, cfg: Config, edits=(), record=None, *, n_prompt, n_keys, pos_ids, key_valid):
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

    def wants(self, name):
        return name in self.by_site or name in self.record

    def site(self, name, x, layer, cols, acts):
        for e in self.by_site.get(name, ()):
            x = E.apply(e, x, layer=layer, cols=cols, n_prompt=self.n_prompt, n_keys=self.n_keys, n_layers=self.cfg.n_layers)
        if name in self.record:
            acts[name] = x
        return x

    def ein(self, spec, a, b):
        return jnp.einsum(spec, a, b, precision=self.prec)


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
    """LayerNorm / RMSNorm in fp32, with TransformerLens's hook_scale (the divisor) and hook_normalized."""
    cfg = ctx.cfg
    xf = x.astype(F32)
    if cfg.norm == "layernorm":
        xf = xf - xf.mean(-1, keepdims=True)
    scale = jnp.sqrt((xf * xf).mean(-1, keepdims=True) + cfg.norm_eps)
    scale = ctx.site(f"{name}.hook_scale", scale, layer, cols, acts)
    y = xf / scale * p["w"].astype(F32)
    if "b" in p:
        y = y + p["b"].astype(F32)
    y = y.astype(x.dtype)
    if name in ("ln1", "ln2", "ln_final"):
        y = ctx.site(f"{name}.hook_normalized", y, layer, cols, acts)
    return y


def _rms_heads(x, w, eps):
    xf = x.astype(F32)
    xf = xf * lax.rsqrt((xf * xf).mean(-1, keepdims=True) + eps)
    return (w.astype(F32) * xf).astype(x.dtype)


def rotate(cfg: Config, x, pos):
    """Rotary embedding on the first rotary_dim dims of each head (HF rotate_half convention).

    x: [B, S, heads, dh]; pos: [B, S] position ids.
    """
    inv = jnp.asarray(rope_inv_freq(cfg))
    ang = pos.astype(F32)[..., None] * inv  # [B, S, rd/2]
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
    rd = cfg.rotary_dim
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], -1)
    return jnp.concatenate([xr * cos + rot * sin, xp], -1)


def attention(ctx: Ctx, p, h, layer, cols, qsel, kv, acts):
    """Self-attention for the rows `cols` of h; kv = (K, V) buffers over all columns or None.

    Returns (attn_out [B, Sq, D], updated kv or None).
    """
    cfg = ctx.cfg
    B, S, _ = h.shape
    hq = h if qsel is None else h[:, qsel]
    qcols = cols if qsel is None else cols[qsel]
    q = ctx.ein("bsd,hde->bshe", hq, p["W_Q"]) + p["b_Q"]
    k = ctx.ein("bsd,hde->bshe", h, p["W_K"]) + p["b_K"]
    v = ctx.ein("bsd,hde->bshe", h, p["W_V"]) + p["b_V"]
    q = ctx.site("attn.hook_q", q, layer, qcols, acts)
    k = ctx.site("attn.hook_k", k, layer, cols, acts)
    v = ctx.site("attn.hook_v", v, layer, cols, acts)
    if cfg.qk_norm:
        q = _rms_heads(q, p["q_norm"]["w"], cfg.norm_eps)
        k = _rms_heads(k, p["k_norm"]["w"], cfg.norm_eps)
    if cfg.positional == "rotary":
        q = ctx.site("attn.hook_rot_q", rotate(cfg, q, jnp.take(ctx.pos_ids, qcols, axis=1)), layer, qcols, acts)
        k = ctx.site("attn.hook_rot_k", rotate(cfg, k, jnp.take(ctx.pos_ids, cols, axis=1)), layer, cols, acts)
    if kv is None:
        keys, vals, kcols = k, v, cols
    else:
        keys = lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), cols[0], axis=1)
        vals = lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), cols[0], axis=1)
        kv = (keys, vals)
        kcols = jnp.arange(keys.shape[1])
    T = keys.shape[1]
    Sq = q.shape[1]
    Hkv, G = cfg.n_kv_heads, cfg.group_size
    qg = q.reshape(B, Sq, Hkv, G, cfg.d_head)
    scores = ctx.ein("bqkgd,btkd->bkgqt", qg, keys).reshape(B, cfg.n_heads, Sq, T) * jnp.asarray(cfg.scale, q.dtype)
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
    return attn_output(ctx, p, z, layer, qcols, acts), kv


def attn_output(ctx: Ctx, p, z, layer, cols, acts):
    """z [B, S, H, dh] (site attn.hook_z) -> the attention block's output [B, S, D]."""
    z = ctx.site("attn.hook_z", z, layer, cols, acts)
    if ctx.wants("attn.hook_result"):
        result = ctx.ein("bqhe,hed->bqhd", z, p["W_O"])
        result = ctx.site("attn.hook_result", result, layer, cols, acts)
        return result.sum(2) + p["b_O"]
    return ctx.ein("bqhe,hed->bqd", z, p["W_O"]) + p["b_O"]


def mlp(ctx: Ctx, p, h, layer, cols, acts):
    cfg = ctx.cfg
    pre_w = "W_gate" if cfg.gated_mlp else "W_in"
    pre = ctx.ein("bsd,df->bsf", h, p[pre_w]) + p["b_gate" if cfg.gated_mlp else "b_in"]
    pre = ctx.site("mlp.hook_pre", pre, layer, cols, acts)
    post = activation(cfg.act, pre)
    if cfg.gated_mlp:
        lin = ctx.ein("bsd,df->bsf", h, p["W_in"]) + p["b_in"]
        lin = ctx.site("mlp.hook_pre_linear", lin, layer, cols, acts)
        post = post * lin
    post = ctx.site("mlp.hook_post", post, layer, cols, acts)
    return ctx.ein("bsf,fd->bsd", post, p["W_out"]) + p["b_out"]


def block(ctx: Ctx, p, x, layer, cols, kv=None, qsel=None, z=None):
    """One decoder block on rows `cols` of the residual. qsel: static indices of rows whose outputs
    are needed. z: given, the block resumes from these attention mixes (site attn.hook_z on) instead of
    recomputing attention; the caller guarantees no edit targets an earlier site of this block."""
    acts: dict[str, Any] = {}
    if z is None:
        x = ctx.site("hook_resid_pre", x, layer, cols, acts)
        a, kv = attention(ctx, p["attn"], norm(ctx, p["ln1"], x, "ln1", layer, cols, acts), layer, cols, qsel, kv, acts)
        if qsel is not None:
            x, cols = x[:, qsel], cols[qsel]
    else:
        a = attn_output(ctx, p["attn"], z, layer, cols, acts)
    return _after_attention(ctx, p, x, a, layer, cols, acts), kv, acts


def _after_attention(ctx: Ctx, p, x, a, layer, cols, acts):
    cfg = ctx.cfg
    if cfg.post_norms:
        a = norm(ctx, p["ln1_post"], a, "ln1_post", layer, cols, acts)
    a = ctx.site("hook_attn_out", a, layer, cols, acts)
    if cfg.parallel_residual:
        m = mlp(ctx, p["mlp"], norm(ctx, p["ln2"], x, "ln2", layer, cols, acts), layer, cols, acts)
        if cfg.post_norms:
            m = norm(ctx, p["ln2_post"], m, "ln2_post", layer, cols, acts)
        m = ctx.site("hook_mlp_out", m, layer, cols, acts)
        x = (m + a) + x
    else:
        x = ctx.site("hook_resid_mid", x + a, layer, cols, acts)
        m = mlp(ctx, p["mlp"], norm(ctx, p["ln2"], x, "ln2", layer, cols, acts), layer, cols, acts)
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


def unembed(ctx: Ctx, params, x, cols, acts, vocab=None):
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


def position_ids(attention_mask):
    """Position ids that follow the mask: each real token's index among the real tokens of its row."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


# ----------------------------------------------------------------------------------------
# entry points (pure; Model wraps them in jax.jit)


def forward(params, tokens, attention_mask, edits, *, cfg: Config, record=None, logits_at=None, return_resid=False):
    """Full forward. Returns (logits [B, S, V] or at rows logits_at, recorded acts dict keyed by local name)."""
    B, P = tokens.shape
    mask = jnp.ones((B, P), bool) if attention_mask is None else attention_mask.astype(bool)
    ctx = Ctx(cfg, edits, record, n_prompt=P, n_keys=P, pos_ids=position_ids(mask), key_valid=mask)
    cols = jnp.arange(P)
    acts: dict[str, Any] = {}
    x = embed(ctx, params, tokens, cols, acts)
    x, _, block_acts = run_stack(ctx, params["blocks"], x, cols)
    if logits_at is not None:
        sel = np.asarray(logits_at)
        x, cols = x[:, sel], cols[sel]
    logits = unembed(ctx, params, x, cols, acts)
    acts.update(block_acts)
    if return_resid:
        return logits, acts, x
    return logits, acts


def _sample(logits, key, do_sample, temperature, top_k, top_p):
    logits = logits.astype(F32)
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        keep = (jnp.cumsum(probs, -1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    params, tokens, attention_mask, edits, key, *, cfg: Config, max_new_tokens, do_sample=False,
    temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=None,
):
    """Prefill the (left-padded) prompt into a KV cache, then decode max_new_tokens tokens. Returns [B, max_new_tokens]."""
    B, P = tokens.shape
    T = P + max_new_tokens
    mask = jnp.ones((B, P), bool) if attention_mask is None else attention_mask.astype(bool)
    prompt_pos = position_ids(mask)
    new_pos = prompt_pos[:, -1:] + 1 + jnp.arange(max_new_tokens)[None]
    pos_ids = jnp.concatenate([prompt_pos, new_pos], axis=1)
    key_valid = jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1)
    ctx = Ctx(cfg, edits, None, n_prompt=P, n_keys=T, pos_ids=pos_ids, key_valid=key_valid)
    dt = params["embed"]["W_E"].dtype
    shape = (cfg.n_layers, B, T, cfg.n_kv_heads, cfg.d_head)
    kv = (jnp.zeros(shape, dt), jnp.zeros(shape, dt))

    def step(kv, toks, cols):
        x = embed(ctx, params, toks, cols, {})
        x, kv, _ = run_stack(ctx, params["blocks"], x, cols, kv=kv, want_kv=True)
        return unembed(ctx, params, x[:, -1:], cols[-1:], {})[:, 0], kv

    logits, kv = step(kv, tokens, jnp.arange(P))
    keys = jax.random.split(key, max_new_tokens)
    done = jnp.zeros((B,), bool)

    def pick(logits, k, done):
        tok = _sample(logits, k, do_sample, temperature, top_k, top_p)
        if eos_token_id is not None:
            tok = jnp.where(done, pad_token_id if pad_token_id is not None else eos_token_id, tok)
            done = done | (tok == eos_token_id)
        return tok, done

    tok, done = pick(logits, keys[0], done)

    def body(carry, t):
        kv, tok, done = carry
        logits, kv = step(kv, tok[:, None], (P + t)[None])
        nxt, done = pick(logits, keys[t + 1], done)
        return (kv, nxt, done), tok

    if max_new_tokens > 1:
        (kv, last, done), out = lax.scan(body, (kv, tok, done), jnp.arange(max_new_tokens - 1))
        return jnp.concatenate([out.T, last[:, None]], axis=1)
    return tok[:, None]
