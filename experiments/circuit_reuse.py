"""Circuit component reuse across tasks (Merullo, Eickhoff, Pavlick; ICLR 2024): do IOI and Colored Objects use the same heads?

The paper (arXiv 2310.08744; methods.md section 6) finds in GPT-2 medium that the IOI circuit and
the circuit for Colored Objects ("On the table, there is a red pen, a blue cup, and a green book.
What color is the cup?" -> " blue"; here the question ends at the object, without "?") share 78% of their in-circuit heads at a top-2% importance
threshold, and that making four heads behave as they do in IOI (the inhibition heads and a
negative mover, their attention set onto the incorrect colours) lifts Colored-Objects accuracy
from 49.6% to 93.7%. Here, on the ioi-cobjs-4l organism by default (trained on both tasks and an
auxiliary induction task; it does both, Colored Objects near 100%, so the intervention has no room),
or any model whose tokenizer has the words (GPT-2 medium by path; prompts in `co_template()`):

1. Tasks. IOI (experiments/data/ioi.py) with the paper's corruption: S2 replaced by IO, so the
   other name is the repeated one; answer pair (IO, S). Colored Objects
   (experiments/data/colored_objects.py) with the "mindiff" corruption: the question asks about
   another object of the same list; answer pair (clean colour, corrupted colour). LD = logit
   difference of the pair at END (the last token).
2. Head importance by path patching as the circuit_reuse code does it
   (`patching.path_patching(..., freeze="position")`): the sender head takes its corrupted output
   and every other head is frozen to its clean output only at one position, where the receivers are
   also read and patched. Importance = 100 (LD_patched - LD) / (LD_corrupt - LD): the % of the
   clean-to-corrupt change that flows through the path (the paper stores minus this). Stages, per
   task, each with its own receivers: (a) the logits, at END (mover heads: importance >= 10;
   negative movers: <= -10); (b) the movers' queries at END (inhibition heads: >= 10, not movers);
   (c) the inhibition heads' values at the repeated token (S2; the queried object), if any sender
   precedes them.
3. Overlap. A task's circuit at k is the union over stages of the k heads with the largest
   |importance| among the stage's senders. The paper's top 2% of GPT-2 medium's 384 heads is 8 a
   stage; 2% of this model's heads rounds to k = max(1, round(0.02 L H)) (1 for 16 heads), the k of
   the claim; the table gives every k up to 4. Overlap = |IOI & CO| / |IOI | CO| (the paper's 25/32).
4. Intervention. The IOI inhibition heads and negative movers of step 2 get, at END of each
   Colored-Objects prompt, the IOI-like attention pattern: uniform over the two incorrect colours
   (in IOI they attend to S2, the wrong name; the paper's exact hook is not released). Multiple-
   choice accuracy (the right colour above the two others) before and after, for inhibition heads
   only, negative movers only, and both; new mistakes; the movers' attention to the right and wrong
   colours before and after.

Read first the claims table, then `importance.png` (every stage, both tasks) and `overlap.csv`.

    jinterp experiment circuit-reuse --out out/cr [--quick] [--model DIR]
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments.data import colored_objects as co
from experiments.ioi import make_generator
from jinterp import edits as E
from jinterp import metrics, patching

NAME = "circuit-reuse"
TITLE = "Circuit Component Reuse Across Tasks in Transformer Language Models (Merullo, Eickhoff, Pavlick; ICLR 2024)"
ORGANISM = "ioi-cobjs-4l"

PAPER = dict(overlap=0.78, top_fraction=0.02, acc_before=0.496, acc_inhibition=0.815, acc_negative=0.781, acc_both=0.937,
             mover_attn_wrong=-0.087, mover_attn_right=0.027,
             inhibition=("12.3", "13.4", "13.13", "13.14"), negative_mover=("19.1",),
             movers=("15.14", "16.15", "17.4", "18.5", "19.15"))
THRESHOLD = 10.0  # % of the clean-to-corrupt LD change: a head "is" a mover / inhibition head at this importance
K_TABLE = (1, 2, 3, 4)
MIN_LD_CHANGE = 0.5  # a task whose corruption moves LD less than this gives no importance signal


def _label(h) -> str:
    return f"{h[0]}.{h[1]}"


def _is_gpt2_medium(cfg) -> bool:
    return cfg.family == "gpt2" and (cfg.n_layers, cfg.n_heads, cfg.d_model) == (24, 16, 1024)


def co_template() -> str:
    """The Colored-Objects prompt format: the one the organism is trained on, its recipe's CO_TEMPLATE
    (colour before object as in the paper, the question ending at the queried object); used for
    every model, GPT-2 medium by path too."""
    from jinterp.train import organisms

    return organisms.recipe(ORGANISM).CO_TEMPLATE


def co_generator(tokenizer, template: str | None = None):
    """The Colored-Objects generator for this tokenizer (template: default `co_template()`);
    colours/objects that split are dropped (and listed)."""
    if tokenizer is None:
        raise ValueError("circuit-reuse needs a model with a tokenizer (the prompts are built from words)")
    template = co_template() if template is None else template
    try:
        return co.ColoredObjectsGenerator(tokenizer, template=template), []
    except co.SplitWordError as e:
        bad = set(e.words)
        return co.ColoredObjectsGenerator(tokenizer, colors=[w for w in co.COLORS if w not in bad], template=template,
                                          objects=[w for w in co.OBJECTS if w not in bad]), sorted(bad)


def tasks(model, n: int, seed: int) -> dict:
    """Both tasks' prompts: {"IOI": dict, "CO": dict} with tokens, corrupted, answers [n, 2], end and
    dup (the repeated token: S2; the queried object) positions, and the batch itself."""
    if model.tokenizer is None:
        raise ValueError("circuit-reuse needs a model with a tokenizer (the prompts are built from words)")
    gi, dropped = make_generator(model.tokenizer)
    gc, dropped_co = co_generator(model.tokenizer)
    rng = np.random.default_rng(seed)
    P = max(int(gi.template_lengths.max()), gc.length)  # one length for both tasks: their sweeps share programs
    bi = gi.sample(rng, n, pad_to=P)
    ioi_corr = bi.tokens.copy()
    ioi_corr[np.arange(n), bi.s2] = bi.answers[:, 0]  # gen_flipped_prompts(("S2", "IO"))
    bc = gc.sample(rng, n, pad_to=P)
    return {
        "IOI": dict(tokens=bi.tokens, corrupted=ioi_corr, answers=bi.answers, end=bi.end, dup=bi.s2, batch=bi, gen=gi),
        "CO": dict(tokens=bc.tokens, corrupted=bc.corrupted, answers=bc.answers, end=bc.end, dup=bc.query, batch=bc, gen=gc),
        "dropped": dropped + dropped_co,
    }


def importance(model, task: dict, receivers, pos) -> tuple[np.ndarray, np.ndarray]:
    """Position-frozen path patching of every sender head to `receivers` at `pos` ([n, 1]) ->
    (importance [L, H] in % of the clean-to-corrupt LD change, eligible-sender mask [L, H])."""
    cfg = model.config
    metric = metrics.logit_diff(task["answers"], pos=task["end"])
    ld, ldc = float(metric(model(task["tokens"]))), float(metric(model(task["corrupted"])))
    r = patching.path_patching(model, task["tokens"], task["corrupted"], metric, receivers, sender_pos=pos, receiver_pos=pos,
                               freeze="position", progress=False)
    imp = 100 * (np.asarray(r.values, np.float64) - ld) / (ldc - ld)
    ok = np.ones((cfg.n_layers, cfg.n_heads), bool)
    if receivers != "resid":
        ok[max(l for l, _, _ in receivers):] = False
        for l, h, _ in receivers:
            ok[l, h] = False
    return np.where(ok, imp, 0.0), ok


def _where(m) -> list[tuple[int, int]]:
    return [tuple(map(int, x)) for x in np.argwhere(m)]


def analyse(model, task: dict) -> dict:
    """The stages of step 2 for one task -> {"stages": {name: (importance, eligible)}, "movers", "negative", "inhibition"}."""
    end, dup = task["end"][:, None], task["dup"][:, None]
    st = {"logits": importance(model, task, "resid", end)}
    imp = st["logits"][0]
    movers = _where(imp >= THRESHOLD) or [tuple(map(int, np.unravel_index(np.argmax(imp), imp.shape)))]
    negative = _where(imp <= -THRESHOLD)
    inhibition = []
    if any(l > 0 for l, _ in movers):
        st["mover_queries"] = importance(model, task, [(l, h, "q") for l, h in movers], end)
        inhibition = [h for h in _where(st["mover_queries"][0] >= THRESHOLD) if h not in movers]
    if any(l > 0 for l, _ in inhibition):
        st["inhibition_values"] = importance(model, task, [(l, h, "v") for l, h in inhibition], dup)
    return dict(stages=st, movers=movers, negative=negative, inhibition=inhibition)


def top_k(stages: dict, k: int) -> set:
    """Union over stages of the k eligible senders with the largest |importance|."""
    out = set()
    for imp, ok in stages.values():
        score = np.where(ok, np.abs(imp), -np.inf).ravel()
        for i in np.argsort(-score, kind="stable")[:k]:
            if np.isfinite(score[i]):
                out.add(tuple(map(int, np.unravel_index(i, imp.shape))))
    return out


def attend_to_wrong_colours(heads, batch: co.ColoredObjectsBatch) -> tuple:
    """Edits: each head's attention row at END set to 1/2 on each incorrect colour (the IOI-like pattern)."""
    n, P = batch.tokens.shape
    pat = np.zeros((n, 1, P), np.float32)
    np.put_along_axis(pat[:, 0], batch.distractor_pos(), 0.5, 1)
    val = E.Value(jnp.asarray(pat), ("batch", "selected", "key"))
    return tuple(E.patch("attn.hook_pattern", val, layers=l, heads=[h], pos=batch.end[:, None]) for l, h in heads)


def co_accuracy(model, batch: co.ColoredObjectsBatch, edits=()) -> np.ndarray:
    """Per prompt: the right colour has the highest logit of the three in the list."""
    lg = np.asarray(model(batch.tokens, edits=edits), np.float32)[np.arange(len(batch)), batch.end]
    return co.accuracy(lg, batch)


def mover_attention(model, batch, movers, edits=()) -> tuple[float, float]:
    """Mean attention of the movers from END to the right colour and to the two wrong colours (summed)."""
    if not movers:
        return float("nan"), float("nan")
    _, cache = model.run_with_cache(batch.tokens, names=[f"blocks.{l}.attn.hook_pattern" for l in {l for l, _ in movers}],
                                    edits=edits)
    rows = np.arange(len(batch))
    right = batch.color_pos[rows, batch.target]
    wrong = batch.distractor_pos()
    r, w = [], []
    for l, h in movers:
        row = np.asarray(cache[f"blocks.{l}.attn.hook_pattern"], np.float32)[rows, h, batch.end]  # [n, key]
        r.append(row[rows, right])
        w.append(np.take_along_axis(row, wrong, 1).sum(1))
    return float(np.mean(r)), float(np.mean(w))


def run(model, report, *, batch=None, seed=0, quick=False):
    cfg = model.config
    L, H = cfg.n_layers, cfg.n_heads
    n = batch or (32 if quick else 128)
    n_eval = 200 if quick else 1000
    T = tasks(model, n, seed)
    report.number("n_prompts", n)
    report.number("dropped_words", T["dropped"])
    desc = []
    for name in ("IOI", "CO"):
        t = T[name]
        metric = metrics.logit_diff(t["answers"], pos=t["end"])
        t["ld"], t["ld_corrupt"] = float(metric(model(t["tokens"]))), float(metric(model(t["corrupted"])))
        report.number(f"{name}_logit_diff", t["ld"])
        report.number(f"{name}_logit_diff_corrupted", t["ld_corrupt"])
        desc.append(f"{name}: LD {t['ld']:.2f} clean, {t['ld_corrupt']:.2f} corrupted")
    report.section("1. Tasks", f"{n} prompts a task (seed {seed}). " + "; ".join(desc) + ". E.g. IOI `"
                   + T["IOI"]["gen"].text(T["IOI"]["batch"], 0) + "`; Colored Objects `" + T["CO"]["gen"].text(T["CO"]["batch"], 0)
                   + "` (corrupted: `" + T["CO"]["gen"].text(T["CO"]["batch"], 0, corrupted=True) + "`).")

    # ---- 2. head importance by position-frozen path patching --------------------------------
    A = {name: analyse(model, T[name]) for name in ("IOI", "CO")}
    panels, rows = [], []
    for name in ("IOI", "CO"):
        for stage, (imp, ok) in A[name]["stages"].items():
            panels.append(dict(values=imp, row_labels=[f"L{l}" for l in range(L)], col_labels=[f"H{h}" for h in range(H)],
                               title=f"{name}: -> {stage}", xlabel="head", ylabel="layer"))
            rows += [dict(task=name, stage=stage, head=_label((l, h)), importance=imp[l, h], sender=bool(ok[l, h]))
                     for l in range(L) for h in range(H)]
    report.section("2. Head importance (path patching frozen at one position)", (
        "Importance = 100 (LD_patched - LD) / (LD_corrupt - LD). " + "; ".join(
            f"{k}: movers {', '.join(map(_label, A[k]['movers'])) or '—'}, negative movers "
            f"{', '.join(map(_label, A[k]['negative'])) or '—'}, inhibition heads {', '.join(map(_label, A[k]['inhibition'])) or '—'}"
            for k in A) + "."))
    report.figure("importance", panels, caption="importance of each head per stage and task (% of the LD change)")
    report.table("importance", rows, max_rows=2 * L * H if L * H <= 16 else 20)
    for k in A:
        for role in ("movers", "negative", "inhibition"):
            report.number(f"{k}_{role}", [_label(h) for h in A[k][role]])

    # ---- 3. overlap at top-k ------------------------------------------------------------------
    k_main = max(1, round(PAPER["top_fraction"] * L * H))
    ov_rows = []
    for k in sorted(set(K_TABLE) | {k_main}):
        if k > L * H:
            continue
        a, b = top_k(A["IOI"]["stages"], k), top_k(A["CO"]["stages"], k)
        ov = len(a & b) / len(a | b) if a | b else float("nan")
        ov_rows.append(dict(k=k, ioi=" ".join(map(_label, sorted(a))), co=" ".join(map(_label, sorted(b))),
                            shared=len(a & b), union=len(a | b), overlap=ov))
    main = next(r for r in ov_rows if r["k"] == k_main)
    li, lc = A["IOI"]["stages"]["logits"][0].ravel(), A["CO"]["stages"]["logits"][0].ravel()
    rho = float(np.corrcoef(np.argsort(np.argsort(li)), np.argsort(np.argsort(lc)))[0, 1])
    report.section("3. Overlap", (
        f"Top-k heads per stage, union over stages, for each task; k = {k_main} matches the paper's top 2% "
        f"(2% of {L * H} heads, at least one). Spearman correlation of the two tasks' importance to the logits: {rho:.2f}."))
    report.table("overlap", ov_rows)
    report.number("k_main", k_main)
    report.number("overlap", main["overlap"])
    report.number("spearman_logits", rho)

    # ---- 4. the intervention on Colored Objects -------------------------------------------------
    ev = T["CO"]["gen"].sample(np.random.default_rng(seed + 1), n_eval, pad_to=T["CO"]["tokens"].shape[1])
    inh, neg = A["IOI"]["inhibition"], A["IOI"]["negative"]
    att = {}
    pat_i = T["IOI"]  # the IOI attention of the heads we intervene on, END -> S2 and END -> IO
    if inh or neg:
        heads = inh + neg
        _, cache = model.run_with_cache(pat_i["tokens"], names=[f"blocks.{l}.attn.hook_pattern" for l in {l for l, _ in heads}])
        r = np.arange(n)
        for l, h in heads:
            row = np.asarray(cache[f"blocks.{l}.attn.hook_pattern"], np.float32)[r, h, pat_i["end"]]
            att[_label((l, h))] = dict(S2=float(row[r, pat_i["batch"].s2].mean()), IO=float(row[r, pat_i["batch"].io].mean()))
    conds = {"baseline": []}
    if inh:
        conds["inhibition heads"] = inh
    if neg:
        conds["negative movers"] = neg
    if inh and neg:
        conds["both"] = inh + neg
    acc, base = {}, co_accuracy(model, ev)
    crows = []
    for c, heads in conds.items():
        edits = attend_to_wrong_colours(heads, ev) if heads else ()
        ok = co_accuracy(model, ev, edits) if heads else base
        acc[c] = float(ok.mean())
        mr, mw = mover_attention(model, ev, A["CO"]["movers"], edits)
        crows.append(dict(condition=c, heads=" ".join(map(_label, heads)), accuracy=acc[c], new_mistakes=int((base & ~ok).sum()),
                          fixed=int((~base & ok).sum()), mover_attn_right=mr, mover_attn_wrong=mw))
        report.number(f"accuracy_{c.replace(' ', '_')}", acc[c])
    report.section("4. Intervention: IOI-like attention on Colored Objects", (
        f"{n_eval} fresh prompts (seed {seed + 1}). Heads set to attend from END uniformly to the two incorrect colours: "
        f"the IOI inhibition heads ({', '.join(map(_label, inh)) or 'none found'}) and negative movers "
        f"({', '.join(map(_label, neg)) or 'none found'}). Their mean attention from END on IOI: "
        + (", ".join(f"{k} S2 {v['S2']:.2f} / IO {v['IO']:.2f}" for k, v in att.items()) or "—") + "."))
    report.table("intervention", crows)

    # ---- claims -------------------------------------------------------------------------------
    ov = main["overlap"]
    flat = [k for k in ("IOI", "CO") if abs(T[k]["ld"] - T[k]["ld_corrupt"]) < MIN_LD_CHANGE]
    report.claim(f"IOI and Colored Objects share in-circuit heads (top-{k_main} a stage)", PAPER["overlap"], round(ov, 3),
                 bool(ov >= 0.5) and not flat, f"|IOI & CO| / |IOI | CO| of the top-{k_main} heads per stage ({main['shared']}/{main['union']}); "
                 "holds if >= 0.5 (most heads shared); the paper's top 2% of 384 heads is 8 a stage"
                 + (f"; it cannot hold here: the corruption moves {' and '.join(flat)}'s LD by less than {MIN_LD_CHANGE}, so "
                    "the importances normalised by that change are noise" if flat else ""))
    b0 = acc["baseline"]
    report.claim("Colored Objects is partly solved before the intervention", PAPER["acc_before"], round(b0, 3),
                 1 / 3 + 0.1 <= b0 < 0.95, "multiple-choice accuracy (chance 1/3); holds if at least 10 points above chance "
                 "and below 95% (a behaviour to analyse, and room for the intervention)"
                 + ("; at chance the model does not do the task, so it has no Colored-Objects circuit" if b0 < 1 / 3 + 0.1 else "")
                 + ("; at the ceiling the model solves the task, so no intervention can raise its accuracy" if b0 >= 0.95 else ""))
    for c, key in (("inhibition heads", "acc_inhibition"), ("negative movers", "acc_negative"), ("both", "acc_both")):
        if c not in acc:
            missing = " or ".join(w for w, hs in (("inhibition heads", inh), ("negative movers", neg)) if not hs)
            report.claim(f"intervention on {c} raises accuracy", PAPER[key], None, False,
                         f"not run: the organism's IOI analysis found no {missing} "
                         f"(importance beyond {THRESHOLD:.0f}% at the stage that defines them)")
            continue
        closed = (acc[c] - b0) / (1 - b0) if b0 < 1 else float("nan")
        paper_closed = (PAPER[key] - PAPER["acc_before"]) / (1 - PAPER["acc_before"])
        report.claim(f"intervention on {c} raises accuracy", f"{PAPER['acc_before']} -> {PAPER[key]}",
                     f"{b0:.3f} -> {acc[c]:.3f}", bool(closed >= 0.5),
                     f"holds if it removes at least half of the baseline errors (the paper removes {100 * paper_closed:.0f}%; "
                     f"here {100 * closed:.0f}%)")
    if "both" in acc:
        nm = next(r for r in crows if r["condition"] == "both")["new_mistakes"]
        report.claim("the intervention makes no new mistakes", 0, nm, nm <= 0.01 * n_eval,
                     "prompts right before and wrong after; holds if at most 1% of prompts")
    if _is_gpt2_medium(cfg):
        for role, key in (("inhibition", "inhibition"), ("negative", "negative_mover"), ("movers", "movers")):
            got = {_label(h) for h in A["IOI"][role]}
            report.claim(f"GPT-2 medium {role} heads", ", ".join(PAPER[key]), ", ".join(sorted(got)) or "none",
                         bool(got & set(PAPER[key])), "holds if one of the paper's heads is ours")
    report.arrays("circuit_reuse", **{f"{k}_{s}": v[0] for k in A for s, v in A[k]["stages"].items()},
                  co_eval_tokens=ev.tokens, co_eval_target=ev.target, baseline_correct=base)
