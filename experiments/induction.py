"""Induction heads (Elhage et al. 2021; Olsson et al. 2022): which heads copy in context, how they are wired, and what breaks without them.

The question. A transformer predicts the second copy of a random token sequence almost perfectly
although nothing in its weights could know the sequence: it learns *in context*. Elhage et al.
("A Mathematical Framework for Transformer Circuits", 2021) traced this in two-layer models to a
two-head circuit: a *previous-token head* in an early layer writes "the token before me was A" into
each position; an *induction head* in a later layer uses that as its key (K-composition), so that
from a later A it attends to the token that followed the earlier A and copies it. Olsson et al.
("In-context learning and induction heads", 2022) argue these heads are the main source of
in-context learning: knocking them out removes the model's advantage on repeated text.

The steps, each one compiled call over the whole dataset (no loop over examples):

1. Data: rows [BOS, w1..wn, w1..wn] of random tokens of the model's vocabulary (the bundled
   organism's generator, `recipe("induction-2l").induction_batch`). The first half is unpredictable;
   the repeated half is predictable only by induction.
2. Per-head attention scores (`detect.head_scores`): previous-token, duplicate-token and induction
   scores, the attention mass each head puts on its target keys. A head scoring above
   SCORE_THRESHOLD is classified as that kind of head.
3. Composition (`circuits.composition_scores`): Q-, K- and V-composition between every pair of heads
   in different layers, from the weights alone.
4. Ablation (`edits.scale` + `edits.steer` on `attn.hook_z`, the head mask as data, so every
   condition reuses one compiled program): mean-ablate the induction heads, the previous-token
   heads, and as a control as many heads that are neither, and compare the per-position loss with
   the clean run. `patching.head_ablation` ablates every head on its own in one compiled sweep.

What to look at in the report: the claims table (the papers' statements, our numbers, whether each
holds and by which criterion); `head_scores.png` (the previous-token heads light up in an early
layer, the induction heads later); `composition.png` (the K panel should single out the previous-token
-> induction pairs); `loss_by_position.png` (clean loss drops at the start of the repeated half; with
the induction heads ablated it stays up at the first-half level). Tables are CSV, raw arrays in
`induction.npz`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import circuits, detect, edits, patching
from jinterp.train import organisms

NAME = "induction"
TITLE = "Induction heads (Elhage et al. 2021, Olsson et al. 2022)"
ORGANISM = "induction-2l"

SEG = 20  # tokens per copy
SCORE_THRESHOLD = 0.4  # a head is classified as a kind when it puts >= 40% of its attention on the target keys
NEAR = 0.75  # "near the first-half loss": the ablation removes at least 75% of the in-context gain
PREV_REMOVES = 0.5  # the previous-token ablation removes at least half of the in-context gain
SMALL = 0.25  # a control effect is "small" when below a quarter of the induction ablation's effect
ABLATION = "mean"  # mean over the batch at each position (zero: "zero")


@dataclasses.dataclass(frozen=True)
class SpanLoss:
    """Mean next-token loss of `targets` [batch, pos] predicted from positions start..stop-1."""

    targets: tuple
    start: int
    stop: int

    def reads(self, P, V):
        return tuple(range(self.start, self.stop)), None

    def __call__(self, logits):
        t = jnp.asarray(self.targets)[:, self.start + 1:self.stop + 1]
        lp = jax.nn.log_softmax(logits[:, self.start:self.stop].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(lp, t[..., None], -1).mean()


@jax.jit
def token_losses(logits, tokens):
    """Next-token loss [batch, pos - 1]: entry t is -log p(tokens[t + 1] | logits[t])."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]


def dataset(model, n: int, seg: int, seed: int) -> np.ndarray:
    """[n, 1 + 2 seg] rows [BOS, w1..w_seg, w1..w_seg] of random token ids of the model's vocabulary."""
    tok = model.tokenizer
    vocab = model.cfg.d_vocab if tok is None else min(model.cfg.d_vocab, len(tok))
    toks = organisms.recipe("induction-2l").induction_batch(np.random.default_rng(seed), n, seg, vocab)
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    toks[:, 0] = 0 if bos is None else bos
    return toks


def halves(nll: np.ndarray, seg: int) -> tuple[float, float]:
    """(first-half loss, repeated-half loss) from token_losses of [BOS, w1..w_seg, w1..w_seg] rows.
    The first half is targets w2..w_seg and w1 (entries 0..seg-1), the repeated half targets w2..w_seg of
    the second copy (entries seg+1..2seg-1); the second copy's w1 (entry seg) is not yet predictable."""
    nll = np.asarray(nll, np.float64)
    return float(nll[..., :seg].mean()), float(nll[..., seg + 1:2 * seg].mean())


def ablation_edits(mask: np.ndarray, source: np.ndarray) -> list:
    """Edits replacing z of the heads in `mask` [layer, head] by `source` [layer, pos, head, d_head].
    The mask is data, so every head set shares one compiled program."""
    m = jnp.asarray(mask, jnp.float32)[:, :, None]
    op = edits.SetWhere(edits.Value(jnp.asarray(source), ("layer", "pos", "head", "d_head")),
                        edits.Value(m, ("layer", "head", "d_head")))
    return [edits.edit("attn.hook_z", op)]


def _names(heads) -> str:
    return ", ".join(f"L{l}H{h}" for l, h in heads) or "none"


def run(model, report, *, batch: int | None = None, seed: int = 0, quick: bool = False) -> None:
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    n = batch or (32 if quick else 256)
    seg = min(SEG, (cfg.n_ctx - 1) // 2)
    toks = dataset(model, n, seg, seed)
    head_labels = [f"L{l}H{h}" for l in range(L) for h in range(H)]
    report.number("n_sequences", n)
    report.number("segment_length", seg)

    # ---------------------------------------------------------------- 1. the task, clean
    clean_nll = np.asarray(token_losses(model(toks), jnp.asarray(toks)))
    first, rep = halves(clean_nll, seg)
    report.number("loss_first_half", first)
    report.number("loss_repeated_half", rep)
    report.section("The task", (
        f"{n} rows of [BOS, {seg} random tokens, the same {seg} tokens again] (seed {seed}), token ids drawn "
        f"uniformly from the model's vocabulary. Next-token loss on the first half: {first:.3f} nats "
        f"(uniform guessing: {np.log(cfg.d_vocab):.3f}); on the repeated half: {rep:.3f}."))
    report.claim(
        "in-context learning: the repeated half is predicted better than the first half",
        "< 0 (Olsson: loss(500th) - loss(50th token) ~ -0.4 nats on text)", rep - first, rep < first,
        "repeated-half loss minus first-half loss; holds if negative")

    # ---------------------------------------------------------------- 2. head scores
    scores = detect.head_scores(model, toks)
    S = {k: np.asarray(v.values, np.float64) for k, v in scores.items()}
    prev = [(l, h) for l in range(L) for h in range(H) if S["previous_token"][l, h] > SCORE_THRESHOLD]
    ind = [(l, h) for l in range(L) for h in range(H) if S["induction"][l, h] > SCORE_THRESHOLD and l >= 1]
    for k, v in S.items():
        report.number(f"{k}_scores", np.round(v, 6))
    report.number("previous_token_heads", _names(prev))
    report.number("induction_heads", _names(ind))
    report.section("Which heads do what", (
        f"Attention mass on the detector's target keys (detect.head_scores), averaged over query rows that "
        f"have a target. A head scoring above {SCORE_THRESHOLD} is classified as that kind. "
        f"Previous-token heads: {_names(prev)}. Induction heads (layer >= 1): {_names(ind)}."))
    report.figure("head_scores", [
        dict(values=S[k], row_labels=[f"L{l}" for l in range(L)], col_labels=[f"H{h}" for h in range(H)],
             title=f"{k.replace('_', ' ')} score", cmap="Blues", center=False, xlabel="head", ylabel="layer")
        for k in S], caption="per-head attention scores on repeated random tokens", ncols=3)
    report.table("head_scores", [dict(head=f"L{l}H{h}", layer=l, head_index=h, **{k: S[k][l, h] for k in S})
                                 for l in range(L) for h in range(H)], max_rows=12)
    best_ind = np.unravel_index(np.argmax(np.where(np.arange(L)[:, None] >= 1, S["induction"], -np.inf)), (L, H)) if L > 1 else (0, 0)
    report.claim(
        "an induction head exists in a layer after the first", "yes (Elhage §induction heads)",
        f"L{best_ind[0]}H{best_ind[1]}: {S['induction'][best_ind]:.3f}", bool(ind),
        f"holds if some head in layer >= 1 has induction score > {SCORE_THRESHOLD}")
    first_ind_layer = min((l for l, _ in ind), default=None)
    earlier_prev = [p for p in prev if first_ind_layer is not None and p[0] < first_ind_layer]
    best_prev = np.unravel_index(np.argmax(S["previous_token"]), (L, H))
    report.claim(
        "a previous-token head exists in an earlier layer than the induction heads", "yes (Elhage §induction heads)",
        f"L{best_prev[0]}H{best_prev[1]}: {S['previous_token'][best_prev]:.3f}", bool(earlier_prev),
        f"holds if some head with previous-token score > {SCORE_THRESHOLD} sits in a layer before the first induction head")

    # ---------------------------------------------------------------- 3. composition
    comp = {k: np.asarray(circuits.composition_scores(model, k).values, np.float64) for k in "QKV"}
    flat = {k: v.reshape(L * H, L * H) for k, v in comp.items()}
    report.section("Composition", (
        "How strongly each head's output feeds another head's query (Q), key (K) or value (V) input, from the "
        "weights alone (circuits.composition_scores: ||W_OV(writer) M(reader)||_F / (||W_OV||_F ||M||_F)). "
        "An induction head reads the previous-token head's output through its keys."))
    report.figure("composition", [
        dict(values=flat[k], row_labels=head_labels, col_labels=head_labels, title=f"{k}-composition",
             cmap="Blues", center=False, xlabel="reader", ylabel="writer", annotate=L * H <= 8)
        for k in "QKV"], caption="composition scores, writer (row) -> reader (column), from the weights", ncols=3)
    pairs = [dict(kind=k, writer=f"L{a}H{b}", reader=f"L{c}H{d}", score=comp[k][a, b, c, d],
                  writer_is_prev=(a, b) in prev, reader_is_induction=(c, d) in ind)
             for k in "QKV" for a in range(L) for b in range(H) for c in range(a + 1, L) for d in range(H)]
    pairs.sort(key=lambda r: -r["score"])
    if pairs:
        top = pairs[0]
        report.table("composition", pairs, caption="Composition pairs, strongest first:", max_rows=10)
        pi = [(p, i) for p in prev for i in ind if p[0] < i[0]]
        k_pi = float(np.mean([comp["K"][p + i] for p, i in pi])) if pi else float("nan")
        others = [comp["K"][a, b, c, d] for a in range(L) for b in range(H) for c in range(a + 1, L) for d in range(H)
                  if ((a, b), (c, d)) not in pi]
        report.number("k_composition_prev_to_induction_mean", k_pi)
        report.number("k_composition_other_pairs_mean", float(np.mean(others)) if others else None)
        report.number("strongest_composition", f"{top['kind']} {top['writer']} -> {top['reader']}: {top['score']:.4f}")
        report.claim(
            "the strongest composition of all (Q, K, V; every pair) is K-composition from a previous-token head into an induction head",
            "K: previous-token -> induction (Elhage)", f"{top['kind']} {top['writer']} -> {top['reader']} ({top['score']:.3f})",
            top["kind"] == "K" and top["writer_is_prev"] and top["reader_is_induction"],
            "holds if the largest of all Q/K/V composition scores is K, its writer a previous-token head and its reader an induction head")

    # ---------------------------------------------------------------- 4. ablations
    _, cache = model.run_with_cache(toks, names=lambda nm: nm.endswith("attn.hook_z"))
    z = cache.stack("attn.hook_z")  # [L, B, P, H, dh]
    source = z.mean(axis=1) if ABLATION == "mean" else jnp.zeros_like(z[:, 0])
    del cache, z
    circuit = set(prev) | set(ind)
    ablate_ind = ind or [tuple(int(i) for i in best_ind)]  # nothing classified: the strongest candidate
    rest = [(l, h) for l in range(L) for h in range(H) if (l, h) not in circuit]
    rng = np.random.default_rng(seed + 1)
    control = [rest[i] for i in sorted(rng.choice(len(rest), min(len(rest), len(ablate_ind)), replace=False))] if rest else []
    conditions = {"clean": [], "induction heads": ablate_ind, "previous-token heads": prev, "other heads (control)": control}
    curves, losses = {}, {}
    for label, heads in conditions.items():
        if label != "clean" and not heads:
            continue
        mask = np.zeros((L, H), np.float32)
        for l, h in heads:
            mask[l, h] = 1.0
        nll = clean_nll if label == "clean" else np.asarray(token_losses(model(toks, edits=ablation_edits(mask, source)), jnp.asarray(toks)))
        curves[label] = nll.mean(0)
        losses[label] = halves(nll, seg)
    gain = first - rep  # what the model gains from the context

    def lost(label):  # fraction of the in-context gain the ablation removes
        return (losses[label][1] - rep) / gain if gain > 0 else float("nan")

    rows = [dict(ablated=label, heads=_names(conditions[label]), loss_first_half=f_, loss_repeated_half=r_,
                 gain_removed=(lost(label) if label != "clean" else 0.0)) for label, (f_, r_) in losses.items()]
    report.section("Ablations", (
        f"{ABLATION.capitalize()}-ablation of each head set's output z at every position ({ABLATION} over the "
        f"batch at each position), one compiled program for all sets (the head mask is data). 'gain removed' is "
        f"(ablated - clean repeated-half loss) / (first-half - repeated-half clean loss): 1 means the repeated "
        f"half is as unpredictable as the first. The control ablates as many heads that are neither "
        f"previous-token nor induction heads, drawn at random (seed {seed + 1})."))
    report.table("ablations", rows)
    for label, (f_, r_) in losses.items():
        key = label.split(" (")[0].replace(" ", "_").replace("-", "_")
        report.number(f"ablate_{key}_loss_first_half", f_)
        report.number(f"ablate_{key}_loss_repeated_half", r_)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    x = np.arange(1, clean_nll.shape[1] + 1)
    for label, c in curves.items():
        ax.plot(x, c, label=label, lw=1.6 if label == "clean" else 1.2)
    ax.axvline(seg + 1, color="grey", ls=":", lw=1)
    ax.set_xlabel("position of the predicted token (second copy starts after the dotted line)")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{model.name}: per-position loss, clean and with head sets {ABLATION}-ablated", fontsize=10)
    ax.legend(fontsize=8)
    report.figure("loss_by_position", fig, caption="mean next-token loss at each position")

    li = lost("induction heads")
    d_first = losses["induction heads"][0] - first
    d_rep = losses["induction heads"][1] - rep
    report.number("gain_removed_ablating_induction_heads", li)
    report.claim(
        "ablating the induction heads raises the repeated-half loss to near the first-half (unpredictable) loss",
        "ICL removed (Olsson, ablation arguments)",
        f"{losses['induction heads'][1]:.3f} vs {first:.3f} (gain removed {li:.2f})", li >= NEAR,
        f"heads {_names(ablate_ind)}; holds if the ablation removes >= {NEAR:.0%} of the in-context gain")
    report.claim(
        "the induction-head ablation acts on the repeated half, not the first half", "specific to repeated tokens",
        f"first half {d_first:+.3f} vs repeated half {d_rep:+.3f}", abs(d_first) < SMALL * d_rep,
        f"holds if |change of the first-half loss| < {SMALL} x the rise of the repeated-half loss")
    if prev:
        lp = lost("previous-token heads")
        report.number("gain_removed_ablating_previous_token_heads", lp)
        report.claim(
            "ablating the previous-token heads also breaks induction (they feed the induction heads' keys)",
            "yes (Elhage: K-composition circuit)", f"gain removed {lp:.2f}", lp >= PREV_REMOVES,
            f"heads {_names(prev)}; holds if the ablation removes >= {PREV_REMOVES:.0%} of the in-context gain")
    if control:
        lc = lost("other heads (control)")
        report.number("gain_removed_ablating_other_heads", lc)
        report.claim(
            "ablating as many other heads does not break induction", "control",
            f"gain removed {lc:.2f} vs {li:.2f}", lc < SMALL * li,
            f"heads {_names(control)}; holds if it removes < {SMALL} x the induction ablation's share")
    else:
        report.text("Control: every head of this model is a previous-token or induction head, so there is no "
                    "other head to ablate as a control.")

    # single-head ablations: one compiled sweep over every (layer, head)
    metric = SpanLoss(tuple(map(tuple, toks.tolist())), seg + 1, 2 * seg)
    single = patching.head_ablation(model, toks, metric, kind=ABLATION)
    single_v = np.asarray(single.values, np.float64)
    report.number("single_head_ablation_repeated_half_loss", np.round(single_v, 6))
    report.figure("single_head_ablation", [dict(
        values=single_v - rep, row_labels=[f"L{l}" for l in range(L)], col_labels=[f"H{h}" for h in range(H)],
        title="rise of the repeated-half loss, one head ablated", cmap="Reds", center=False, xlabel="head", ylabel="layer")],
        caption=f"{ABLATION}-ablating one head at a time (patching.head_ablation, one compiled sweep)")
    worst = np.unravel_index(np.argmax(single_v), (L, H))
    report.claim(
        "the single head whose ablation hurts the repeated half most is part of the circuit",
        "previous-token or induction head", f"L{worst[0]}H{worst[1]} (+{single_v[worst] - rep:.3f})",
        tuple(int(i) for i in worst) in circuit,
        "holds if the head with the largest single-head ablation effect is a classified previous-token or induction head")
    report.arrays("induction", tokens=toks, clean_token_loss=clean_nll, single_head_ablation=single_v,
                  **{f"score_{k}": v for k, v in S.items()}, **{f"composition_{k}": v for k, v in comp.items()},
                  **{f"curve_{k.split(' (')[0].replace(' ', '_').replace('-', '_')}": v for k, v in curves.items()})
