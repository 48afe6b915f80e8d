"""Activations of one site at every layer (or chosen layers) and one position per row, gathered
for fitting readouts to them (probes): [L, N, d]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import sites as S


class ProbeError(ValueError):
    """Bad activations, labels or options for a probe, or a fit that produced non-finite weights."""


def collect(model, tokens, site: str = "hook_resid_post", pos=-1, attention_mask=None, *, layers=None,
            batch_size: int | None = None) -> jax.Array:
    """Activations of block site `site` at every layer (or `layers`) at one position per example:
    float32 [L, N, d] (sites with head axes are flattened: attn.hook_z -> H * d_head).

    site: a local site name or alias ("hook_resid_post", "resid_mid", "attn.hook_z", "mlp_out").
    pos: an int (negative counts from the end of the padded sequence), an int array [N] (one
    position per example, for prompts of different lengths), or "last" (each row's last real
    token under `attention_mask`). A chosen position that is padding raises.
    batch_size: run the model on chunks of this many rows (one compiled shape; the last chunk is
    padded) to bound memory.
    """
    cfg = model.config
    local = S.resolve_local(cfg, site)
    if local not in S.block_sites(cfg):
        raise S.SiteError(
            f"{site!r} is a global site (one per model, not per layer); probes.collect reads a per-layer "
            "site such as 'hook_resid_post', 'hook_resid_pre' or 'hook_mlp_out'"
        )
    layers = check_layers(cfg, layers)
    toks, mask = model.prepare_inputs(tokens, attention_mask)
    toks = np.asarray(toks)
    mask = None if mask is None else np.asarray(mask)
    N, P = toks.shape
    positions = positions_of(pos, N, P, mask)
    names = [S.full_name(l, local) for l in layers]
    pax = S.layout(local).index("pos")  # in the per-layer activation [batch, ...]
    bs = N if batch_size is None else int(batch_size)
    if bs < 1:
        raise ProbeError(f"batch_size must be a positive int, got {batch_size!r}")
    chunks = []
    for start in range(0, N, bs):
        rows = np.arange(start, min(start + bs, N))
        n_real = len(rows)
        rows = np.concatenate([rows, np.full(bs - n_real, rows[-1])]) if bs < N else rows  # fixed shape
        _, cache = model.run_with_cache(
            toks[rows], names=names, attention_mask=None if mask is None else mask[rows]
        )
        a = cache.stack(local) if len(layers) == cfg.n_layers else jnp.stack([cache[n] for n in names])
        a = jnp.moveaxis(a, pax + 1, 2)  # [L, B, P, ...]
        a = a[:, jnp.arange(len(rows)), jnp.asarray(positions[rows])]  # [L, B, ...]
        chunks.append(a.reshape(a.shape[0], a.shape[1], -1)[:, :n_real].astype(jnp.float32))
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=1)


def check_layers(cfg, layers) -> list[int]:
    L = cfg.n_layers
    if layers is None:
        return list(range(L))
    out = []
    for l in np.atleast_1d(layers).tolist():
        if not isinstance(l, int) or not -L <= l < L:
            raise ProbeError(f"layer {l!r} is out of range: this model has {L} layers (0..{L - 1})")
        out.append(l % L)
    if len(set(out)) != len(out):
        raise ProbeError(f"layers {out} repeat a layer; name each layer once")
    return out


def positions_of(pos, N: int, P: int, mask) -> np.ndarray:
    """Validated absolute positions [N] (ints)."""
    if isinstance(pos, str):
        if pos != "last":
            raise ProbeError(f"pos must be an int, an int array [N] or 'last', got {pos!r}")
        if mask is None:
            return np.full(N, P - 1)
        return P - 1 - np.argmax(mask[:, ::-1], axis=1)
    p = np.asarray(pos)
    if p.dtype == bool or not np.issubdtype(p.dtype, np.integer):
        raise ProbeError(f"pos must be an int, an int array [N] or 'last', got {pos!r}")
    if p.ndim == 0:
        p = np.full(N, int(p))
    elif p.shape != (N,):
        raise ProbeError(f"pos has shape {p.shape}; give one position per example, shape ({N},), or one int")
    bad = (p < -P) | (p >= P)
    if bad.any():
        i = int(np.argmax(bad))
        raise ProbeError(f"position {int(p[i])} (example {i}) is out of range for sequences of {P} tokens")
    p = p % P
    if mask is not None:
        pad = ~mask[np.arange(N), p]
        if pad.any():
            i = int(np.argmax(pad))
            raise ProbeError(
                f"position {int(p[i])} of example {i} is padding (attention_mask is False there); "
                "pass pos='last' for each row's last real token, or per-example positions"
            )
    return p
