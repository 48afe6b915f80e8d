"""ActivationCache: recorded activations, indexed by TransformerLens names.

Block activations are stored stacked over the layers that were requested, so
`cache["blocks.3.hook_resid_pre"]` is a slice and `cache.stack("hook_resid_pre")` the whole
[n_layers, batch, ...] array without copies.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jinterp import sites as S
from jinterp.config import Config


def select_positions(x, pos_slice):
    """Select positions on the second-to-last axis: an int drops the axis (as TransformerLens's
    Slice does), a list or slice keeps it; None keeps all."""
    if pos_slice is None:
        return x
    if isinstance(pos_slice, slice):
        return x[..., pos_slice, :]
    if np.ndim(pos_slice) == 0:
        return x[..., int(pos_slice), :]
    return jnp.take(x, jnp.asarray(pos_slice), axis=-2)


class ActivationCache(Mapping):
    def __init__(self, cfg: Config, acts: dict, layers: dict, model=None, tokens=None, attention_mask=None, edited=False):
        self.cfg = cfg
        self._acts = acts  # local name -> array ([n_sel, ...] for block sites)
        self._layers = layers  # local name -> tuple of layers, or None for global sites
        self.model = model  # the Model that made it (its params), or None
        self.tokens = tokens  # the input tokens [batch, pos] (None if unknown)
        self.attention_mask = attention_mask
        self.edited = edited  # made with edits applied

    # ---- mapping protocol over full names, in firing order
    def _names(self):
        out = []
        for n in S.all_names(self.cfg):
            layer, local = S.parse(self.cfg, n)
            if local in self._acts and (layer is None or layer in self._layers[local]):
                out.append(n)
        return out

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())

    def __contains__(self, name):
        try:
            layer, local = self._key(name)
        except (S.SiteError, TypeError):
            return False
        return local in self._acts and (layer is None or layer in self._layers[local])

    def _key(self, name):
        if isinstance(name, tuple):  # TransformerLens shorthand: ("resid_pre", 3) / ("pattern", 0, "attn")
            short, layer = name[0], name[1] if len(name) > 1 else None
            local = S.resolve_local(self.cfg, short)
            if layer is not None and layer < 0:
                layer += self.cfg.n_layers
            return (None if local in S.GLOBAL_SITES else layer), local
        return S.parse(self.cfg, name)

    def __getitem__(self, name):
        layer, local = self._key(name)
        if local not in self._acts:
            raise KeyError(
                f"{S.full_name(layer, local)!r} was not cached. Cached sites: {sorted(self._acts)}. "
                "Pass names=None to run_with_cache to record everything."
            )
        if layer is None:
            return self._acts[local]
        ls = self._layers[local]
        if layer not in ls:
            raise KeyError(f"{S.full_name(layer, local)!r} was not cached; layers cached for {local}: {list(ls)}")
        return self._acts[local][ls.index(layer)]

    def stack(self, site: str):
        """[n_layers, batch, ...] for a block site recorded at every layer."""
        local = S.resolve_local(self.cfg, site)
        if local not in self._acts or self._layers.get(local) != tuple(range(self.cfg.n_layers)):
            raise KeyError(f"{local!r} is not cached at every layer; run_with_cache with names=None, or include it")
        return self._acts[local]

    def has_stack(self, site: str) -> bool:
        try:
            self.stack(site)
            return True
        except KeyError:
            return False

    def unchanged_prefix(self, model, tokens) -> int:
        """Leading positions where this cache's tokens equal `tokens` in every row, when this cache is
        `model`'s own unedited, unpadded run (same parameters): activations there are identical in
        both runs, so patching them is a no-op. Anything else (another model or parameters, an
        edited or padded run, other shapes): 0."""
        if (
            self.tokens is None
            or self.model is None
            or self.model.params is not model.params
            or self.edited
            or self.attention_mask is not None
            or np.shape(self.tokens) != tuple(np.shape(tokens))
        ):
            return 0
        same = (np.asarray(self.tokens) == np.asarray(tokens)).all(0)
        return int(np.argmin(same)) if not same.all() else int(len(same))

    def __repr__(self):
        return f"ActivationCache({len(self)} activations: {', '.join(sorted(self._acts))})"

    def to_dict(self) -> dict:
        return {n: self[n] for n in self}

    def apply_to(self, fn) -> "ActivationCache":
        """A cache with fn applied to every stored array (e.g. to move to host, or slice the batch)."""
        return ActivationCache(self.cfg, {k: fn(v) for k, v in self._acts.items()}, dict(self._layers), self.model)

    def mean_over_batch(self) -> "ActivationCache":
        """Mean over the batch axis (kept, size 1), e.g. for mean ablation."""
        return ActivationCache(
            self.cfg,
            {k: v.mean(axis=0 if self._layers[k] is None else 1, keepdims=True) for k, v in self._acts.items()},
            dict(self._layers),
            self.model,
        )

    # ---------------------------------------------------------------- residual-stream analysis
    # TransformerLens ActivationCache semantics. Stacks are [component, batch, pos, d_model].

    def _need(self, site):
        """A block site stacked over every layer, or a global site's array (clear KeyError if absent)."""
        if site in S.GLOBAL_SITES:
            if site not in self._acts:
                raise KeyError(f"this analysis needs {site!r}; use run_with_cache(tokens) (names=None)")
            return self._acts[site]
        return self.stack(site)

    def accumulated_resid(self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False, return_labels=False):
        """The residual stream entering each layer up to `layer` (all, plus the final stream, by
        default): [n, batch, pos, d_model], labels "0_pre", "0_mid", ..., "final_post"."""
        L = self.cfg.n_layers
        layer = L if layer is None or layer == -1 else layer
        pre = self._need("hook_resid_pre")
        mid = self._need("hook_resid_mid") if (incl_mid or mlp_input) else None
        comps, labels = [], []
        for l in range(layer):
            comps.append(pre[l]); labels.append(f"{l}_pre")
            if incl_mid:
                comps.append(mid[l]); labels.append(f"{l}_mid")
        if layer == L:
            comps.append(self._need("hook_resid_post")[L - 1]); labels.append("final_post")
        else:
            comps.append(pre[layer]); labels.append(f"{layer}_pre")
            if mlp_input:
                comps.append(mid[layer]); labels.append(f"{layer}_mid")
        stack = select_positions(jnp.stack(comps), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None, incl_embeds=True, return_labels=False):
        """What each component wrote into the residual stream entering `layer` (the final stream by
        default): embeddings, then each layer's attention and MLP outputs. They sum to that stream."""
        L = self.cfg.n_layers
        layer = L if layer is None or layer == -1 else layer
        comps, labels = [], []
        if incl_embeds:
            for g in ("hook_embed", "hook_pos_embed"):
                if g in S.global_sites(self.cfg):
                    comps.append(self._need(g)); labels.append(g[5:])
        attn, mlp = self._need("hook_attn_out"), self._need("hook_mlp_out")
        for l in range(layer):
            if mode in ("all", "attn"):
                comps.append(attn[l]); labels.append(f"{l}_attn_out")
            if mode in ("all", "mlp"):
                comps.append(mlp[l]); labels.append(f"{l}_mlp_out")
        if mlp_input and layer < L and mode in ("all", "attn"):
            comps.append(attn[layer]); labels.append(f"{layer}_attn_out")
        stack = select_positions(jnp.stack(comps), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer=None, return_labels=False, incl_remainder=False, pos_slice=None, apply_ln=False):
        """Each head's output z @ W_O (per head, before b_O) for layers below `layer` (all by default):
        [L*H, batch, pos, d_model], labels "L0H0", .... With incl_remainder, the stream entering
        `layer` minus the heads' sum is appended as "remainder"."""
        L, H = self.cfg.n_layers, self.cfg.n_heads
        layer = L if layer is None or layer == -1 else layer
        z = self._need("attn.hook_z")[:layer]  # [l, B, P, H, dh]
        W_O = self.model.W_O[:layer]
        res = jnp.einsum("lbphe,lhed->lhbpd", z, W_O).reshape((layer * H,) + z.shape[1:3] + (self.cfg.d_model,))
        labels = [f"L{l}H{h}" for l in range(layer) for h in range(H)]
        if incl_remainder:
            total = self._need("hook_resid_post")[L - 1] if layer == L else self._need("hook_resid_pre")[layer]
            res = jnp.concatenate([res, (total - res.sum(0))[None]])
            labels.append("remainder")
        res = select_positions(res, pos_slice)
        if apply_ln:
            res = self.apply_ln_to_stack(res, layer, pos_slice=pos_slice)
        return (res, labels) if return_labels else res

    def apply_ln_to_stack(self, stack, layer=None, mlp_input=False, pos_slice=None):
        """Treat the norm before `layer` (the final norm by default) as linear with its cached scale:
        centre (LayerNorm only) and divide by hook_scale. Direct logit attribution rests on this.
        pos_slice: the positions `stack` was already sliced to (TransformerLens semantics); only the
        cached scale is sliced here."""
        L = self.cfg.n_layers
        if layer is None or layer == -1 or layer == L:
            scale = self._need("ln_final.hook_scale")
        else:
            scale = self._need("ln2.hook_scale" if mlp_input else "ln1.hook_scale")[layer]
        scale = select_positions(scale, pos_slice)
        if self.cfg.norm == "layernorm":
            stack = stack - stack.mean(-1, keepdims=True)
        return stack / scale

    def logit_attrs(self, stack, tokens, incorrect_tokens=None):
        """Dot each component (already through apply_ln_to_stack) with the residual direction of
        `tokens` (minus that of `incorrect_tokens`): [component, batch, pos] or broadcast."""
        d = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            d = d - self.model.tokens_to_residual_directions(incorrect_tokens)
        if d.ndim == 2:  # one direction per example: [B, D] -> broadcast over positions
            d = d[:, None, :]
        return (stack * d).sum(-1)
