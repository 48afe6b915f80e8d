"""Interventions on attribution-graph features: set transcoder features and read the new logits.

    logits = saes.intervene(model, transcoders, tokens, [(1, 5, 17, 0.0),     # ablate L1 F17 at position 5
                                                       (0, 3, 4, 2 * a)])     # steer: twice its activation a

As circuit-tracer's `ReplacementModel.feature_intervention` (0.5, default arguments): every MLP
output is spliced as transcoder output plus error term, so with no intervention the logits are
the model's own; a feature set at (layer, pos) changes that layer's MLP output by
(value - current activation) * W_dec[feature]; the effect propagates through every later layer
(their MLPs run on the edited stream, and a later intervened feature's current activation is
re-encoded from it); attention patterns are frozen at the clean run's (freeze_attention=True, as
circuit-tracer's default) or recomputed (False). Unlike circuit-tracer, position 0's activations
are not zeroed first: setting a feature there changes it by (value - its activation) like anywhere
else. The splice is `saes.splice_transcoder`, two edits per model, so everything runs as the
model's own compiled forward. A cross-layer transcoder's feature set at layer i changes every
layer l >= i it writes, by (value - current activation) * W_dec_i[feature, l - i]; no block can
apply that alone, so the changes are found by re-running the model (one run per intervened layer;
one per layer with keep_error=False) and applied as per-layer edits.

Graph features come as `graph.active_features[graph.selected_features]` rows (layer, pos, feature)
and their activations as `graph.activation_values[graph.selected_features]`.
"""

from __future__ import annotations

import numpy as np

from jinterp import edits as E
from jinterp import sites as S
from jinterp.saes.dictionary import CrossLayerTranscoder
from jinterp.saes.graph import transcoder_set
from jinterp.saes.replacement import OUT_SITE
from jinterp.saes.splicing import splice_transcoder


def _interventions(interventions, n_layers: int, n_pos: int, d_sae: int) -> list:
    rows = []
    for r in interventions:
        try:
            layer, pos, feature, value = r
        except (TypeError, ValueError) as e:
            raise ValueError(f"interventions are (layer, pos, feature, value) tuples, got {r!r}") from e
        for name, v in (("layer", layer), ("pos", pos), ("feature", feature)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"intervention {r!r}: {name} must be an int, got {type(v).__name__}")
        if not 0 <= layer < n_layers:
            raise ValueError(f"intervention {r!r}: layer {layer} out of range 0..{n_layers - 1}")
        if not -n_pos <= pos < n_pos:
            raise ValueError(f"intervention {r!r}: position {pos} outside the {n_pos}-token prompt")
        if not 0 <= feature < d_sae:
            raise ValueError(f"intervention {r!r}: feature {feature} out of range 0..{d_sae - 1}")
        try:
            value = float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"intervention {r!r}: value must be a number") from e
        if not np.isfinite(value):
            raise ValueError(f"intervention {r!r}: value is NaN or inf")
        rows.append((int(layer), int(pos) % n_pos, int(feature), value))
    keys = [r[:3] for r in rows]
    dup = [k for k in dict.fromkeys(keys) if keys.count(k) > 1]
    if dup:
        raise ValueError(f"interventions set (layer, pos, feature) {dup[0]} more than once; give each one value")
    return rows


def _decoder(tc, layer: int, feature: int, n_layers: int) -> np.ndarray:
    """[L, D]: the feature's decoder row at each output layer (a per-layer transcoder writes only its own)."""
    out = np.zeros((n_layers, tc.d_out), np.float32)
    if isinstance(tc, CrossLayerTranscoder):
        out[layer:] = np.asarray(tc.W_dec[layer][feature], np.float32)
    else:
        out[layer] = np.asarray(tc.W_dec[layer, feature], np.float32)
    return out


def _moved(tc, f, rows, L, shape):
    """[L, B, P, D]: every MLP output's change when the (layer, pos, feature) activations f [B, P, L, F]
    are set to the rows' values: (value - f) times the feature's decoder row at each layer it writes."""
    delta = np.zeros(shape, np.float32)
    for layer, pos, feature, value in rows:
        a = f[:, pos, layer, feature]  # [B]
        delta[:, :, pos] += (value - a)[None, :, None] * _decoder(tc, layer, feature, L)[:, None, :]
    return delta


def _input_stack(cache, site, L):
    return np.stack([np.asarray(cache[f"blocks.{l}.{site}"], np.float32) for l in range(L)])  # [L, B, P, D]


def _constrained(model, tc, toks, rows) -> list:
    """Direct effects: patterns, norm scales and MLP outputs at their clean values, the MLP outputs
    moved by (value - clean activation) * W_dec at the intervened (layer, pos) (at every layer a
    cross-layer feature writes)."""
    cfg = model.config
    L = cfg.n_layers
    if tc.W_skip is not None:
        raise ValueError("constrained=True is not implemented for skip transcoders (the skip path would have to stay "
                         "live); use constrained=False")
    scales = [s for s in S.block_sites(cfg) if s.endswith("hook_scale")]
    names = [f"blocks.{l}.{s}" for s in ["attn.hook_pattern", tc.site, OUT_SITE] + scales for l in range(L)]
    names += [s for s in S.global_sites(cfg) if s.endswith("hook_scale")]
    _, cache = model.run_with_cache(toks, names=names)
    per_layer = lambda s: _input_stack(cache, s, L)
    edits = [E.patch(s, per_layer(s), per_layer=True) for s in ["attn.hook_pattern"] + scales]
    edits += [E.patch(s, np.asarray(cache[s])) for s in S.global_sites(cfg) if s.endswith("hook_scale")]
    out = per_layer(OUT_SITE)  # [L, B, P, D]
    f = np.asarray(tc.encode(np.moveaxis(per_layer(tc.site), 0, 2)))  # [B, P, L, F] the clean activations
    return edits + [E.patch(OUT_SITE, out + _moved(tc, f, rows, L, out.shape), per_layer=True)]


def _cross_layer(model, tc, toks, rows, edits, keep_error) -> list:
    """A cross-layer transcoder's splice, which no single block can apply (a feature writes later layers):
    the MLP outputs' changes (keep_error) or the transcoder's outputs (not) as per-layer values, found
    by re-running the model until they are exact: one run per intervened layer (the lowest is exact
    after the first run, the next after the second, ...), or one per layer for the replacement model."""
    L = model.config.n_layers
    n_runs = len({r[0] for r in rows}) if keep_error else L
    value = None

    def spliced(v):
        return edits + ([] if v is None else [(E.steer if keep_error else E.patch)(OUT_SITE, v, per_layer=True)])

    for _ in range(n_runs):
        _, cache = model.run_with_cache(toks, names=[f"blocks.{l}.{tc.site}" for l in range(L)], edits=spliced(value))
        x = np.moveaxis(_input_stack(cache, tc.site, L), 0, 2)  # [B, P, L, D]
        f = np.array(tc.encode(x))
        if keep_error:
            value = _moved(tc, f, rows, L, (L,) + x.shape[:2] + (tc.d_out,))
        else:
            for layer, pos, feature, v in rows:
                f[:, pos, layer, feature] = v
            y = np.array(tc.decode(f))  # an owned copy, not a view of a jax buffer
            if tc.W_skip is not None:
                y = y + np.einsum("bpld,lde->bple", x, np.asarray(tc.W_skip, np.float32))
            value = np.ascontiguousarray(np.moveaxis(y, 2, 0))
    return spliced(value)


def intervention_edits(model, transcoders, tokens, interventions, *, freeze_attention: bool = True,
                       keep_error: bool = True, constrained: bool = False) -> list:
    """The edits `intervene` runs with (module docstring): the clean attention patterns (when
    frozen) and the transcoder splice with the interventions (or, constrained, the frozen model)."""
    tc, _ = transcoder_set(transcoders, model)
    toks, mask = model.prepare_inputs(tokens)
    if mask is not None:
        raise ValueError("intervene takes prompts of one length (no padding)")
    rows = _interventions(interventions, model.config.n_layers, toks.shape[1], tc.d_sae)
    if constrained:
        if not keep_error:
            raise ValueError("constrained=True freezes every MLP output at its clean value (error included); "
                             "keep_error=False does not apply")
        return _constrained(model, tc, toks, rows)
    edits = []
    if freeze_attention:
        L = model.config.n_layers
        names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
        _, cache = model.run_with_cache(toks, names=names)
        pattern = np.stack([np.asarray(cache[n]) for n in names])  # [L, B, H, P, P]
        edits.append(E.patch("attn.hook_pattern", pattern, per_layer=True))
    if isinstance(tc, CrossLayerTranscoder):
        return _cross_layer(model, tc, toks, rows, edits, keep_error)
    return edits + splice_transcoder(tc, set_features=rows, keep_error=keep_error)


def intervene(model, transcoders, tokens, interventions, *, freeze_attention: bool = True, keep_error: bool = True,
              constrained: bool = False):
    """Logits ([P, V] for tokens [P]; [B, P, V] for [B, P]) with transcoder features set
    (module docstring). transcoders: the per-layer set the graph was built with (one per layer,
    writing hook_mlp_out), or a CrossLayerTranscoder. interventions: (layer, pos, feature, new_value) tuples, applied to every
    prompt of the batch; 0 ablates, a scaled activation steers. keep_error=False runs the pure
    replacement model (every MLP replaced by its transcoder) instead. constrained=True keeps only
    direct effects (circuit-tracer's constrained_layers over every layer): attention patterns, norm
    scales and MLP outputs frozen at the clean run's, each set feature moving its layer's MLP output
    by (value - clean activation) * W_dec, so the change reaches later nodes through the residual
    stream and attention only; the graph's edges predict it exactly (doubling feature s changes
    demeaned logit k by A[k, s])."""
    if isinstance(interventions, tuple) and len(interventions) == 4 and not isinstance(interventions[0], (tuple, list)):
        raise ValueError("interventions is a list of (layer, pos, feature, value) tuples; wrap a single one in a list")
    texts = isinstance(tokens, (list, tuple)) and len(tokens) > 0 and isinstance(tokens[0], str)
    single = isinstance(tokens, str) or (np.ndim(tokens) == 1 and not texts)
    edits = intervention_edits(model, transcoders, tokens, interventions, freeze_attention=freeze_attention,
                               keep_error=keep_error, constrained=constrained)
    logits = model(tokens, edits=edits)
    return logits[0] if single else logits
