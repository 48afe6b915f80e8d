"""The decoder's entry points: the full forward, generation, the final read-out, and the partial
forward a sweep runs (a base run, then re-runs that resume from it).

All are pure functions of (params, inputs) with a static `cfg`; callers jit them. The layer kit
they assemble (`decoder.py`: the per-call context, the block, the layer scan) stays inside arch/.

Partial forwards ("compute only what changes", DESIGN.md principle 6): `base_run` keeps what a
re-run needs from the unedited run (the residual entering every block, every block's keys,
values and attention mixes, the final residual). `resume` re-runs layers >= a traced `start` on
positions >= a static `s0`, reading keys and values before s0 from the base run, and computes
logits only at the positions and token ids the caller asks for.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jinterp.arch import decoder as D
from jinterp.arch.packing import this_device, window_rows
from jinterp.arch.params import param_shapes
from jinterp.config import Config

F32 = jnp.float32
PRE_BLOCK_SITES = ("hook_embed", "hook_pos_embed")


def position_ids(attention_mask):
    """Position ids that follow the mask: each real token's index among the real tokens of its row."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def _mask(tokens, attention_mask):
    return jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)


def forward(params, tokens, attention_mask, edits=(), *, cfg: Config, record=None, logits_at=None):
    """Full forward -> (logits [B, S, V] (or at rows logits_at), recorded acts keyed by local site name).

    record: {local site: layers tuple (block sites) or None (global sites)}, as sites.select gives.
    """
    B, P = tokens.shape
    mask = _mask(tokens, attention_mask)
    ctx = D.Ctx(cfg, edits, record, n_prompt=P, n_keys=P, pos_ids=position_ids(mask), key_valid=mask)
    cols = jnp.arange(P)
    acts: dict[str, Any] = {}
    x = D.embed(ctx, params, tokens, cols, acts)
    x, _, block_acts = D.run_stack(ctx, params["blocks"], x, cols)
    if logits_at is not None:
        sel = np.asarray(logits_at)
        x, cols = x[:, sel], cols[sel]
    logits = D.final(ctx, params, x, cols, acts)
    acts.update(block_acts)
    return logits, acts


def unembed(params, cfg: Config, x, vocab=None):
    """Final norm and unembedding of residuals x [..., pos, d_model] -> logits (no edits, no recording).
    vocab: static token ids to compute logits for (default all)."""
    lead = x.shape[:-2]
    x2 = x.reshape((-1,) + x.shape[-2:])
    out = D.final(D.Ctx(cfg), params, x2, jnp.arange(x.shape[-2]), {}, vocab=vocab)
    return out.reshape(lead + out.shape[-2:])


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
    mask = _mask(tokens, attention_mask)
    prompt_pos = position_ids(mask)
    new_pos = prompt_pos[:, -1:] + 1 + jnp.arange(max_new_tokens)[None]
    pos_ids = jnp.concatenate([prompt_pos, new_pos], axis=1)
    key_valid = jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1)
    ctx = D.Ctx(cfg, edits, None, n_prompt=P, n_keys=T, pos_ids=pos_ids, key_valid=key_valid)
    dt = params["embed"]["W_E"].dtype
    shape = (cfg.n_layers, B, T, cfg.n_kv_heads, cfg.d_head)
    kv = (jnp.zeros(shape, dt), jnp.zeros(shape, dt))

    def step(kv, toks, cols):
        x = D.embed(ctx, params, toks, cols, {})
        x, kv, _ = D.run_stack(ctx, params["blocks"], x, cols, kv=kv, want_kv=True)
        return D.final(ctx, params, x[:, -1:], cols[-1:], {})[:, 0], kv

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
    scaling = dict(cfg.rope_scaling)
    longrope = scaling.get("rope_type") == "longrope"

    def rebuild(kv, buf, cur):
        """Recompute every column up to `cur` (as transformers' Phi-3 drops its cache when a sequence
        first outgrows original_max_position_embeddings: the cached keys were rotated with the short factors)."""
        cols = jnp.arange(T)
        ctx_now = D.Ctx(cfg, edits, None, n_prompt=P, n_keys=T, pos_ids=pos_ids, key_valid=key_valid & (cols <= cur)[None])
        x = D.embed(ctx_now, params, buf, cols, {})
        x, kv, _ = D.run_stack(ctx_now, params["blocks"], x, cols, kv=kv, want_kv=True)
        x = lax.dynamic_slice_in_dim(x, cur, 1, axis=1)
        return D.final(ctx_now, params, x, cur[None], {})[:, 0], kv

    def body(carry, t):
        kv, tok, done, buf = carry
        cur = P + t
        if longrope:
            buf = lax.dynamic_update_slice_in_dim(buf, tok[:, None].astype(buf.dtype), cur, axis=1)
            crossing = jnp.any(pos_ids[:, cur] == scaling["original_max_position_embeddings"])
            logits, kv = lax.cond(crossing, lambda kv: rebuild(kv, buf, cur), lambda kv: step(kv, tok[:, None], cur[None]), kv)
        else:
            logits, kv = step(kv, tok[:, None], cur[None])
        nxt, done = pick(logits, keys[t + 1], done)
        return (kv, nxt, done, buf), tok

    if max_new_tokens > 1:
        buf = jnp.zeros((B, T), tokens.dtype).at[:, :P].set(tokens) if longrope else None
        (kv, last, done, _), out = lax.scan(body, (kv, tok, done, buf), jnp.arange(max_new_tokens - 1))
        return jnp.concatenate([out.T, last[:, None]], axis=1)
    return tok[:, None]


# ----------------------------------------------------------------------------------------
# which sites exist: the decoder itself says, by passing through them


@functools.lru_cache(maxsize=None)
def emitted_sites(cfg: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(block sites, global sites) this config's forward passes through, in firing order. Found by
    tracing the forward abstractly, so the decoder is the one source of truth for which sites exist."""
    seen: list[str] = []
    shapes = param_shapes(cfg, jnp.float32)
    toks = jax.ShapeDtypeStruct((1, 2), jnp.int32)

    def run(params, tokens):
        P = tokens.shape[1]
        mask = jnp.ones(tokens.shape, bool)
        ctx = D.Ctx(cfg, (), None, n_prompt=P, n_keys=P, pos_ids=position_ids(mask), key_valid=mask, seen=seen)
        cols = jnp.arange(P)
        x = D.embed(ctx, params, tokens, cols, {})
        x, _, _ = D.block(ctx, jax.tree.map(lambda a: a[0], params["blocks"]), x, 0, cols)
        return D.final(ctx, params, x, cols, {})

    jax.eval_shape(run, shapes, toks)
    order = list(dict.fromkeys(seen))
    return tuple(n for n, is_global in order if not is_global), tuple(n for n, is_global in order if is_global)


# ----------------------------------------------------------------------------------------
# partial forwards: a base run, and re-runs that resume from it


@struct.dataclass
class Base:
    """What a partial re-run reads from the unedited run: residuals entering each block, every
    block's keys/values and attention mixes, the final residual, and the sequence geometry."""

    tokens: jax.Array  # [B, P]
    mask: jax.Array  # [B, P] bool
    pos_ids: jax.Array  # [B, P]
    resid_pre: jax.Array  # [L, B, P, D]
    z: jax.Array  # [L, B, P, H, dh] attention mixes (to resume a block after its attention)
    kv: tuple  # (K, V) each [L, B, P, Hkv, dh]
    resid_final: jax.Array  # [B, P, D] output of the last block


def base_run(params, tokens, attention_mask, *, cfg: Config) -> Base:
    """The unedited run, keeping what `resume` reads."""
    B, P = tokens.shape
    mask = _mask(tokens, attention_mask)
    pos = position_ids(mask)
    every = tuple(range(cfg.n_layers))
    ctx = D.Ctx(cfg, (), {"hook_resid_pre": every, "attn.hook_z": every}, n_prompt=P, n_keys=P, pos_ids=pos, key_valid=mask)
    cols = jnp.arange(P)
    x = D.embed(ctx, params, tokens, cols, {})
    shape = (cfg.n_layers, B, P, cfg.n_kv_heads, cfg.d_head)
    kv0 = (jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype))
    xf, kv, acts = D.run_stack(ctx, params["blocks"], x, cols, kv=kv0, want_kv=True)
    return Base(tokens, mask, pos, acts["hook_resid_pre"], acts["attn.hook_z"], kv, xf)


def _resume_ctx(cfg, base: Base, edits, record=None):
    P = base.tokens.shape[1]
    return D.Ctx(cfg, edits, record, n_prompt=P, n_keys=P, pos_ids=base.pos_ids, key_valid=base.mask)


def _entry(params, base: Base, ctx, edits, start, s0):
    """Residual entering the first re-run block at positions >= s0, and that block's index."""
    P = base.tokens.shape[1]
    if any(e.site in PRE_BLOCK_SITES for e in edits):  # embedding edits: run from the tokens
        return D.embed(ctx, params, base.tokens[:, s0:], jnp.arange(s0, P), {}), 0
    return lax.dynamic_index_in_dim(base.resid_pre, start, 0, keepdims=False)[:, s0:], start


def from_attention_mixes(cfg: Config, sites) -> bool:
    """Whether a re-run's first block can resume from the base run's attention mixes: no edit site
    comes before attn.hook_z in the block (or is a pre-block site)."""
    block_order = emitted_sites(cfg)[0]
    after = block_order[block_order.index("attn.hook_z"):]
    return all(s in after or s.startswith("ln_final") for s in sites)


def resume(params, cfg: Config, base: Base, edits, start, s0: int = 0, positions=None, vocab=None):
    """Edited logits, re-running layers >= start (traced) at positions >= s0 (static), as a
    [B, P, V] view in which only `positions` and `vocab` (static tuples; None = all) hold real
    values. The caller guarantees no edit changes a layer below start or a position below s0.
    When no edit targets a block site before attn.hook_z, block `start` resumes from the base
    run's attention mixes instead of recomputing attention."""
    edits = tuple(edits)
    P = base.tokens.shape[1]
    ctx = _resume_ctx(cfg, base, edits)
    x0, start = _entry(params, base, ctx, edits, start, s0)
    cols = jnp.arange(s0, P)
    kv = base.kv if s0 > 0 else None
    want = tuple(range(P)) if positions is None else tuple(positions)
    inside = tuple(p for p in want if p >= s0)
    before = tuple(p for p in want if p < s0)
    qsel = None if positions is None else np.asarray([p - s0 for p in inside], np.int32)
    resume_z = from_attention_mixes(cfg, {e.site for e in edits})
    rz = base.z[:, :, s0:] if resume_z else None
    parts = []
    if before:  # positions before s0 hold the base run's final residual
        idx = np.asarray(before, np.int32)
        parts.append(D.final(ctx, params, base.resid_final[:, idx], jnp.asarray(idx), {}, vocab=vocab))
    if inside:
        x, _, _ = D.run_stack(ctx, params["blocks"], x0, cols, kv=kv, start=start, final_qsel=qsel, resume_z=rz)
        parts.append(D.final(ctx, params, x, jnp.asarray(inside, np.int32), {}, vocab=vocab))
    rows = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return _view(rows, before + inside, P, vocab, cfg.d_vocab)


def resume_record(params, cfg: Config, base: Base, edits, start, record: dict):
    """Re-run every position from layer `start` (traced) with edits, recording {local site: layers}."""
    edits = tuple(edits)
    # skipped layers record nothing: start no later than the first recorded layer
    start = jnp.minimum(start, min(min(ls) for ls in record.values()))
    ctx = _resume_ctx(cfg, base, edits, record)
    x0, start = _entry(params, base, ctx, edits, start, 0)
    _, _, acts = D.run_stack(ctx, params["blocks"], x0, jnp.arange(base.tokens.shape[1]), start=start)
    return acts


def _view(rows, order, P, vocab, V):
    """rows [B, len(order), len(vocab)] -> a [B, P, V] view holding them at positions `order` and
    token ids `vocab` (other entries repeat them; the metric does not read those). XLA fuses the
    view into the metric's reads, so it is never materialised."""
    if order != tuple(range(P)):
        if len(order) == 1:
            rows = jnp.broadcast_to(rows, (rows.shape[0], P, rows.shape[2]))
        else:
            idx = np.zeros(P, np.int32)
            idx[list(order)] = np.arange(len(order))
            rows = jnp.take(rows, jnp.asarray(idx), axis=1)
    if vocab is not None:
        idx = np.zeros(V, np.int32)
        idx[list(vocab)] = np.arange(len(vocab))
        rows = jnp.take(rows, jnp.asarray(idx), axis=2)
    return rows


def resume_cells(params, cfg: Config, base: Base, make_edits, cells, counts: tuple, first: int, s0: int = 0,
                 positions=None, vocab=None, first_pos=None, device_first_pos=None):
    """Many cells' edited logit rows in one pass that grows its batch layer by layer.

    cells: a pytree with a leading cell axis, cells ordered by the layer their edits start at;
    make_edits(cell) -> that cell's edits (called under vmap, so edit values built from shared
    arrays are never copied per cell); counts: static, counts[i] cells start at layer first + i.
    Block l runs once for the cells already started (reading its weights once for all of them) and
    once for the cells starting there, which enter with the base run's residual (and resume from
    its attention mixes when no edit targets an earlier site). So every cell computes exactly
    layers >= its start at positions >= s0 (static), with matrix products over all started cells.
    first_pos: static, each cell's first changed position (>= s0): the projections and MLPs then pack
    the rows at or after it, every cell's, into one product (arch/packing.py); the rows before it
    keep the base run's keys, values and final residual. Attention still runs over every row from s0.
    device_first_pos: with the cells split over a mesh (inside shard_map), this device's cells' first
    positions (traced), and first_pos every device's, static [devices, cells]: each device packs its
    own rows, its products sized for the busiest device.
    Returns rows [N, B, len(order), len(vocab) or V] with order = (positions before s0) + (positions
    from s0); `cells_view` turns one cell's rows into the [B, P, V] view `resume` returns.
    """
    sites = {e.site for e in jax.eval_shape(lambda c: tuple(make_edits(c)), jax.tree.map(lambda a: a[0], cells))}
    if sites & set(PRE_BLOCK_SITES):
        raise ValueError("resume_cells starts cells at a block; embedding edits need resume")
    L, P = cfg.n_layers, base.tokens.shape[1]
    if len(counts) != L - first:
        raise ValueError(f"counts must cover layers {first}..{L - 1}")
    cols = jnp.arange(s0, P)
    want = tuple(range(P)) if positions is None else tuple(positions)
    inside = tuple(p for p in want if p >= s0)
    before = tuple(p for p in want if p < s0)
    qsel = None if positions is None else np.asarray([p - s0 for p in inside], np.int32)
    resume_z = from_attention_mixes(cfg, sites)
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    part = lambda a, b: jax.tree.map(lambda v: v[a:b], cells)
    # live[c, j]: cell c computes window row j (packing), or None
    live = None if first_pos is None else window_rows(first_pos, np.arange(s0, P), device_first_pos)

    def run(c, lv, x, l, z, rows):
        ctx = _resume_ctx(cfg, base, tuple(make_edits(c)))
        ctx.pack, ctx.live = rows, lv
        kv = take(base.kv, l) if (s0 > 0 or rows is not None) and z is None else None
        q = qsel if l == L - 1 else None
        return D.block(ctx, take(params["blocks"], l), x, l, cols, kv, qsel=q, z=z)[0]

    def vrun(a, b, l, x, z=None):
        """Block l for cells a..b; x: their residuals [b - a, ...], or None: the base run's (shared)."""
        rows = None if live is None else live[a:b]
        lv = None if rows is None else this_device(rows)
        base_x = base.resid_pre[l][:, s0:]
        f = lambda c, lv, x: run(c, lv, base_x if x is None else x, l, z, rows)
        return jax.vmap(f, in_axes=(0, None if lv is None else 0, None if x is None else 0))(part(a, b), lv, x)

    x, n = None, 0
    for l in (range(first, L) if inside else ()):
        k = counts[l - first]
        if k and resume_z and l < L - 1:  # cells starting at l resume from the base run's attention mixes
            new = vrun(n, n + k, l, None, z=base.z[l][:, s0:])
            x = new if not n else jnp.concatenate([vrun(0, n, l, x), new])
        else:  # one block for every started cell; those starting at l enter with the base residual
            if k:
                x0 = base.resid_pre[l][:, s0:]
                x_new = jnp.broadcast_to(x0, (k,) + x0.shape)
                x = x_new if not n else jnp.concatenate([x, x_new])
            x = vrun(0, n + k, l, x) if n + k else x
        n += k

    def read(c, x, lv):
        ctx = _resume_ctx(cfg, base, tuple(make_edits(c)))
        parts = []
        if before:
            idx = np.asarray(before, np.int32)
            parts.append(D.final(ctx, params, base.resid_final[:, idx], jnp.asarray(idx), {}, vocab=vocab))
        if inside:
            if lv is not None:  # rows no projection computed: the base run's final residual
                x = jnp.where(lv[None, :, None], x, base.resid_final[:, np.asarray(inside)])
            parts.append(D.final(ctx, params, x, jnp.asarray(inside, np.int32), {}, vocab=vocab))
        return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    if not inside:
        return jax.vmap(lambda c: read(c, None, None))(cells)
    lv = None if live is None else this_device(live[:, np.asarray(inside) - s0])
    return jax.vmap(read, in_axes=(0, 0, None if lv is None else 0))(cells, x, lv)


def cells_view(rows, cfg: Config, P: int, s0: int, positions=None, vocab=None):
    """One cell's rows from `resume_cells` -> the [B, P, V] view `resume` returns."""
    want = tuple(range(P)) if positions is None else tuple(positions)
    order = tuple(p for p in want if p < s0) + tuple(p for p in want if p >= s0)
    return _view(rows, order, P, vocab, cfg.d_vocab)
