"""Held-out metrics of trained dictionaries (L0, explained variance, CE loss recovered when spliced),
and `TrainedDictionaries`, what `train.fit` returns (its evaluate and save methods)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import edits as E
from jinterp.saes import batches as TB
from jinterp.saes.dictionary import Dictionary
from jinterp.saes.formats import DictionaryError
from jinterp.saes.saelens import save_circuit_tracer, save_saelens


def site_names(cfg, site, out_site):
    """The site (and output site) at every layer: one recorded program serves any choice of layers."""
    return [f"blocks.{l}.{s}" for l in range(cfg.n_layers) for s in dict.fromkeys((site, out_site))]


def _nll(logits, tokens, valid):
    """(sum, count) of the next-token losses whose input and target are both real (valid [B, P-1])."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return float(jnp.where(valid, nll, 0.0).sum()), int(valid.sum())


def evaluate(model, dictionary: Dictionary, tokens, *, attention_mask=None, loss_mask=None, skip_bos: bool = True,
             batch_size: int = 64) -> dict:
    """Held-out metrics of each layer's dictionary on `tokens` [N, P]: {layer: {...}} with

    l0                  mean number of active features per token
    explained_variance  1 - sum |y - y_hat|^2 / sum |y - mean y|^2 (y: the site for an SAE, the
                        transcoder's output site for a transcoder)
    ce_clean, ce_zero_ablated, ce_spliced   mean next-token loss: the clean model; the site (an
                        SAE's, or a transcoder's output site) zero-ablated at that layer; the site
                        replaced by the dictionary's output (an SAE: `splice(sae, keep_error=False)`;
                        a transcoder: its output site patched with the prediction from the clean
                        input, which is exact because the input is upstream of the output)
    ce_loss_recovered   (ce_zero_ablated - ce_spliced) / (ce_zero_ablated - ce_clean)
    dead_fraction       fraction of features that fire on none of these tokens

    attention_mask [N, P] (1 real, 0 padding; rows of different lengths): padded positions are left
    out of every number (the CE losses count a prediction when its input and target token are both
    real), never ablated or spliced, and the model's forward sees the mask. loss_mask [N, P-1]: the
    next-token predictions the CE numbers count (prediction t is of token t+1), e.g. only the answers
    of an organism trained on its answers alone (default: every one, padding aside). With skip_bos, each
    row's first real token (BOS) is left out of l0 / explained variance / dead_fraction and neither
    ablated nor spliced (as in training). Rows are processed in batches of `batch_size`; the CE
    numbers are token-weighted means over all of them."""
    from jinterp.saes.splicing import splice

    d = dictionary
    layers = d.layers if d.stacked else (d.layer,)
    toks = np.asarray(tokens)
    if toks.ndim != 2:
        raise ValueError(f"tokens must be [N, pos], got shape {toks.shape}")
    mask = TB.check_mask(attention_mask, toks.shape, "held-out set")
    if loss_mask is not None:
        loss_mask = np.asarray(loss_mask)
        if loss_mask.shape != (toks.shape[0], toks.shape[1] - 1):
            raise ValueError(f"loss_mask has shape {loss_mask.shape} but must be [N, P-1] = "
                             f"{(toks.shape[0], toks.shape[1] - 1)}"
                             ": one entry per next-token prediction (True where the CE numbers count it)")
        loss_mask = loss_mask.astype(bool)
        real = np.ones(toks.shape, bool) if mask is None else mask
        if not (loss_mask & real[:, 1:] & real[:, :-1]).any():
            raise ValueError("no next-token prediction to measure the CE on: loss_mask (with attention_mask) "
                             "selects none")
    site_out = d.out_site or d.site
    acc = {l: {"l0": 0.0, "err": 0.0, "sum_y": 0.0, "sum_y2": 0.0, "n": 0, "ce_zero": 0.0, "ce_spliced": 0.0,
              "fired": 0}
           for l in layers}
    ce_clean, n_pred = 0.0, 0
    for i in range(0, len(toks), batch_size):
        mb = None if mask is None else mask[i:i + batch_size]
        tb, m = model.prepare_inputs(toks[i:i + batch_size], mb)
        m = jnp.ones(tb.shape, bool) if m is None else m  # always a mask: padded or not, one program per shape
        kp = TB.keep(mb, tb.shape, skip_bos)
        real = np.ones(tb.shape, bool) if mb is None else mb
        valid = real[:, 1:] & real[:, :-1]
        valid = jnp.asarray(valid if loss_mask is None else valid & loss_mask[i:i + batch_size])
        pos = jnp.asarray(kp)

        def nll(edits=()):
            return _nll(model(tb, m, edits=edits), tb, valid)

        logits, cache = model.run_with_cache(tb, names=site_names(model.config, d.site, site_out), attention_mask=m)
        s, c = _nll(logits, tb, valid)
        ce_clean += s
        n_pred += c
        for l in layers:
            one = d[l] if d.stacked else d
            x = cache[f"blocks.{l}.{d.site}"].astype(jnp.float32)
            y = cache[f"blocks.{l}.{site_out}"].astype(jnp.float32)
            f = one.encode(x)
            y_hat = one(x)
            yf, fk = y[kp], f[kp]  # [n_kept, d_out], [n_kept, d_sae]
            a = acc[l]
            a["l0"] += float((fk > 0).sum())
            a["fired"] = a["fired"] | np.asarray((fk > 0).any(0))
            a["err"] += float(((yf - y_hat[kp]) ** 2).sum())
            a["sum_y"] = a["sum_y"] + np.asarray(yf.sum(0), np.float64)
            a["sum_y2"] += float((yf.astype(jnp.float32) ** 2).sum())
            a["n"] += yf.shape[0]
            if one.is_transcoder:
                zero = E.zero_ablate(site_out, layers=l, pos=pos)
                spl = E.patch(site_out, y_hat.reshape(y.shape), layers=l, pos=pos)
            else:
                zero = E.zero_ablate(d.site, layers=l, pos=pos)
                # layer=None, layers=l: the layer is a leaf of the edit, so every layer shares one program
                spl = splice(dataclasses.replace(one, layer=None), keep_error=False, pos=pos, layers=l)
            a["ce_zero"] += nll([zero])[0]
            a["ce_spliced"] += nll([spl])[0]
    out = {}
    ce_clean /= max(n_pred, 1)
    for l in layers:
        a = acc[l]
        if a["n"] == 0:
            raise ValueError("no tokens to evaluate on"
                             + (" (with skip_bos=True a row needs 2 real tokens)" if skip_bos else ""))
        var = a["sum_y2"] - float((np.asarray(a["sum_y"]) ** 2).sum()) / a["n"]
        ce_zero, ce_spl = a["ce_zero"] / max(n_pred, 1), a["ce_spliced"] / max(n_pred, 1)
        out[int(l)] = {
            "l0": a["l0"] / a["n"],
            "explained_variance": 1.0 - a["err"] / max(var, 1e-30),
            "ce_clean": ce_clean,
            "ce_zero_ablated": ce_zero,
            "ce_spliced": ce_spl,
            "ce_loss_recovered": (ce_zero - ce_spl) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            "dead_fraction": 1.0 - float(np.mean(a["fired"])),
        }
    return out


@dataclasses.dataclass
class TrainedDictionaries:
    """What `fit` returns. `dictionary` is the stacked Dictionary (leaves [L, ...], `layers`), in the
    model's units (the training normalisation is folded in). `history` holds "step" [T] and, each
    [T, L], "loss", "mse" (normalised units), "l0", "explained_variance" (on the training batch) and
    "dead_fraction" (fraction of features that have not fired in the last `dead_window` steps).
    `steps_since_fired` [L, d_sae] is the dead-feature counter at the end; `metrics` is filled by
    `evaluate`."""

    dictionary: Dictionary
    history: dict
    steps_since_fired: np.ndarray
    config: dict
    seconds: float
    model_name: str | None = None
    context_size: int | None = None
    metrics: dict | None = None

    @property
    def layers(self) -> tuple:
        return self.dictionary.layers

    def __getitem__(self, layer: int) -> Dictionary:
        return self.dictionary[layer]

    def dead_fraction(self, window: int | None = None) -> np.ndarray:
        """[L] fraction of features that have not fired in the last `window` steps (default: the run's dead_window)."""
        w = self.config["dead_window"] if window is None else window
        return (self.steps_since_fired >= w).mean(-1)

    def evaluate(self, model, tokens, *, attention_mask=None, loss_mask=None, batch_size: int = 64) -> dict:
        """Held-out metrics per layer; also stored in `self.metrics`. See `evaluate`."""
        self.metrics = evaluate(model, self.dictionary, tokens, attention_mask=attention_mask, loss_mask=loss_mask,
                                skip_bos=self.config["skip_bos"], batch_size=batch_size)
        return self.metrics

    def save(self, path) -> Path:
        """One SAELens directory per layer, `path/blocks.{l}.{site}/`, and `path/metrics.json`
        (the fit's config, its history and, if `evaluate` ran, the held-out metrics). Refuses a
        non-empty `path`."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise DictionaryError(f"{path} exists and is not empty; choose a new directory (nothing was overwritten)")
        path.mkdir(parents=True, exist_ok=True)
        for l in self.layers:
            d = self[l]
            save_saelens(d, path / d.site_name, model_name=self.model_name, context_size=self.context_size)
        record = {
            "config": self.config,
            "layers": list(self.layers),
            "seconds": self.seconds,
            "history": {k: np.asarray(v).tolist() for k, v in self.history.items()},
            "final_dead_fraction": self.dead_fraction().tolist(),
            "metrics": None if self.metrics is None else {str(k): v for k, v in self.metrics.items()},
        }
        (path / "metrics.json").write_text(json.dumps(record, indent=1))
        return path

    def save_circuit_tracer(self, path, *, metadata: dict | None = None) -> Path:
        """All layers as circuit-tracer per-layer transcoders (`save_circuit_tracer`): path/config.yaml
        and path/layer_{l}.safetensors; a transcoder with architecture relu or jumprelu only."""
        return save_circuit_tracer(self.dictionary, path, model_name=self.model_name, metadata=metadata)
