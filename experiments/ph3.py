"""PH3: memory heads and context heads, found by path patching and pruned (Jin et al. 2024).

The paper (arXiv 2402.18154; methods.md section 3) studies prompts where a context asserts an
object that conflicts with what the model memorised. Some attention heads ("memory heads") push the
memorised answer, others ("context heads") push the context's; both sit in later layers. Pruning the
top context heads makes the model answer from memory more often, pruning the top memory heads makes
it follow the context more often: +44.0% memory use or +38.5% context use across eight LMs.

Steps, on the kg-6l organism (facts memorised in training; context prompts "the r of e is c . the r
of e is" were trained only where the context agrees with memory, names a never-stated pair, or is
about another pair, so a conflict is new to it):

1. Conflict prompts: a known fact (r, e) -> m and a context naming c != m. LD = logit(m) - logit(c)
   at the last token. Split into dev (choosing k) and test halves.
2. Path patching of every head's direct path to the logits (`patching.path_patching`, receivers the
   final residual; all other heads frozen) from two counterfactuals, which is our choice where the
   paper is unverified: the same prompt with another context object c' (a context head's output
   then pushes c' instead of c, so LD rises when its path is patched), and the same context about
   another entity e' (a memory head then recalls e's neighbour's fact instead of m, so LD falls).
   Context score = LD change in the first, memory score = minus the LD change in the second.
3. Prune (zero `attn.hook_z` at every position) the top-k heads of one class, for k = 1..K_MAX; k is
   the one that maximises the target rate on the dev half. Report the memory and context rates on
   the test half before and after.

Read in the report: the claims table, `head_scores.png` (memory and context scores per layer x
head), `pruning.png` (rates against k on the dev half) and `rates.csv`.

    jinterp experiment ph3 --out out/ph3 [--quick]
"""

from __future__ import annotations

import numpy as np

from experiments.data import kg
from jinterp import edits as E
from jinterp import metrics, patching
from jinterp.train import organisms

NAME = "ph3"
TITLE = "Cutting Off the Head Ends the Conflict: A Mechanism for Interpreting and Mitigating Knowledge Conflicts in Language Models (Jin et al. 2024)"
ORGANISM = "kg-6l"

PAPER_MEMORY_GAIN = 44.0  # the abstract: "↑44.0%" memory use, "↑38.5%" context use; read as percentage points here
PAPER_CONTEXT_GAIN = 38.5
K_MAX = 8


def dataset(model, seed: int, n: int):
    """n conflict prompts and their two counterfactuals: (tokens, context counterfactual, memory
    counterfactual, memorised answer ids, context answer ids)."""
    if model.tokenizer is None:
        raise ValueError("ph3 needs a model with a tokenizer (the prompts are built from words)")
    g = organisms.recipe(ORGANISM).graph()
    v = kg.Vocab(model.tokenizer, g.words)
    rng = np.random.default_rng(seed)
    N = g.table.shape[1]
    known = np.argwhere(g.known)
    r, e = known[rng.integers(len(known), size=n)].T
    m = g.table[r, e]
    c = (m + rng.integers(1, N, size=n)) % N  # context object != memory
    c2 = np.array([rng.choice(np.setdiff1d(np.arange(N), [a, b])) for a, b in zip(m, c)])  # another context object
    e2 = np.array([rng.choice(np.flatnonzero(g.known[rr] & (g.table[rr] != mm) & (g.table[rr] != cc) & (np.arange(N) != ee)))
                   for rr, ee, mm, cc in zip(r, e, m, c)])  # another known entity, whose fact is neither m nor c
    toks = v.ids([g.context_words(a, b, cc, a, b) for a, b, cc in zip(r, e, c)])
    ctx_cf = v.ids([g.context_words(a, b, cc, a, b) for a, b, cc in zip(r, e, c2)])
    mem_cf = v.ids([g.context_words(a, b, cc, a, b) for a, b, cc in zip(r, e2, c)])
    return toks, ctx_cf, mem_cf, v.entity_ids(g, m), v.entity_ids(g, c)


def rates(model, tokens, mem_ids, ctx_ids, edits=()) -> tuple[float, float]:
    """Fractions of prompts whose greedy next token is the memorised object, and the context's."""
    nxt = np.asarray(model(tokens, edits=edits, logits_at=[-1]))[:, -1].argmax(-1)
    return float(np.mean(nxt == mem_ids)), float(np.mean(nxt == ctx_ids))


def prune(heads, n_layers: int, n_heads: int):
    """One zero-ablation edit of attn.hook_z at every position for the given (layer, head) list, as
    a head mask (data), so every k shares one compiled program."""
    mask = np.zeros((n_layers, n_heads), bool)
    for l, h in heads:
        mask[l, h] = True
    return tuple(E.zero_ablate("attn.hook_z", layers=l, heads=mask[l]) for l in range(n_layers))


def run(model, report, *, batch: int | None = None, seed: int = 0, quick: bool = False) -> None:
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    n = batch or (128 if quick else 512)
    toks, ctx_cf, mem_cf, mem, ctx = dataset(model, seed, n)
    dev, test = np.arange(n // 2), np.arange(n // 2, n)
    ld = metrics.logit_diff(np.stack([mem, ctx], 1))
    base_ld = float(ld(model(toks)))
    m0, c0 = rates(model, toks[test], mem[test], ctx[test])
    report.number("n_prompts", n)
    report.number("logit_diff_memory_minus_context", base_ld)
    report.number("memory_rate_before", m0)
    report.number("context_rate_before", c0)
    report.section("Conflict prompts", (
        f"{n} prompts 'the r of e is c . the r of e is' where (r, e) is a memorised fact with object m != c (seed {seed}); "
        f"half for choosing k (dev), half for the rates (test). Before pruning, the greedy answer is the memorised "
        f"object in {m0:.1%} and the context's in {c0:.1%} of test prompts; mean logit(m) - logit(c) = {base_ld:.2f}."))

    # ---------------------------------------------------------------- path patching
    dev_ld = metrics.logit_diff(np.stack([mem, ctx], 1)[dev])
    base_dev = float(dev_ld(model(toks[dev])))
    pp = {name: np.asarray(patching.path_patching(model, toks[dev], new[dev], dev_ld, "resid", progress=False).values, np.float64)
          for name, new in (("context", ctx_cf), ("memory", mem_cf))}
    score = {"context": pp["context"] - base_dev, "memory": -(pp["memory"] - base_dev)}
    order = {k: [tuple(map(int, np.unravel_index(i, (L, H)))) for i in np.argsort(-s, axis=None)] for k, s in score.items()}
    report.figure("head_scores", [
        dict(values=score[k], row_labels=[f"L{l}" for l in range(L)], col_labels=[f"H{h}" for h in range(H)],
             title=f"{k} score (LD change)", xlabel="head", ylabel="layer") for k in ("memory", "context")],
        caption="path patching of each head's direct path to the logits (dev half)")
    report.table("heads", [dict(head=f"L{l}H{h}", layer=l, head_index=h, memory_score=score["memory"][l, h],
                                context_score=score["context"][l, h]) for l in range(L) for h in range(H)], max_rows=8)

    # ---------------------------------------------------------------- pruning, k on dev
    curves = {}
    for cls, target in (("context", 0), ("memory", 1)):  # pruning context heads should raise memory use, and vice versa
        curves[cls] = [rates(model, toks[dev], mem[dev], ctx[dev], prune(order[cls][:k], L, H))[target] for k in range(1, K_MAX + 1)]
    rows = []
    for cls, target, paper in (("context", 0, PAPER_MEMORY_GAIN), ("memory", 1, PAPER_CONTEXT_GAIN)):
        k = int(np.argmax(curves[cls])) + 1
        heads = order[cls][:k]
        m1, c1 = rates(model, toks[test], mem[test], ctx[test], prune(heads, L, H))
        gain = 100 * ((m1 - m0) if target == 0 else (c1 - c0))
        what = "memory" if target == 0 else "context"
        rows.append(dict(pruned=f"top-{k} {cls} heads", heads=" ".join(f"L{l}H{h}" for l, h in heads), memory_rate=m1,
                         context_rate=c1, gain_points=gain))
        report.number(f"pruned_{cls}_heads", [f"L{l}H{h}" for l, h in heads])
        before = m0 if target == 0 else c0
        room = "" if 100 * (1 - before) >= paper / 2 else (
            f"; it cannot hold here: the {what} rate is {before:.0%} before pruning, so it cannot rise by {paper / 2:.1f} points")
        if gain < paper / 2 and not room:
            room = "; pruning.png shows the rate for every k on the dev half"
        report.claim(f"pruning {cls} heads raises {what} use", f"+{paper}%", f"{gain:+.1f} points (k={k})", gain >= paper / 2,
                     f"{what} rate on the test half before/after; holds at half the paper's gain or more (the paper's % read "
                     f"as points){room}")
        mean_layer = float(np.mean([l for l, _ in heads]))
        early = "" if mean_layer >= (L - 1) / 2 else (
            "; path patching lets MLPs recompute (Wang et al.), so heads that bring the entity or the context object to "
            "the last position, where later MLPs look the fact up, score highest: here those act early")
        report.claim(f"top {cls} heads sit in later layers", "later layers", f"mean layer {mean_layer:.1f} of 0..{L - 1}",
                     mean_layer >= (L - 1) / 2, f"holds if the pruned heads' mean layer is in the upper half{early}")
    report.table("rates", [dict(pruned="none", heads="", memory_rate=m0, context_rate=c0, gain_points=0.0)] + rows)
    report.figure("pruning", _curves(curves), caption="dev-half rates against the number of pruned heads")
    report.arrays("ph3", memory_score=score["memory"], context_score=score["context"],
                  prune_context_curve=np.asarray(curves["context"]), prune_memory_curve=np.asarray(curves["memory"]))


def _curves(curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    k = np.arange(1, K_MAX + 1)
    ax.plot(k, np.asarray(curves["context"]) * 100, "o-", label="memory rate, pruning context heads")
    ax.plot(k, np.asarray(curves["memory"]) * 100, "s-", label="context rate, pruning memory heads")
    ax.set_xlabel("k (heads pruned)")
    ax.set_ylabel("% of dev prompts")
    ax.legend(fontsize=7)
    return fig
