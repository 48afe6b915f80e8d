"""Hopping Too Late: two-hop queries fail when the second hop starts too late (Biran et al. 2024).

The paper (arXiv 2406.12775; methods.md section 1) asks how a model answers "the spouse of the
performer of Imagine is": it finds that the bridge entity (John Lennon) is resolved in early layers
at the last token of e1, and the second hop only later at the last position; in queries the model
gets wrong, the second hop starts too late for the layers left. Back-patching, writing a later
layer's hidden state at the last position into an earlier layer of a fresh pass on the same prompt,
gives the remaining layers a second chance: in up to 57% (v1) / 66% (EMNLP) of incorrect cases some
(source > target) pair makes the generation correct.

Steps, on the kg-6l organism (a knowledge graph of made-up entities; two-hop queries held out from
training, so the model composes two memorised facts it never saw composed):

1. Data: held-out two-hop queries "the r2 of the r1 of e1 is" with their first hop "the r1 of e1 is"
   -> e2 and second hop "the r2 of e2 is" -> e3. Greedy generation (N_NEW tokens) on all three;
   queries whose two single hops are both right are kept and split by whether the composed query's
   generation contains e3 (the paper's correct / incorrect subsets).
2. Back-patching (`patching.back_patching`): for every (source i, target j) layer pair, resid_post[i]
   at the last position into resid_post[j] at the same position of a fresh pass, then greedy
   generation with the edit on the prompt pass only. One compiled sweep over the L x L x examples
   grid. An example is fixed when some pair with i > j makes it correct; as a control, the same
   count over forward pairs (i < j: an earlier state written later).
3. Sublayer projection: each layer's attention and MLP output at the last position, through the
   final norm and the unembedding; a "hit" is rank 0 for e2 (attention) or for the model's own
   prediction (MLP). Logit lens on resid_post at e1's token and at the last position.
4. Attention knockout: the last position may not attend to e1's token in layers [l - W, l + W]
   (every head, prompt pass only); layer l is critical when the generation changes and is wrong.
5. Stages per example (the paper's analyze_results): hop 1 = first layer whose resid_post at e1
   decodes e2; information propagation = mean of (first critical knockout layer, first attention
   layer decoding e2 at the last position, first resid_post decoding e2 at the last position);
   hop 2 = first resid_post decoding e3 at the last position; extraction = first MLP layer whose top
   token is the prediction. Compared between correct and incorrect cases.
6. Patchscopes: resid_post[i] at e1's token written at "x" of the identity prompt
   "a = a , b = b , x =" into resid_post[j] (all i, j) or in place of x's embedding; which of e1,
   e2, e3 the next token names. The organism's vocabulary has no "x", so the placeholder is another
   random entity. Greedy (the paper samples three seeds), so the run is deterministic.

Read in the report: the claims table, `back_patching.png` (success per (source, target) on the
incorrect cases; the lower triangle is the back-patches), `stages.png`, `patchscopes.png`, and the
tables (per example in `examples.csv`).

    jinterp experiment hopping-too-late --out out/htl [--quick]
"""

from __future__ import annotations

import warnings

import jax
import numpy as np

from experiments.data import kg
from jinterp import arch, patching
from jinterp import edits as E
from jinterp import patchscopes as PS
from jinterp.train import organisms

NAME = "hopping-too-late"
TITLE = "Hopping Too Late: Exploring the Limitations of Large Language Models on Multi-Hop Queries (Biran et al. 2024)"
ORGANISM = "kg-6l"

N_NEW = 3  # greedy tokens generated (the organism answers one entity, then EOS; the paper: 10)
PAPER_FIXED = (0.57, 0.66)  # up to 57% (arXiv v1) / 66% (EMNLP abstract) of incorrect cases fixed
HALF = 0.5  # back-patching "holds" at half the paper's lower figure or more, and above the forward control
_unembed = jax.jit(arch.unembed, static_argnames=("cfg", "vocab"))


def dataset(model, seed: int, n: int | None):
    """The organism's graph and vocabulary, and n held-out two-hop triples (r1, r2, e1) (all if None).
    MissingWordError when the model's tokenizer does not hold the graph's words."""
    if model.tokenizer is None:
        raise ValueError("hopping-too-late needs a model with a tokenizer (the prompts are built from words)")
    g = organisms.recipe(ORGANISM).graph()
    v = kg.Vocab(model.tokenizer, g.words)
    ho = g.held_out_two_hop()
    if n is not None and n < len(ho):
        ho = ho[np.sort(np.random.default_rng(seed).choice(len(ho), n, replace=False))]
    return g, v, ho


def generated_contains(model, tokens, want, edits=()) -> tuple[np.ndarray, np.ndarray]:
    """Greedy N_NEW tokens after each prompt: (whether they contain `want` [n] before EOS, the tokens)."""
    out = np.asarray(model.generate(tokens, N_NEW, edits=edits, stop_at_eos=False))[:, tokens.shape[1]:]
    eos = model.tokenizer.eos_token_id
    upto = np.where((out == eos).any(1), (out == eos).argmax(1), out.shape[1])
    hit = np.array([w in row[:k] for row, k, w in zip(out, upto, want)])
    return hit, out


def first_layer(mask) -> np.ndarray:
    """[..., L] bool -> the first layer where True (NaN where never)."""
    m = np.asarray(mask)
    return np.where(m.any(-1), m.argmax(-1), np.nan).astype(float)


def ranks(logits, ids) -> np.ndarray:
    """Rank of token ids[b] in logits [..., B, V] (0 = top)."""
    lg = np.asarray(logits, np.float32)
    ids = np.broadcast_to(np.asarray(ids), lg.shape[:-1])
    tgt = np.take_along_axis(lg, ids[..., None], -1)
    return (lg > tgt).sum(-1)


def _nanmean(x, axis):
    """np.nanmean without the warning for all-NaN slices (NaN there: the stage never resolved)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis)


def run(model, report, *, batch: int | None = None, seed: int = 0, quick: bool = False) -> None:
    cfg = model.cfg
    L = cfg.n_layers
    g, v, trip = dataset(model, seed, batch or (96 if quick else None))
    r1, r2, e1 = trip.T
    e2 = g.table[r1, e1]
    e3 = g.table[r2, e2]
    ids2, ids3 = v.entity_ids(g, e2), v.entity_ids(g, e3)

    # ---------------------------------------------------------------- 1. correct / incorrect
    comp = v.ids([g.two_hop_words(*t) for t in trip])
    hop1_ok, _ = generated_contains(model, v.ids([g.hop_words(a, b) for a, b in zip(r1, e1)]), ids2)
    hop2_ok, _ = generated_contains(model, v.ids([g.hop_words(a, b) for a, b in zip(r2, e2)]), ids3)
    comp_ok, comp_gen = generated_contains(model, comp, ids3)
    keep = hop1_ok & hop2_ok
    correct, incorrect = np.flatnonzero(keep & comp_ok), np.flatnonzero(keep & ~comp_ok)
    t1, last = comp.shape[1] - 2, comp.shape[1] - 1  # e1's token, the final "is"
    report.number("n_queries", len(trip))
    report.number("both_hops_correct", int(keep.sum()))
    report.number("n_correct", len(correct))
    report.number("n_incorrect", len(incorrect))
    report.number("two_hop_accuracy_given_hops", float(comp_ok[keep].mean()) if keep.any() else None)
    report.section("The queries", (
        f"{len(trip)} held-out two-hop queries (the organism never trained on these compositions; seed {seed}). "
        f"First hop right: {hop1_ok.mean():.1%}; second hop right: {hop2_ok.mean():.1%}; both: {keep.sum()}. "
        f"Of those, the composed query is answered correctly (greedy, {N_NEW} tokens, e3 before EOS) in "
        f"{len(correct)} and incorrectly in {len(incorrect)} cases."))
    if len(correct) == 0 or len(incorrect) == 0:
        raise RuntimeError(f"need both correct and incorrect two-hop cases, got {len(correct)} and {len(incorrect)}; "
                           "raise --batch or use a model that composes some but not all queries")

    # ---------------------------------------------------------------- 2. back-patching
    grids = {}
    for name, idx in (("incorrect", incorrect), ("correct", correct)):
        grids[name] = patching.back_patching(model, comp[idx], -1, targets=ids3[idx], max_new_tokens=N_NEW, progress=False)
    bp = grids["incorrect"]
    ok = np.asarray(bp.success.values, bool)  # [i, j, example]
    back, fwd = np.tril(np.ones((L, L), bool), -1), np.triu(np.ones((L, L), bool), 1)
    fixed, fixed_fwd = bp.fixed_rate(), float((ok & fwd[:, :, None]).any((0, 1)).mean())
    kept = float((np.asarray(grids["correct"].success.values, bool) & back[:, :, None]).any((0, 1)).mean())
    report.number("fixed_rate", fixed)
    report.number("fixed_rate_forward_control", fixed_fwd)
    report.number("back_patch_success_incorrect", ok.mean(-1))
    report.section("Back-patching", (
        f"For each of the {L} x {L} (source i, target j) pairs, resid_post[i] at the last position written into "
        f"resid_post[j] of a fresh pass, then greedy generation with the edit on the prompt pass only; one compiled "
        f"sweep over pairs x examples. Incorrect cases fixed by some back-patch (i > j): {fixed:.1%} "
        f"({int(bp.fixed.sum())}/{len(incorrect)}); by some forward patch (i < j, control): {fixed_fwd:.1%}. "
        f"Correct cases that some back-patch keeps correct: {kept:.1%}."))
    report.figure("back_patching", [
        dict(values=ok.mean(-1) * 100, row_labels=[str(i) for i in range(L)], col_labels=[str(j) for j in range(L)],
             title="incorrect cases made correct (%)", xlabel="target layer j", ylabel="source layer i", cmap="Greens", center=False),
        dict(values=np.asarray(grids["correct"].success.values).mean(-1) * 100, row_labels=[str(i) for i in range(L)],
             col_labels=[str(j) for j in range(L)], title="correct cases still correct (%)", xlabel="target layer j",
             ylabel="source layer i", cmap="Greens", center=False)],
        caption="back-patching success per (source, target) layer pair; below the diagonal: source later than target")
    why = "" if fixed > fixed_fwd else (
        "; the forward patches fix as many or more: here most incorrect answers are near misses that many perturbations "
        "of the last position flip to e3, so a fix is not specific to writing a later state back")
    report.claim("incorrect two-hop cases fixed by some back-patch", f"up to {PAPER_FIXED[0]:.0%}-{PAPER_FIXED[1]:.0%}",
                 round(fixed, 3), fixed >= HALF * PAPER_FIXED[0] and fixed > fixed_fwd,
                 f"holds if at least {HALF * PAPER_FIXED[0]:.1%} (half the paper's lower figure) and above the forward-patch "
                 f"control ({fixed_fwd:.1%}){why}")

    # ---------------------------------------------------------------- 3. projections and lenses
    # one cached run serves the projections, the logit lens and the Patchscopes sources
    _, cache = model.run_with_cache(comp, names=lambda s: s.endswith(("hook_attn_out", "hook_mlp_out", "hook_resid_post")))
    proj = {k: np.asarray(_unembed(model.params, cfg, cache.stack(f"hook_{k}_out")[:, :, last:last + 1]))[:, :, 0]
            for k in ("attn", "mlp")}  # [L, B, V]
    pred = np.asarray(comp_gen[:, 0])
    attn_e2 = ranks(proj["attn"], ids2) == 0  # [L, B]
    mlp_pred = ranks(proj["mlp"], pred) == 0
    resid = cache.stack("hook_resid_post")  # [L, B, P, d]
    res = np.asarray(_unembed(model.params, cfg, resid[:, :, [t1, last]]))  # logit lens on resid_post: [L, B, 2, V]
    e2_at_t1 = ranks(res[:, :, 0], ids2) == 0
    e2_at_last = ranks(res[:, :, 1], ids2) == 0
    e3_at_last = ranks(res[:, :, 1], ids3) == 0

    # ---------------------------------------------------------------- 4. attention knockout
    W = max(1, round(3 * L / 32))  # the paper's +-3 layers of 32, scaled to this depth
    critical = np.zeros((L, len(trip)), bool)
    for l in range(L):
        ko = E.knockout(query_pos=[last], key_pos=[t1], layers=list(range(max(0, l - W), min(L, l + W + 1))))
        ok_ko, gen_ko = generated_contains(model, comp, ids3, edits=(ko,))
        critical[l] = (gen_ko != comp_gen).any(1) & ~ok_ko

    # ---------------------------------------------------------------- 5. stages
    T = lambda m: m.T  # [L, B] -> [B, L]
    stages = {
        "hop 1 (e2 at e1's token)": first_layer(T(e2_at_t1)),
        "information propagation": _nanmean(np.stack([first_layer(T(critical)), first_layer(T(attn_e2)),
                                                      first_layer(T(e2_at_last))]), 0),
        "hop 2 (e3 at the last token)": first_layer(T(e3_at_last)),
        "extraction (MLP top-1 = prediction)": first_layer(T(mlp_pred)),
    }
    rows = []
    for name, vals in stages.items():
        for split, idx in (("correct", correct), ("incorrect", incorrect)):
            x = vals[idx]
            rows.append(dict(stage=name, cases=split, resolved=float(np.isfinite(x).mean()),
                             mean_layer=float(np.nanmean(x)) if np.isfinite(x).any() else None))
    report.table("stages", rows, caption="first layer of each stage (mean over the examples where it is resolved) "
                 "and the fraction of examples where it is resolved at all")
    report.figure("stages", _stage_plot(stages, correct, incorrect, L), caption="stage layers, correct vs incorrect")
    h2 = stages["hop 2 (e3 at the last token)"]
    h2c, h2i = np.isfinite(h2[correct]).mean(), np.isfinite(h2[incorrect]).mean()
    mc = float(np.nanmean(h2[correct])) if h2c else np.nan
    mi = float(np.nanmean(h2[incorrect])) if h2i else np.nan
    later = bool(np.isfinite(mi) and np.isfinite(mc) and mi > mc)
    why = "" if later else (
        "; in incorrect cases e3, where it surfaces at all, does so at earlier layers and is lost again by the output")
    report.claim("the second hop is resolved later in incorrect cases", "later (qualitative, abstract)",
                 f"correct: layer {mc:.2f} ({h2c:.0%} resolved); incorrect: {mi:.2f} ({h2i:.0%} resolved)", later,
                 "first layer whose resid_post at the last position decodes e3, mean over the cases where some layer does; "
                 f"holds if later in incorrect cases (fewer incorrect cases resolve by construction: their output is not e3){why}")
    h1 = stages["hop 1 (e2 at e1's token)"][correct]
    both = np.isfinite(h1) & np.isfinite(h2[correct])
    early = bool(both.any()) and float(np.mean(h1[both] < h2[correct][both])) > 0.5
    report.claim("the bridge entity is resolved before the second hop (correct cases)", "hop 1 in early layers, hop 2 later",
                 f"hop 1 before hop 2 in {np.mean(h1[both] < h2[correct][both]) if both.any() else float('nan'):.0%} of "
                 f"{int(both.sum())} cases with both decoded", early,
                 "holds if, among correct cases where both are decoded, hop 1's layer is earlier in more than half")

    # ---------------------------------------------------------------- 6. Patchscopes
    decoded = patchscopes(model, g, v, np.asarray(resid)[:, :, t1], e1, e2, e3, seed)  # [L, 1 + L, B]
    bridge = (decoded == 2).any((0, 1))
    report.number("patchscopes_bridge_decoded", {"correct": float(bridge[correct].mean()), "incorrect": float(bridge[incorrect].mean())})
    report.section("Patchscopes", (
        f"resid_post[i] at e1's token, patched at 'x' of the identity prompt 'a = a , b = b , x =' into the embedding or "
        f"resid_post[j]; the bridge entity e2 is named by some (i, j) in {bridge[correct].mean():.0%} of correct and "
        f"{bridge[incorrect].mean():.0%} of incorrect cases; e1 by some pair in {(decoded == 1).any((0, 1)).mean():.0%}, "
        f"the placeholder (the patch did not take) in {(decoded == 4).mean():.0%} of all (i, j, example)."))
    report.figure("patchscopes", [
        dict(values=(decoded == k).mean(-1) * 100, row_labels=[str(i) for i in range(L)],
             col_labels=["emb"] + [str(j) for j in range(L)], title=f"names {name} (%)", xlabel="target (embedding, layer j)",
             ylabel="source layer i", cmap="Purples", center=False)
        for k, name in ((1, "e1"), (2, "e2 (bridge)"), (3, "e3"), (4, "the placeholder"))],
        caption="Patchscopes from e1's token", ncols=4)
    stuck = float((decoded[:, 1:] == 4).mean())
    why = "" if bridge.mean() > 0.5 else (
        f"; patched into resid_post the placeholder is still named in {stuck:.0%} of (i, j, example): this identity "
        "prompt reads x's token in layer 0, before any patch takes effect, and states written in place of the embedding "
        "are rarely read back as an entity")
    report.claim("the bridge entity can be read from e1's token (Patchscopes)", "— (shown qualitatively)",
                 round(float(bridge.mean()), 3), bool(bridge.mean() > 0.5),
                 f"fraction of kept cases where some (i, j) names e2; holds above one half{why}")

    report.table("examples", [dict(r1=g.relations[a], r2=g.relations[b], e1=g.entities[c], e2=g.entities[d], e3=g.entities[f],
                                   correct=bool(comp_ok[i]), kept=bool(keep[i]),
                                   generated=model.tokenizer.decode(comp_gen[i]).strip())
                                   for i, (a, b, c, d, f) in enumerate(zip(r1, r2, e1, e2, e3))], max_rows=10)
    report.arrays("hopping_too_late", success_incorrect=ok, success_correct=np.asarray(grids["correct"].success.values),
                  fixed=bp.fixed, correct=correct, incorrect=incorrect, critical=critical, attn_e2=attn_e2,
                  e2_at_t1=e2_at_t1, e3_at_last=e3_at_last, patchscopes=decoded,
                  **{k.split(" ")[0] + "_" + k.split(" ")[1]: s for k, s in stages.items()})


def patchscopes(model, g, v, src, e1, e2, e3, seed) -> np.ndarray:
    """[source i, target, example]: 0 none, 1 e1, 2 e2, 3 e3, 4 the placeholder: which entity the
    identity prompt's next token names after src[i] (resid_post[i] at e1's token, [L, B, d]) is
    written at 'x' into the target: column 0 the embedding (resid_pre[0]), column j + 1 resid_post[j]."""
    L = model.cfg.n_layers
    B = src.shape[1]
    rng = np.random.default_rng(seed + 1)
    used = np.stack([e1, e2, e3], 1)
    abx = np.array([rng.choice(np.setdiff1d(np.arange(len(g.entities)), u), 3, replace=False) for u in used])
    target = v.ids([g.identity_words(a, b, x) for a, b, x in abx])  # x: a placeholder entity, overwritten
    x_pos = target.shape[1] - 2
    # every (source i, target) pair in one compiled sweep per target site: the next token after the patch
    first = [PS.patchscope_states(model, src, target, target_pos=x_pos, target_layers=layers, target_site=site,
                                  max_new_tokens=1, stop_at_eos=False).first_token
             for site, layers in (("hook_resid_pre", [0]), ("hook_resid_post", None))]
    nxt = np.concatenate(first, 1)  # [L, 1 + L, B]
    want = np.concatenate([np.stack([v.entity_ids(g, e) for e in (e1, e2, e3)], 1), v.entity_ids(g, abx[:, 2])[:, None]], 1)
    out = np.zeros((L, L + 1, B), np.int8)
    for k in range(4):  # the paper checks e1, e2, e3 in that order
        out = np.where((out == 0) & (nxt == want[None, None, :, k]), k + 1, out)
    return out


def _stage_plot(stages, correct, incorrect, L):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(stages)
    for k, (split, idx, c) in enumerate((("correct", correct, "tab:green"), ("incorrect", incorrect, "tab:red"))):
        m = [np.nanmean(stages[n][idx]) if np.isfinite(stages[n][idx]).any() else np.nan for n in names]
        ax.bar(np.arange(len(names)) + 0.4 * k - 0.2, m, 0.4, label=split, color=c)
    ax.set_xticks(np.arange(len(names)), [n.split(" (")[0] for n in names], fontsize=8)
    ax.set_ylabel("mean first layer")
    ax.set_ylim(0, L)
    ax.legend()
    return fig
