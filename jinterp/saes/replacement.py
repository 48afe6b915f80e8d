"""circuit-tracer's local replacement model, as two compiled programs (used by saes.graph).

The frozen forward is the model's own forward with edits (dictionaries.md §4.1):

    attn.hook_pattern, every ln*.hook_scale and ln_final.hook_scale   stop_gradient
    hook_mlp_out        m' = stop_gradient(m - s) + s + d_out[l]      s = x_in @ W_skip (0 without a skip)
    hook_embed          e' = e + d_emb

so the value is the clean run's and the only gradient paths are the frozen linear ones: attention
OV with fixed patterns, norms with fixed scales, the residual stream, and each transcoder's skip
path. d_out / d_emb are zero-valued additive edits: the gradient with respect to them is the
gradient at the output hook and at hook_embed.

`clean_run` encodes every layer's transcoder input (activations, errors, logit probabilities).
`edge_rows` takes one VJP of the frozen forward per prompt (the linearisation is computed once)
and applies it to a batch of target rows at a time (vmap over `batch` rows, lax.map over chunks,
vmap over prompts; with a mesh, shard_map splits the rows over its first axis). A target's
cotangent is its injection vector: a feature's encoder column at (layer, pos) of the input site,
or a demeaned unembedding column times ln_final's weight at ln_final.hook_normalized (before the weight,
as in TransformerLens; the same edges as the column at the norm's output) at the last position. A row's entries:

    features  g_out[layer_s, pos_s] . (a_s W_dec[layer_s, f_s])   (grouped by slot: g_out[l, p] @ its sources)
    errors    g_out[l, p] . error[l, p]
    tokens    g_emb[p] . embed[p]

A cross-layer transcoder's feature at (i, p) writes every output layer l >= i: it is one decoder
row a_s W_dec_i[f_s, l - i] at each slot (l, p), and its entry sums its rows (circuit-tracer's
encoder_to_decoder_map). A per-layer transcoder's feature is one row at its own slot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jinterp import arch
from jinterp import edits as E
from jinterp import sites as S
from jinterp.saes.dictionary import CrossLayerTranscoder

OUT_SITE = "hook_mlp_out"
F32 = jnp.float32


class _Box:
    """Carries the transcoder input from its site to hook_mlp_out within one block's trace (the skip
    path links two sites of the same block; each trace of the block sets it before it is read)."""

    x = None


@struct.dataclass
class _Tap(E.Op):
    box: _Box = struct.field(pytree_node=False)

    def __call__(self, x, at):
        self.box.x = x
        return x


@struct.dataclass
class _SkipPath(E.Op):
    """m' = stop_gradient(m - s) + s with s = x_in @ W_skip[layer]: the MLP's value, the skip's gradient."""

    W_skip: jax.Array  # [L, d_in, d_out]
    box: _Box = struct.field(pytree_node=False)

    def __call__(self, m, at):
        x, self.box.x = self.box.x, None
        if x is None:
            raise RuntimeError(f"the transcoder input site was not seen before {OUT_SITE} in this block")
        s = jnp.einsum("bpd,de->bpe", x.astype(F32), self.W_skip[at.layer]).astype(m.dtype)
        return lax.stop_gradient(m - s) + s


def frozen_edits(cfg, in_site: str, W_skip, d_out, d_emb) -> list:
    """The edits that turn the forward into the local replacement model (module docstring).
    d_out [L, B, P, D] and d_emb [B, P, D] are the zero-valued additive edits."""
    scales = [s for s in S.block_sites(cfg) + S.global_sites(cfg) if s.endswith("hook_scale")]
    es = [E.stop_gradient("attn.hook_pattern")] + [E.stop_gradient(s) for s in scales]
    if W_skip is None:
        es.append(E.stop_gradient(OUT_SITE))
    else:
        box = _Box()
        es += [E.edit(in_site, _Tap(box)), E.edit(OUT_SITE, _SkipPath(W_skip, box))]
    return es + [E.steer(OUT_SITE, d_out, per_layer=True), E.steer("hook_embed", d_emb)]


def _record(*pairs):
    return tuple(sorted(pairs))


@functools.partial(jax.jit, static_argnames=("cfg", "in_site"))
def clean_run(params, tc, tokens, zero_mask, *, cfg, in_site):
    """One clean forward of tokens [N, P]: transcoder activations [N, L, P, d_tc] (0 at zero_mask
    positions), errors = mlp_out - (decode + skip) [N, L, P, D] (0 there too), hook_embed [N, P, D],
    softmax of the last position's logits [N, V]."""
    L, P = cfg.n_layers, tokens.shape[1]
    every = tuple(range(L))
    rec = _record((in_site, every), (OUT_SITE, every), ("hook_embed", None))
    logits, acts = arch.forward(params, tokens, None, (), cfg=cfg, record=rec, logits_at=(P - 1,))
    x = jnp.moveaxis(acts[in_site], 0, 2).astype(F32)  # [N, P, L, d_in]
    keep = ~zero_mask[None, :, None, None]
    f = jnp.where(keep, tc.encode(x), 0.0)
    recon = tc.decode(f)
    if tc.W_skip is not None:
        recon = recon + jnp.einsum("npld,lde->nple", x, tc.W_skip)
    err = jnp.where(keep, jnp.moveaxis(acts[OUT_SITE], 0, 2).astype(F32) - recon, 0.0)
    return dict(acts=jnp.moveaxis(f, 2, 1), errors=jnp.moveaxis(err, 2, 1), embed=acts["hook_embed"].astype(F32),
                probs=jax.nn.softmax(logits[:, -1].astype(F32), axis=-1))


def decoder_rows(tc, src_layer, feature, out_layer):
    """The decoder vectors W_dec rows [..., D] of features (src_layer, feature) written at out_layer
    (a per-layer transcoder: out_layer == src_layer; a cross-layer one: one static gather per source layer)."""
    if not isinstance(tc, CrossLayerTranscoder):
        return tc.W_dec[src_layer, feature].astype(F32)
    out = 0.0
    for i, W in enumerate(tc.W_dec):  # W [d_sae, L - i, D]
        v = W[feature, jnp.clip(out_layer - i, 0, W.shape[1] - 1)].astype(F32)
        out = out + jnp.where((src_layer == i)[..., None], v, 0.0)
    return out


def _one_prompt(params, tc, tokens, src_grid, src_flat, errors, embed, row_vec, row_slot, *, cfg, in_site, batch):
    """Rows [R, S + L*P + P] of one prompt's edge matrix for the targets (row_vec [R, D], row_slot [R])."""
    L, P, D = cfg.n_layers, tokens.shape[0], cfg.d_model
    rec = _record((in_site, tuple(range(L))), ("ln_final.hook_normalized", None))

    def frozen(d_out, d_emb):
        edits = frozen_edits(cfg, in_site, tc.W_skip, d_out, d_emb)
        _, acts = arch.forward(params, tokens[None], None, edits, cfg=cfg, record=rec, logits_at=(P - 1,))
        x_in = acts[in_site][:, 0].reshape(L * P, D).astype(F32)
        return jnp.concatenate([x_in, acts["ln_final.hook_normalized"][0].astype(F32)], 0)  # [L*P + 1, D]

    zeros = (jnp.zeros((L, 1, P, D), params["embed"]["W_E"].dtype), jnp.zeros((1, P, D), params["embed"]["W_E"].dtype))
    out, vjp = jax.vjp(frozen, *zeros)
    err = errors.reshape(L * P, D)

    def row(vec, slot):
        g_out, g_emb = vjp(jnp.zeros(out.shape, out.dtype).at[slot].set(vec))
        g_out = g_out.reshape(L * P, D).astype(F32)
        # decoder rows grouped by slot (layer, pos): one small matmul per slot, no [S, D] gather per row;
        # src_flat [S, J]: each source's rows in the grid (J = 1, or L for a cross-layer transcoder; the
        # last index is a zero)
        a_rows = jnp.einsum("kd,kmd->km", g_out, src_grid).reshape(-1)
        a_feat = jnp.take(jnp.append(a_rows, 0.0), src_flat).sum(-1)
        a_err = jnp.einsum("kd,kd->k", g_out, err)
        a_tok = jnp.einsum("pd,pd->p", g_emb[0].astype(F32), embed)
        return jnp.concatenate([a_feat, a_err, a_tok])

    n = row_vec.shape[0] // batch
    if n == 1:
        return jax.vmap(row)(row_vec, row_slot)
    chunks = (row_vec.reshape(n, batch, D), row_slot.reshape(n, batch))
    return lax.map(lambda c: jax.vmap(row)(*c), chunks).reshape(n * batch, -1)


@functools.partial(jax.jit, static_argnames=("cfg", "in_site", "batch", "mesh"))
def edge_rows(params, tc, tokens, src, errors, embed, rows, *, cfg, in_site, batch, mesh=None):
    """Edge rows for every prompt: [N, R, S + L*P + P] (columns: sources in src order, error nodes
    l*P + p, token nodes). tokens [N, P]; src = (source layer, feature, value) each [N, L*P, M]: the
    decoder rows written at slot l*P + p (value 0 for padding), and flat [N, S, J]: source s's
    indices into that grid (L*P*M for none); rows = (kind, layer, pos, id) each [N, R]: kind 0 a feature (id = its feature at
    (layer, pos)), 1 a logit (id = vocab id), 2 padding. R is a multiple of batch (x mesh size)."""
    L, P = cfg.n_layers, tokens.shape[1]
    s_layer, s_feat, s_val, src_flat = src
    out_layer = (jnp.arange(L * P) // P)[None, :, None]  # slot l*P + p writes at layer l
    src_grid = decoder_rows(tc, s_layer, s_feat, out_layer) * s_val[..., None]  # [N, L*P, M, D]
    kind, r_layer, r_pos, r_id = rows
    W_U = params["unembed"]["W_U"].astype(F32)
    # the logit direction at ln_final.hook_normalized (pre-affine): w * (demeaned column at the norm's output)
    demeaned = (W_U - W_U.mean(axis=1, keepdims=True)).T * params["ln_final"]["w"].astype(F32)  # [V, D]
    enc = tc.W_enc[r_layer, :, jnp.where(kind == 0, r_id, 0)].astype(F32)  # [N, R, D]
    logit = demeaned[jnp.where(kind == 1, r_id, 0)]
    row_vec = jnp.where((kind == 0)[..., None], enc, jnp.where((kind == 1)[..., None], logit, 0.0))
    row_slot = jnp.where(kind == 0, r_layer * P + r_pos, jnp.where(kind == 1, L * P, 0))
    one = functools.partial(_one_prompt, cfg=cfg, in_site=in_site, batch=batch)

    def body(*args):
        return jax.vmap(one, in_axes=(None, None, 0, 0, 0, 0, 0, 0, 0))(*args)

    args = (params, tc, tokens, src_grid, src_flat, errors, embed, row_vec, row_slot)
    if mesh is None:
        return body(*args)
    from jax.sharding import PartitionSpec as PS

    rep, split = PS(), PS(None, mesh.axis_names[0])
    # every device runs the single-device program on its slice of the rows (the forward is repeated)
    return jax.shard_map(body, mesh=mesh, in_specs=(rep,) * 7 + (split, split), out_specs=split, check_vma=False)(*args)
