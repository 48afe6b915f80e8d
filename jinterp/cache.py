"""ActivationCache: recorded activations, indexed by TransformerLens names.

Block activations are stored stacked over the layers that were requested, so
`cache["blocks.3.hook_resid_pre"]` is a slice and `cache.stack("hook_resid_pre")` the whole
[n_layers, batch, ...] array without copies.
"""

from __future__ import annotations

from collections.abc import Mapping

from jinterp import sites as S
from jinterp.config import Config


class ActivationCache(Mapping):
    def __init__(self, cfg: Config, acts: dict, layers: dict, model=None, tokens=None, attention_mask=None):
        self.cfg = cfg
        self._acts = acts  # local name -> array ([n_sel, ...] for block sites)
        self._layers = layers  # local name -> tuple of layers, or None for global sites
        self.model = model
        self.tokens = tokens  # the input tokens [batch, pos] (None if unknown)
        self.attention_mask = attention_mask

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
