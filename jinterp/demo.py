"""The `jinterp demo` walk-through: the induction organism, its task, and the circuit that solves it.

`run(model, out, seed)` loads the model, scores it on the induction task, finds the heads that
implement the mechanism (attention detectors), patches activations (exactly, and by attribution
patching), reads the same circuit off the weights (composition scores, channels) and measures
retrieval heads. It prints as it goes, writes figures, tables and raw arrays to `out`, and
returns the numbers it printed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

import jinterp
from jinterp import attribution, circuits, detect, metrics, patching, plots
from jinterp.train import organisms

SEG = 20  # words per copy in the task batch
N_ROWS = 64


def run(model="induction-2l", out="out/demo", seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    """Run the demo on `model` (a Model, a bundled name or an HF-format directory); write to `out`.

    Returns {"task", "head_scores", "strongest", "patching", "composition", "retrieval", "files"}.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = model if isinstance(model, jinterp.Model) else jinterp.load(model)
    echo(m.summary())
    batch = organisms.recipe("induction-2l").induction_batch

    # --- the task: [BOS, w1..wn, w1..wn]; the second half is predictable only by induction
    toks = batch(np.random.default_rng(seed), N_ROWS, SEG, m.cfg.d_vocab)
    logits = np.asarray(m(toks), np.float32)
    task = task_metrics(logits, toks, SEG)
    echo(f"\nTask: {N_ROWS} rows of [BOS, {SEG} random words, the same {SEG} words again]")
    for k, v in task.items():
        echo(f"  {k:24s} {v:.4f}")
    pred = logits[0, :-1].argmax(-1)
    words = m.to_str_tokens(toks[0])
    echo("  example, second half (word -> predicted next):")
    echo("    " + " ".join(f"{words[t]}->{m.to_str_tokens([pred[t]])[0]}" for t in range(SEG + 1, SEG + 7)) + " ...")

    # --- per-head attention scores: which heads implement the mechanism
    scores = detect.head_scores(m, toks)
    L, H = m.cfg.n_layers, m.cfg.n_heads
    rows = [(f"L{l}H{h}", *(f"{scores[k][l, h]:.3f}" for k in scores)) for l in range(L) for h in range(H)]
    echo("\nPer-head attention scores (mass on the detector's target keys):")
    echo(_table(rows, ["head", *scores]))
    prev = tuple(int(i) for i in np.unravel_index(np.argmax(scores["previous_token"]), (L, H)))
    ind = tuple(int(i) for i in np.unravel_index(np.argmax(scores["induction"]), (L, H)))
    echo(
        f"  strongest previous-token head: L{prev[0]}H{prev[1]} ({scores['previous_token'][prev]:.3f}); "
        f"strongest induction head: L{ind[0]}H{ind[1]} ({scores['induction'][ind]:.3f})"
    )

    # --- tables and raw arrays next to the figure
    np.savez(out / "head_scores.npz", **scores)
    with open(out / "head_scores.csv", "w") as f:
        f.write("layer,head," + ",".join(scores) + "\n")
        for l in range(L):
            for h in range(H):
                f.write(f"{l},{h}," + ",".join(f"{scores[k][l, h]:.6f}" for k in scores) + "\n")
    (out / "task.json").write_text(json.dumps(task, indent=1))

    _, cache = m.run_with_cache(toks[:1], names=lambda n: n.endswith("hook_pattern"))
    short = [w[:6] for w in words]
    panels = [
        dict(values=scores[k], row_labels=[f"L{l}" for l in range(L)], col_labels=[f"H{h}" for h in range(H)],
             title=f"{k.replace('_', ' ')} score", cmap="Blues", center=False, xlabel="head", ylabel="layer")
        for k in scores
    ]
    for title, (l, h) in (("previous-token head", prev), ("induction head", ind)):
        panels.append(dict(
            values=np.asarray(cache[f"blocks.{l}.attn.hook_pattern"][0, h], np.float32), row_labels=short,
            col_labels=short, title=f"L{l}H{h} pattern ({title})", cmap="Blues", center=False, annotate=False,
            xlabel="key", ylabel="query",
        ))
    fig = plots.save_heatmaps(out / "heads.png", panels, ncols=3, suptitle=f"{m.name}: attention heads on repeated random words")
    echo(f"\nWrote {fig}, {out / 'head_scores.csv'}, {out / 'head_scores.npz'}, {out / 'task.json'}")

    patched = _patching(m, out, seed, batch, echo)
    composition, retrieval = _circuits(m, out, seed, scores, echo)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    return dict(task=task, head_scores=scores, strongest={"previous_token": prev, "induction": ind}, patching=patched,
                composition=composition, retrieval=retrieval, files=files)


def task_metrics(logits: np.ndarray, tokens: np.ndarray, seg: int) -> dict:
    """Next-token loss on each half and accuracy on the repeated half of [BOS, w1..w_seg, w1..w_seg]
    rows, from logits [batch, pos, vocab]; uniform_loss is the loss of guessing among the words."""
    logits = np.asarray(logits, np.float32)
    top = logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    correct = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    first, rep = slice(0, seg), slice(seg + 1, 2 * seg)
    return {
        "loss_first_half": float(nll[:, first].mean()),
        "loss_repeated_half": float(nll[:, rep].mean()),
        "accuracy_repeated_half": float(correct[:, rep].mean()),
        "uniform_loss": float(np.log(logits.shape[-1] - 2)),
    }


def _table(rows, header) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def _patching(m, out: Path, seed: int, batch, echo) -> dict:
    """Activation patching on a minimal pair: where does the copied word travel?"""
    seg, n = 12, 16
    full = batch(np.random.default_rng(seed + 1), n, seg, m.cfg.d_vocab)
    clean = full[:, :-1]  # [BOS, A, A[:-1]]: the next word is A[-1], found by induction
    answer = full[:, -1]
    corrupted = clean.copy()
    words = m.cfg.d_vocab - 2  # word ids are 2 .. d_vocab - 1
    shift = np.random.default_rng(seed + 2).integers(1, words, n)  # never 0: always a different word
    wrong = (answer - 2 + shift) % words + 2
    corrupted[:, seg] = wrong  # A[-1] in the first copy replaced: induction now points at `wrong`
    metric = metrics.logit_diff(np.stack([answer, wrong], 1))
    clean_logits, clean_cache = m.run_with_cache(clean)
    norm = metrics.normalized(metric, clean_logits, m(corrupted))
    echo(
        f"\nActivation patching: {n} pairs [BOS, A, A[:-1]] whose first-copy last word differs; metric: "
        f"logit(A[-1]) - logit(other), normalised to 1 (clean, {norm.clean:.2f}) .. 0 (corrupted, {norm.corrupted:.2f})"
    )
    t = time.perf_counter()
    resid = patching.resid_pre(m, corrupted, clean_cache, norm)
    heads = patching.attn_head_out_all_pos(m, corrupted, clean_cache, norm)
    echo(f"  resid_pre [layer x pos] and head-out [layer x head] sweeps: {resid.values.size + heads.values.size} cells, "
         f"{time.perf_counter() - t:.1f}s including compilation")
    last = clean.shape[1] - 1
    pos_labels = tuple(f"{p}*" if p in (seg, last) else f"{p}" for p in range(clean.shape[1]))
    resid = dataclasses.replace(resid, labels=(resid.labels[0], pos_labels))
    for (lab, v) in resid.top(3):
        echo(f"  resid_pre layer {lab[0]}, position {lab[1]}: {v:.3f}")
    for (lab, v) in heads.top(2):
        echo(f"  head L{lab[0]}{lab[1]}: {v:.3f}")
    resid.save(out / "patch_resid_pre")
    heads.save(out / "patch_heads")
    resid.heatmap(out / "patch_resid_pre.png", title="patch resid_pre (* = changed word, last position)")
    heads.heatmap(out / "patch_heads.png", title="patch head output (all positions)")
    echo(f"  wrote {out / 'patch_resid_pre.png'}, {out / 'patch_heads.png'} and .csv/.npz tables")

    attr = attribution.attribution_patching(m, clean, corrupted, norm, sites=["resid_pre", "z"], by_pos=False)
    r_heads = float(np.corrcoef(attr["attn.hook_z"].values.ravel(), heads.values.ravel())[0, 1])
    echo(f"  attribution patching (one forward + one backward) vs exact head patching: Pearson r = {r_heads:.3f}")
    return dict(clean=float(norm.clean), corrupted=float(norm.corrupted), resid_pre=resid, heads=heads,
                attribution_vs_exact_r=r_heads)


def _circuits(m, out: Path, seed: int, head_scores: dict, echo) -> tuple[dict, dict]:
    """Weight-space view of the same circuit: composition scores, channels, retrieval heads."""
    L, H = m.cfg.n_layers, m.cfg.n_heads
    echo("\nComposition scores, writer (layer 0 head) -> reader (layer 1 head), from the weights alone:")
    scores = {k: np.asarray(circuits.composition_scores(m, k)) for k in "QKV"}
    rows = [(f"L0H{w} -> L1H{r}", *(f"{scores[k][0, w, 1, r]:.3f}" for k in "QKV")) for w in range(H) for r in range(H)]
    echo(_table(rows, ["pair", "Q", "K", "V"]))
    best = max(((k, w, r) for k in "QKV" for w in range(H) for r in range(H)), key=lambda t: scores[t[0]][0, t[1], 1, t[2]])
    echo(f"  strongest: {best[0]}-composition L0H{best[1]} -> L1H{best[2]} (previous-token score of the writer "
         f"{head_scores['previous_token'][0, best[1]]:.2f}, induction score of the reader {head_scores['induction'][1, best[2]]:.2f})")
    ch = circuits.channels(m, kinds=("K",), top=3)
    echo("  strongest K channels (writer's OV singular component -> reader):")
    for _, row in ch.iterrows():
        echo(f"    {row.writer} component {row.component} (s={row.singular_value:.2f}) -> {row.reader}: {row.score:.3f}")
    panels = [dict(values=scores[k][0, :, 1, :], row_labels=[f"L0H{w}" for w in range(H)], col_labels=[f"L1H{r}" for r in range(H)],
                   title=f"{k}-composition", cmap="Blues", center=False, xlabel="reader", ylabel="writer") for k in "QKV"]
    plots.save_heatmaps(out / "composition.png", panels, ncols=3, suptitle="composition scores (layer 0 -> layer 1)")
    np.savez(out / "composition_scores.npz", **scores)

    rng = np.random.default_rng(seed + 3)
    prompts, spans = [], []
    for _ in range(8):  # needle in a haystack: random words, a needle, more words, then the needle's start
        hay, needle = rng.integers(2, m.cfg.d_vocab, 14), rng.integers(2, m.cfg.d_vocab, 8)
        d = int(rng.integers(0, 8))
        prompts.append(np.concatenate([[0], hay[:d], needle, hay[d:], needle[:2]]))
        spans.append((1 + d, 1 + d + 8))
    r = detect.retrieval_scores(m, prompts, spans, max_new_tokens=6)
    echo(f"\nRetrieval scores (copy-paste from the needle while decoding; {r['n_samples']} of 8 samples recalled > 50%):")
    echo(_table([(f"L{l}H{h}", f"{r['scores'][l, h]:.3f}") for l in range(L) for h in range(H)], ["head", "retrieval"]))
    echo(f"  wrote {out / 'composition.png'}, {out / 'composition_scores.npz'}")
    return dict(scores=scores, strongest=best, channels=ch), r
