"""The logit lens: read the residual stream entering every layer out through the final norm and the
unembedding, as if the remaining layers were skipped.

The final norm is recomputed on each layer's residual (its own scale), which is the logit lens of
nostalgebraist (2020). `ActivationCache.accumulated_resid(apply_ln=True)` instead divides every
layer by the *final* cached scale, TransformerLens's linear approximation used for attribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import arch
from jinterp.results import Labelled

_unembed = jax.jit(arch.unembed, static_argnames=("cfg", "vocab"))


def unembed(model, stack):
    """Residuals [..., d_model] read out through the final norm (each its own scale) and W_U."""
    return _unembed(model.params, model.config, stack)


def layer_logits(model, tokens, positions=-1, attention_mask=None, incl_mid: bool = False):
    """Logits read from the residual entering each layer and from the final one:
    ([n, batch, len(positions), d_vocab], labels like "0_pre", ..., "final_post")."""
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    P = tokens.shape[1]
    pos = np.atleast_1d(np.asarray(positions)) % P
    names = lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")) or (incl_mid and n.endswith("hook_resid_mid"))
    _, cache = model.run_with_cache(tokens, names=names, attention_mask=mask)
    stack, labels = cache.accumulated_resid(incl_mid=incl_mid, pos_slice=list(pos), return_labels=True)
    return _unembed(model.params, model.config, stack), labels


@dataclasses.dataclass
class LogitLens:
    """labels [n]; logits [n, batch, len(positions), d_vocab]; top: per layer, the top-k (token,
    probability) of the first example and position; with targets, target_logprob and target_rank
    per layer (averaged over the batch and positions)."""

    labels: list
    logits: jax.Array
    top: list
    target_logprob: Labelled | None = None
    target_rank: Labelled | None = None

    def __repr__(self):
        lines = [f"LogitLens: {len(self.labels)} layers, logits {list(self.logits.shape)}; top token per layer:"]
        for lab, top in zip(self.labels, self.top):
            line = f"  {lab:>12s}  {top[0][0]!r} ({top[0][1]:.3f})"
            if self.target_logprob is not None:
                i = self.labels.index(lab)
                line += f"   target log-prob {self.target_logprob.values[i]:.3f}, rank {self.target_rank.values[i]:.1f}"
            lines.append(line)
        return "\n".join(lines)


def logit_lens(model, tokens, targets=None, positions=-1, k: int = 5, attention_mask=None) -> LogitLens:
    """Per layer: top-k predicted tokens (for the first example and position) and, with targets
    (one token id per example), the target's log-probability and rank averaged over the batch."""
    logits, labels = layer_logits(model, tokens, positions, attention_mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    strs = (lambda i: model.tokenizer.decode([int(i)])) if model.tokenizer is not None else str
    first = np.asarray(logp[:, 0, 0])
    top = [[(strs(i), float(np.exp(row[i]))) for i in np.argsort(row)[::-1][:k]] for row in first]
    out = LogitLens(list(labels), logits, top)
    if targets is not None:
        t = jnp.asarray(np.broadcast_to(np.asarray(targets), (logits.shape[1],)))
        target_lp = jnp.take_along_axis(logp, t[None, :, None, None], -1)[..., 0]  # [n, B, npos]
        rank = (logp > target_lp[..., None]).sum(-1)
        lab = (tuple(labels),)
        out.target_logprob = Labelled(np.asarray(target_lp.mean((1, 2))), ("layer",), lab, name="target log-prob")
        out.target_rank = Labelled(np.asarray(rank.mean((1, 2)), dtype=float), ("layer",), lab, name="target rank")
    return out


@dataclasses.dataclass
class TunedLens:
    """The tuned lens (Belrose et al. 2023; translators from `jinterp.train.tuned_lens.train`):
    labels [n] ("0_pre", ..., "final_post"); logits [n, batch, len(positions), d_vocab]; kl:
    KL(final || tuned lens) per layer and logit_kl: KL(final || logit lens) per layer, both the mean
    over the batch and the (attention-mask) positions; top: per layer, the top-k (token,
    probability) of the first example and position."""

    labels: list
    logits: jax.Array
    kl: Labelled
    logit_kl: Labelled
    top: list

    def __repr__(self):
        lines = [f"TunedLens: {len(self.labels)} layers, logits {list(self.logits.shape)}; KL to the final distribution:",
                 f"  {'layer':>12s}  {'tuned':>8s}  {'logit':>8s}  top token (tuned)"]
        for i, (lab, top) in enumerate(zip(self.labels, self.top)):
            lines.append(f"  {lab:>12s}  {self.kl.values[i]:8.4f}  {self.logit_kl.values[i]:8.4f}  {top[0][0]!r} ({top[0][1]:.3f})")
        return "\n".join(lines)


def lens_kl(model, tokens, translators=None, positions=-1, attention_mask=None) -> Labelled:
    """KL(final distribution || lens distribution) per layer ("0_pre", ..., "final_post"), the mean
    over the batch and the positions (None: all) where attention_mask is 1: the logit lens's when
    translators is None, else the tuned lens's."""
    from jinterp.train import tuned_lens as T

    logits, labels, w = T.lens_logits(model, tokens, translators, positions, attention_mask)
    name = "tuned-lens KL" if translators is not None else "logit-lens KL"
    return Labelled(np.asarray(T.summarise(logits, w)[0]), ("layer",), (tuple(labels),), name=name)


def tuned_lens(model, tokens, translators, positions=-1, k: int = 5, attention_mask=None) -> TunedLens:
    """Read each layer's residual through its translator, then the final norm and unembedding;
    positions: an index or list (default the last), None for all. Raises InputError if the
    translators were fitted for a model with another n_layers or d_model."""
    from jinterp.model import InputError
    from jinterp.train import tuned_lens as T

    if translators is None:
        raise InputError("tuned_lens needs translators (jinterp.train.tuned_lens.train or Translators.load); "
                         "for the plain logit lens use logit_lens or lens_kl")
    translators.check(model)
    stack, labels, w = T.residuals(model, tokens, attention_mask, positions)
    if not float(w.sum()) > 0:
        raise InputError("the selected positions are all masked out (attention_mask is 0 there); choose other positions")
    plain = unembed(model, stack)
    logits = unembed(model, T.translate_stack(translators, stack))
    lab = (tuple(labels),)
    (kl, first), (plain_kl, _) = T.summarise(logits, w), T.summarise(plain, w)
    kl = Labelled(np.asarray(kl), ("layer",), lab, name="tuned-lens KL")
    logit_kl = Labelled(np.asarray(plain_kl), ("layer",), lab, name="logit-lens KL")
    strs = (lambda i: model.tokenizer.decode([int(i)])) if model.tokenizer is not None else str
    first = np.asarray(first)
    top = [[(strs(i), float(np.exp(row[i]))) for i in np.argsort(row)[::-1][:k]] for row in first]
    return TunedLens(list(labels), logits, kl, logit_kl, top)
