"""The logit lens: read the residual stream entering every layer out through the final norm and the
unembedding, as if the remaining layers were skipped.

The final norm is recomputed on each layer's residual (its own scale), which is the logit lens of
nostalgebraist (2020). `ActivationCache.accumulated_resid(apply_ln=True)` instead divides every
layer by the *final* cached scale, TransformerLens's linear approximation used for attribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jinterp.arch import decoder
from jinterp.sweep import Labelled


def layer_logits(model, tokens, positions=-1, attention_mask=None, incl_mid: bool = False):
    """Logits read from the residual entering each layer and from the final one:
    ([n, batch, len(positions), d_vocab], labels like "0_pre", ..., "final_post")."""
    tokens, mask = model._inputs(tokens, attention_mask)
    P = tokens.shape[1]
    pos = np.atleast_1d(np.asarray(positions)) % P
    names = lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")) or (incl_mid and n.endswith("hook_resid_mid"))
    _, cache = model.run_with_cache(tokens, names=names, attention_mask=mask)
    stack, labels = cache.accumulated_resid(incl_mid=incl_mid, pos_slice=list(pos), return_labels=True)
    cfg = model.config
    ctx = decoder.Ctx(cfg, n_prompt=P, n_keys=P, pos_ids=None, key_valid=None)
    read = jax.jit(jax.vmap(lambda x: decoder.unembed(ctx, model.params, x, jnp.asarray(pos), {})))
    return read(stack), labels


def logit_lens(model, tokens, targets=None, positions=-1, k: int = 5, attention_mask=None) -> dict:
    """Per layer: top-k predicted tokens (for the first example and position) and, with targets
    (one token id per example), the target's log-probability and rank averaged over the batch.

    Returns {"labels", "logits" [n, B, len(positions), V], "top" [n lists of (token, prob)],
    "target_logprob" Labelled [layer] and "target_rank" Labelled [layer] when targets are given}.
    """
    logits, labels = layer_logits(model, tokens, positions, attention_mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    strs = (lambda i: model.tokenizer.decode([int(i)])) if model.tokenizer is not None else str
    first = np.asarray(logp[:, 0, 0])
    top = [[(strs(i), float(np.exp(row[i]))) for i in np.argsort(row)[::-1][:k]] for row in first]
    out = {"labels": labels, "logits": logits, "top": top}
    if targets is not None:
        t = jnp.asarray(np.broadcast_to(np.asarray(targets), (logits.shape[1],)))
        target_lp = jnp.take_along_axis(logp, t[None, :, None, None], -1)[..., 0]  # [n, B, npos]
        rank = (logp > target_lp[..., None]).sum(-1)
        lab = (tuple(labels),)
        out["target_logprob"] = Labelled(np.asarray(target_lp.mean((1, 2))), ("layer",), lab, name="target log-prob")
        out["target_rank"] = Labelled(np.asarray(rank.mean((1, 2)), dtype=float), ("layer",), lab, name="target rank")
    return out
