"""Path patching (Wang et al. 2023, Algorithm 1; methods.md section 7) as one compiled sweep over sender heads.

Public through `jinterp.patching.path_patching`; split from patching.py by job.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jinterp import edits as E
from jinterp.engine import PatchingError, Runner, sweep_grid
from jinterp.results import Labelled, axis_labels



@dataclasses.dataclass(frozen=True)
class PathPatchCell:
    """Sender (layer, head): run orig with every head's z frozen to orig except the sender's, set
    to its value on the new input; record the receivers' q/k/v (or take the final residual); then
    run orig with only the receivers patched to the recorded values."""

    receivers: tuple  # ((layer, head, "q"|"k"|"v"), ...) or () for the final residual
    use_sender_pos: bool
    use_receiver_pos: bool
    freeze: str = "all"  # "all": every position (Wang et al.); "position": the sender's positions only
    freeze_mlps: bool = False

    def step2_edits(self, cell, data):
        fpos = data["sender_pos"] if self.freeze == "position" else None
        freeze = (E.patch("attn.hook_z", data["orig_z"], pos=fpos, per_layer=True),)
        if self.freeze_mlps:
            freeze += (E.patch("hook_mlp_out", data["orig_mlp"], pos=fpos, per_layer=True),)
        sender = E.patch("attn.hook_z", data["new_z"], layers=cell["layer"][None], heads=cell["head"][None],
                         pos=data["sender_pos"] if self.use_sender_pos else None, per_layer=True)
        return freeze + (sender,)

    def __call__(self, cell, data, runner: Runner):
        edits = self.step2_edits(cell, data)
        if not self.receivers:
            return runner.score(edits)
        names = {}
        for l, h, kind in self.receivers:
            names.setdefault(f"attn.hook_{kind}", set()).add(l)
        names = {k: tuple(sorted(v)) for k, v in names.items()}
        acts = runner.record(edits, names)
        patched = tuple(
            E.patch(f"attn.hook_{kind}", acts[f"attn.hook_{kind}"][names[f"attn.hook_{kind}"].index(l)], layers=[l], heads=[h],
                    pos=data["receiver_pos"] if self.use_receiver_pos else None)
            for l, h, kind in self.receivers
        )
        return runner.score(patched, start=min(l for l, _, _ in self.receivers))

    def bounds(self, cell, data, n_layers, n_prompt):
        return cell["layer"], jnp.int32(0)


def path_patching(
    model,
    orig_tokens,
    new_tokens,
    metric,
    receivers="resid",
    *,
    sender_pos=None,
    receiver_pos=None,
    freeze: str = "all",
    freeze_mlps: bool = False,
    attention_mask=None,
    **kw,
) -> Labelled:
    """Path patching from every sender head to `receivers`, in one sweep -> [n_layers, n_heads].

    receivers: "resid" (the final residual stream, i.e. the direct path to the logits plus paths
    through MLPs), or a list of (layer, head, "q" | "k" | "v") receiver inputs; for "k" and "v" the
    head is a key/value head, shared by its query group on GQA models. sender_pos /
    receiver_pos restrict the patch to positions (an int list, or one per example as [batch, k]).
    The value is the metric of the final run (use metrics.normalized to express it relative to
    the orig and new runs). Senders at or after a receiver's layer have no path to it and score the
    orig run's metric.

    freeze: where step 2 holds the other heads' outputs at orig: "all" positions (Wang et al.), or
    only at sender_pos ("position", as Merullo et al.'s circuit_reuse code does), so the sender's
    effect also flows through other heads at later positions. freeze_mlps: hold hook_mlp_out too.
    """
    cfg = model.config
    orig, mask = model.prepare_inputs(orig_tokens, attention_mask)
    new, _ = model.prepare_inputs(new_tokens, None)
    if orig.shape != new.shape:
        raise PatchingError(f"orig tokens {list(orig.shape)} and new tokens {list(new.shape)} differ in shape")
    if freeze not in ("all", "position"):
        raise PatchingError(f"freeze must be 'all' (every position) or 'position' (the sender's positions only), got {freeze!r}")
    if freeze == "position" and sender_pos is None:
        raise PatchingError("freeze='position' freezes the other heads only at the sender's positions; pass sender_pos (e.g. [-1])")
    rec = ()
    if receivers != "resid":
        rec = []
        for r in receivers:
            l, h, kind = r
            if kind not in ("q", "k", "v"):
                raise PatchingError(f"receiver kind must be 'q', 'k' or 'v', got {kind!r}")
            if not 0 <= l < cfg.n_layers:
                raise PatchingError(f"receiver layer {l} out of range 0..{cfg.n_layers - 1}")
            nh = cfg.n_heads if kind == "q" else cfg.n_kv_heads
            if not 0 <= h < nh:
                raise PatchingError(f"receiver {kind} head {h} out of range 0..{nh - 1}")
            rec.append((int(l), int(h), kind))
        rec = tuple(rec)
    zname = lambda n: n.endswith("attn.hook_z")
    oname = (lambda n: zname(n) or n.endswith("hook_mlp_out")) if freeze_mlps else zname
    _, oc = model.run_with_cache(orig, names=oname, attention_mask=mask)
    _, nc = model.run_with_cache(new, names=zname, attention_mask=mask)
    data = {"orig_z": oc.stack("attn.hook_z"), "new_z": nc.stack("attn.hook_z")}
    if freeze_mlps:
        data["orig_mlp"] = oc.stack("hook_mlp_out")
    for name, p in (("sender_pos", sender_pos), ("receiver_pos", receiver_pos)):
        if p is not None:
            data[name] = E.selector(p)
    fn = PathPatchCell(rec, sender_pos is not None, receiver_pos is not None, freeze, bool(freeze_mlps))
    axes = {a: axis_labels(model, a) for a in ("layer", "head")}
    return sweep_grid(model, orig, axes, fn, data=data, metric=metric, attention_mask=mask, name="path patching", **kw)
