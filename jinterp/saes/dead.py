"""Dead features during dictionary training: the TopK auxiliary loss (AuxK) and resampling.

AuxK (Gao et al. 2024, arXiv 2406.04093, appendix A.2/B.1), as SAELens 6's `TopKTrainingSAE.
calculate_topk_aux_loss` computes it, for one layer on N tokens:

    residual = stop_gradient(y - y_hat)                      (the main reconstruction's error)
    k_aux    = d_in // 2 by default; n_dead = #dead features
    a_aux    = pre-activations of the min(k_aux, n_dead) largest dead latents per token, 0 elsewhere
               (no ReLU: SAELens scatters `hidden_pre` itself)
    loss     = coeff * min(n_dead / k_aux, 1) * mean_tokens |a_aux @ W_dec - residual|^2   (no b_dec)

and 0 when no feature is dead. SAELens's coefficient default is 1.0; Gao et al. use 1/32 (ours).

Resampling ("Towards Monosemanticity", Bricken et al. 2023, the "neuron resampling" appendix): at
chosen steps every dead feature j gets a fresh direction from a high-loss input of the current
batch, sampled with probability proportional to the square of that token's reconstruction loss:

    decoder row j   = that token's direction, unit norm (an SAE: the centred input x - b_dec, the
                      input vector as Anthropic; a transcoder: its error y - y_hat, which is what
                      the feature should learn to write)
    encoder col j   = the input the encoder sees (x - b_dec for an SAE, x for a transcoder), unit
                      norm, times `scale` (0.2) x the mean norm of the live features' encoder columns
    b_enc[j]        = 0, and the optimizer's state (e.g. Adam's moments) of these entries reset to 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def auxk_loss(pre, W_dec, residual, dead, k_aux: int):
    """The AuxK loss of one layer before its coefficient (module docstring): pre [N, d_sae] the
    encoder pre-activations, W_dec [d_sae, d_out], residual [N, d_out] (stop-gradient taken here),
    dead [d_sae] bool. k_aux is static; the number of dead features need not be."""
    n_dead = dead.sum()
    k = min(int(k_aux), pre.shape[-1])
    masked = jnp.where(dead[None], pre, -jnp.inf)
    vals, idx = jax.lax.top_k(masked, k)
    # when fewer than k_aux are dead, the surplus picks are live latents (value -inf): drop them
    keep = dead[idx]
    vals = jnp.where(keep, vals, 0.0)
    acts = jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], idx].add(vals)
    recon = acts @ W_dec
    loss = jnp.sum((recon - jax.lax.stop_gradient(residual)) ** 2, -1).mean()
    scale = jnp.minimum(n_dead / k_aux, 1.0)
    return jnp.where(n_dead > 0, scale * loss, 0.0)


def _unit(v):
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def resample_layer(p, dead, enc_in, dec_dirs, token_loss, key, scale: float = 0.2):
    """New parameters for one layer with its dead features resampled (module docstring).

    p: {"W_enc" [d_in, d_sae], "b_enc" [d_sae], "W_dec" [d_sae, d_out], ...}; dead [d_sae] bool;
    enc_in [N, d_in] the encoder's input per token; dec_dirs [N, d_out] the decoder direction per
    token; token_loss [N] the reconstruction loss per token. Live features are left as they are."""
    d_sae = dead.shape[0]
    logits = jnp.log(jnp.maximum(token_loss, 0.0) ** 2 + 1e-30)
    pick = jax.random.categorical(key, logits, shape=(d_sae,))  # one high-loss token per feature
    enc_norm = jnp.linalg.norm(p["W_enc"], axis=0)  # [d_sae]
    n_live = (~dead).sum()
    live_norm = jnp.where(n_live > 0, jnp.sum(jnp.where(dead, 0.0, enc_norm)) / jnp.maximum(n_live, 1), 1.0)
    new_enc = _unit(enc_in[pick]).T * (scale * live_norm)  # [d_in, d_sae]
    new_dec = _unit(dec_dirs[pick])  # [d_sae, d_out]
    return {
        **p,
        "W_enc": jnp.where(dead[None, :], new_enc, p["W_enc"]),
        "W_dec": jnp.where(dead[:, None], new_dec, p["W_dec"]),
        "b_enc": jnp.where(dead, 0.0, p["b_enc"]),
    }


def reset_masks(params, dead):
    """Per-parameter boolean masks of the entries a resampling rewrote: params are stacked [L, ...],
    dead [L, d_sae]. W_enc columns, b_enc entries and W_dec rows of dead features; nothing else."""
    masks = jax.tree_util.tree_map(lambda v: jnp.zeros(v.shape, bool), params)
    masks["W_enc"] = jnp.broadcast_to(dead[:, None, :], params["W_enc"].shape)
    masks["b_enc"] = dead
    masks["W_dec"] = jnp.broadcast_to(dead[:, :, None], params["W_dec"].shape)
    return masks


def reset_optimizer_state(optimizer: optax.GradientTransformation, opt_state, masks):
    """Zero every parameter-shaped entry of the optimizer state (Adam's mu and nu, ...) where masks
    is True; scalars such as the step count are kept."""
    return optax.tree_utils.tree_map_params(
        optimizer, lambda v, m: jnp.where(m, jnp.zeros_like(v), v), opt_state, masks,
        transform_non_params=lambda v: v,
    )
