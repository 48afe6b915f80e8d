"""Retrieval heads: a few attention heads copy the needle out of a long context (Wu et al. 2024).

The paper (arXiv 2404.15574; methods.md §4) asks which heads do the copying when a long-context model
answers a needle-in-a-haystack question. During greedy decoding, a head "copy-pastes" at a step when
the key its query attends to most lies inside the needle and holds the token just generated; its
retrieval score is the fraction of the needle copied that way, averaged over prompts the model got
right (ROUGE-1 recall > 0.5). The paper finds that fewer than 5% of heads score above 0.1, and that
masking them (uniform attention on decoding steps) breaks needle retrieval while masking as many
random heads does not.

Steps, all batched and compiled (two programs for the scores, one for all masking conditions):

1. Prompts from `experiments.data.needles` over a grid of context lengths x needle depths: filler
   words, a needle `KEY V1 V2 V3 .` at the given depth, the query `? KEY` (a question template for a
   real model loaded with --model), with the model's own tokenizer.
2. `jinterp.detect.retrieval_scores`: batched greedy decoding, then one teacher-forced pass; per
   head, the score as the paper's code computes it, and per prompt (for the length/depth maps).
3. Heads with score > 0.1 are retrieval heads. K = their number (at least 1; at most half the heads):
   on a 16-head organism the paper's K = 50 of 1024 heads (~5%) has no meaning, so K scales as
   "the retrieval heads". Mask the top-K, or random K heads drawn from the others, with
   `edits.uniform_attention(pos="decode")` (pre-softmax scores of the allowed keys set to 0 on
   the rows that produce new tokens; prefill untouched), and measure needle accuracy (ROUGE-1
   recall x 100) on fresh prompts.

Read in the report: the claims table (the paper's numbers beside ours; a small organism has few
heads, so "sparse" is judged by the paper's own threshold and may not hold), the score heatmap
over layer x head, the masking bars, and the top head's score by length and depth.

    jinterp experiment retrieval-heads --out out/retrieval [--quick] [--model DIR]
"""

from __future__ import annotations

import numpy as np

from experiments.data import needles
from jinterp import detect
from jinterp import edits as E
from jinterp.results import Labelled

NAME = "retrieval-heads"
TITLE = "Retrieval Head Mechanistically Explains Long-Context Factuality (Wu et al. 2024)"
ORGANISM = "retrieval-2l"

THRESHOLD = 0.1  # paper §2: a retrieval head has score > 0.1
PAPER_FRACTION = 3.2  # % of heads > 0.1 in Llama-2-7B-80K (33/1024); 2.1-6.2% across the paper's models
NATURAL = dict(needle="the secret code of {key} is {value} .",
               query="what is the secret code of {key} ? the secret code of {key} is")


def _vocab(model):
    """The organism's templates on its own tokenizer; a question template on any other tokenizer."""
    if model.tokenizer is None:
        raise ValueError("retrieval-heads needs a model with a tokenizer (the needle prompts are built from words)")
    try:
        from jinterp.train import organisms

        own = organisms.recipe(ORGANISM).tokenizer().get_vocab() == model.tokenizer.get_vocab()
    except FileNotFoundError:
        own = False
    return needles.Vocab.from_tokenizer(model.tokenizer, **({} if own else NATURAL)), own


def _grid(model, vocab, own, quick, n_new):
    n_ctx = model.config.n_ctx
    top = n_ctx - n_new  # prompt + generation must fit the context
    if own:
        lengths = (64, 128, 192, top) if quick else (32, 64, 96, 128, 160, 192, 224, top)
    else:  # a real model: a few hundred to a couple of thousand tokens (CPU-friendly; the paper goes to 50K)
        hi = min(top, 512 if quick else 2048)
        lengths = tuple(int(x) for x in np.linspace(min(128, hi), hi, 3 if quick else 6))
    depths = tuple(np.linspace(0, 1, 5 if quick else 10).round(3))
    return lengths, depths


def _mask_edits(model, heads_mask):
    """One Uniform edit per layer (boolean head masks, so every condition shares one program)."""
    return [E.uniform_attention(layers=l, heads=np.asarray(heads_mask[l], bool), pos="decode")
            for l in range(model.config.n_layers)]


def _accuracy(model, data, n_new, heads_mask):
    """Mean ROUGE-1 recall (x100) of the answers under decoding-step masking of `heads_mask` [L, H]."""
    toks, mask = needles.left_pad(data.prompts, model.tokenizer.pad_token_id or 0)
    out = np.asarray(model.generate(toks, n_new, attention_mask=mask, edits=_mask_edits(model, heads_mask),
                                    stop_at_eos=False))[:, toks.shape[1]:]
    rec = [needles.recall(g, a, data.stop) for g, a in zip(out, data.answers)]
    return 100.0 * float(np.mean(rec))


def run(model, report, *, batch=None, seed=0, quick=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = model.config.n_layers, model.config.n_heads
    vocab, own = _vocab(model)
    n_values = 3
    n_new = n_values + 5  # the answer, the stop token, and a little slack (the paper: 50 steps, stop at newline)
    per_cell = batch or (2 if quick else 4)
    lengths, depths = _grid(model, vocab, own, quick, n_new)
    if vocab.split:
        report.text(f"Words this tokenizer splits (dropped from the pools): {', '.join(vocab.split)}.")
    data = needles.grid(vocab, lengths, depths, per_cell, n_values=n_values, seed=seed)

    # ---------------------------------------------------------------- scores
    r = detect.retrieval_scores(model, data.prompts, data.spans, max_new_tokens=n_new, stop_token=vocab.stop,
                                return_hits=True)
    scores = r["scores"]
    s = np.asarray(scores.values)
    n_heads = L * H
    frac = 100.0 * float((s > THRESHOLD).sum()) / n_heads
    zero = 100.0 * float((s == 0).sum()) / n_heads
    base_recall = 100.0 * float(r["recall"].mean())
    order = np.argsort(-s, axis=None)
    top_lh = [tuple(int(i) for i in np.unravel_index(k, s.shape)) for k in order]
    report.number("n_prompts", len(data))
    report.number("n_counted", r["n_samples"])
    report.number("needle_recall_unmasked_scoring_set", base_recall)
    report.number("fraction_heads_above_0.1_percent", frac)
    report.number("fraction_heads_zero_percent", zero)
    report.number("top_heads", [dict(layer=l, head=h, score=float(s[l, h])) for l, h in top_lh[:5]])

    report.section("Retrieval scores",
                   f"{len(data)} prompts ({len(lengths)} context lengths x {len(depths)} depths x {per_cell}); "
                   f"{r['n_samples']} pass the ROUGE-1 > 0.5 filter (mean recall {base_recall:.1f}). "
                   f"{(s > THRESHOLD).sum()} of {n_heads} heads score above {THRESHOLD} ({frac:.1f}%); "
                   f"{zero:.0f}% score exactly 0.")
    report.figure("scores", scores, caption="retrieval score per head (layer x head)")
    report.table("top_heads", [dict(layer=l, head=h, score=float(s[l, h])) for l, h in top_lh], caption="heads by score")

    # score of the top head (and of the retrieval heads together) by length and depth
    hits, ok = r["hits"], r["recall"] > 0.5
    tl, th = top_lh[0]
    cell = np.full((len(lengths), len(depths)), np.nan)
    for i, n in enumerate(lengths):
        for j, d in enumerate(depths):
            m = ok & (data.length == n) & np.isclose(data.depth, d)
            if m.any():
                cell[i, j] = hits[m, tl, th].mean()
    by_cell = Labelled(np.nan_to_num(cell), ("length", "depth"), (tuple(map(str, lengths)), tuple(f"{d:g}" for d in depths)),
                       name=f"score of the top head L{tl}H{th}")
    report.figure("score_by_length_depth", by_cell, caption=f"retrieval score of L{tl}H{th} by context length and needle depth")
    universal = float(np.nanmean(cell > THRESHOLD)) * 100 if np.isfinite(cell).any() else 0.0
    report.number("top_head_active_cells_percent", universal)

    # ---------------------------------------------------------------- masking
    K = int(min(max(1, (s > THRESHOLD).sum()), n_heads // 2))
    n_random = 3 if quick else 5
    eval_data = needles.grid(vocab, lengths, depths, per_cell, n_values=n_values, seed=seed + 1)
    rng = np.random.default_rng(seed)
    conds = [("none", np.zeros((L, H), bool))]
    ks = sorted({1, K})
    for k in ks:
        m = np.zeros((L, H), bool)
        for l, h in top_lh[:k]:
            m[l, h] = True
        conds.append((f"top-{k}", m))
        pool = [lh for lh in top_lh if not any(lh == t for t in top_lh[:K])]  # outside the retrieval heads
        for rep in range(n_random):
            m = np.zeros((L, H), bool)
            for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False):
                m[pool[i]] = True
            conds.append((f"random-{k}#{rep}", m))
    acc = {name: _accuracy(model, eval_data, n_new, m) for name, m in conds}
    rows = [dict(condition=n, heads=" ".join(f"L{l}H{h}" for l, h in zip(*np.nonzero(m))), recall=acc[n]) for n, m in conds]
    report.section("Masking",
                   f"Uniform attention on decoding steps (prefill untouched) for the top-K heads by score and for K "
                   f"random heads outside the top {K}; K = the number of heads with score > {THRESHOLD} (here {K}; the "
                   f"paper masks K = 50 of 1024-1600 heads, ~5%). Needle accuracy = ROUGE-1 recall x 100 on "
                   f"{len(eval_data)} fresh prompts.")
    report.table("masking", rows)
    summary = {"none": acc["none"]}
    for k in ks:
        summary[f"top-{k}"] = acc[f"top-{k}"]
        rnd = [acc[f"random-{k}#{i}"] for i in range(n_random)]
        summary[f"random-{k}"] = float(np.mean(rnd))
        summary[f"random-{k}_sd"] = float(np.std(rnd))
    report.number("masking_recall", summary)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * (1 + 2 * len(ks)), 3.2))
    names = ["none"] + [x for k in ks for x in (f"top-{k}", f"random-{k}")]
    vals = [summary[n] for n in names]
    errs = [summary.get(f"{n}_sd", 0.0) for n in names]
    ax.bar(names, vals, yerr=errs, color=["grey"] + ["tab:red", "tab:blue"] * len(ks))
    ax.axhline(50, ls="--", c="k", lw=0.8)
    ax.set_ylabel("needle recall (ROUGE-1 x 100)")
    ax.set_ylim(0, 105)
    ax.set_title("masking retrieval heads vs random heads")
    report.figure("masking", fig, caption="needle accuracy under masking (dashed: the paper's 50 line)")

    # ---------------------------------------------------------------- claims
    report.claim("heads with retrieval score > 0.1 (%)", PAPER_FRACTION, frac, holds=frac <= 6.2,
                 note=f"holds if within the paper's range (<= 6.2%, Mixtral). One head of {n_heads} is "
                      f"{100 / n_heads:.1f}%: a small organism cannot be 'sparse' at this resolution")
    report.claim("heads with score exactly 0 (%)", "45-73", zero, holds=45 <= zero <= 73,
                 note="holds if inside the paper's range")
    report.claim(f"masking the top-{K} retrieval heads: needle recall", "< 50 (K=50, Fig. 7)", acc[f"top-{K}"],
                 holds=acc[f"top-{K}"] < 50, note=f"unmasked {acc['none']:.1f}; holds if < 50")
    report.claim(f"masking {K} random heads: needle recall", "little effect", summary[f"random-{K}"],
                 holds=summary[f"random-{K}"] >= acc["none"] - 10,
                 note=f"mean of {n_random} draws outside the top {K}; holds if within 10 points of unmasked "
                      f"({acc['none']:.1f})")
    report.claim("the top head copies at every length and depth (% of cells with score > 0.1)", "universal (§3.2)",
                 universal, holds=universal >= 90, note=f"L{tl}H{th}; holds if >= 90% of (length, depth) cells")

    report.arrays("raw", scores=s, per_prompt=hits, recall=r["recall"], n_steps=r["n_steps"], length=data.length,
                  depth=data.depth, spans=data.spans, generated=r["generated"], by_cell=cell,
                  mask_names=np.array([n for n, _ in conds]), mask_heads=np.stack([m for _, m in conds]),
                  mask_recall=np.array([acc[n] for n, _ in conds]))
