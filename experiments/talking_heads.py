"""Talking Heads: low-rank communication channels between heads, and the Laundry List (Merullo et al. 2024).

The paper (arXiv 2406.09519; methods.md section 2) decomposes each attention head's OV matrix by
SVD and scores every singular component of a writer head against a later reader head with the
composition score: a channel is a component the reader's QK reads. On IOI, inhibition heads talk to
the mover head through one or two components, and deleting that component stops the mover from
down-weighting the repeated name. In GPT-2 the channel spans a 3-D subspace at END that indexes list
positions; on the synthetic Laundry List task ("recall from a list") accuracy falls as the list
grows, and moving END within that subspace, or editing the channel's weights, raises accuracy,
"often by over 20%".

Steps, on the list-recall organism (models/list-recall-2l: "packed i_1 .. i_N . took <all but one,
shuffled> . left" -> the item left out; experiments/data/laundry.py says why this is our reading of
the task):

1. Accuracy against list length N (greedy next token at END), prompts split into dev and test halves.
2. Reader: the head (layer >= 1) whose END query attends most to the answer's slot (a mover).
3. Composition per singular component (`circuits.component_composition`, Q-composition, LN folded)
   of every writer head in earlier layers into the reader: CS_r = ||v_r QK|| / ||QK||_F (a random
   direction scores about 1/sqrt(d_model)). CS_r ignores the component's singular value s_r, so
   channels (found from weights alone) are ranked by the component's share of the head's
   composition, w_r = s_r CS_r / ||OV||_F (sum_r w_r^2 = the whole head's score squared).
4. Data check: remove one component at a time (the head's output projected off v_r: exactly
   `circuits.remove_components`, as an edit whose basis is data, so one program serves them all) and
   measure the reader's attention at END to the repeated items' slots (its inhibition): the
   increase is the component's data score, compared with CS_r. Every component of the MAX_WRITERS
   writers with the largest head composition (all of them on the organism).
5. Index subspace: the top N_DIMS channel components' output directions, orthonormalised (B). The
   residual entering the reader's layer at END, projected on B, is decoded (nearest centroid, dev
   -> test) for the answer's list index and for the answer item.
6. Interventions, on the test half, scored on the longer half of the list lengths (N >= the median):
   (a) representation edits at END in span(B), entering the reader's layer: "centroid" sets the
       coordinates to the mean of correct dev prompts with the same N and answer index; "shift"
       moves END along the part in span(B) of the direction that raises the reader's score for the
       answer's key over the repeated items' keys, by alpha * |x_END| (alpha chosen on dev). Both
       use the answer's position, as the paper's does (an oracle edit that shows what the subspace
       controls).
   (b) a weight edit: the channel components rescaled by a factor chosen on dev
       (`circuits.rescale_components`, new params; no oracle).

Read in the report: the claims table, `composition.png` (weights) beside `data_check.png`
(data), `accuracy.png` (accuracy per N before and after each intervention), the tables.

    jinterp experiment talking-heads --out out/th [--quick] [--model DIR]
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from experiments.data import laundry
from jinterp import circuits
from jinterp import edits as E

NAME = "talking-heads"
TITLE = "Talking Heads: Understanding Inter-layer Communication in Transformer Language Models (Merullo et al. 2024)"
ORGANISM = "list-recall-2l"

PAPER_GAIN = 20.0  # "often improving task accuracy by over 20%" (abstract); read as points here
N_MAX = 8  # the longest list tried (the organism's limit; other models: also their positions)
N_DIMS = 3  # the paper's 3-D index subspace in GPT-2
ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # 0 and 1 below: "no edit" is a choice too
FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
CHUNK = 256
MAX_WRITERS = 8  # the data check removes every component of the strongest writers only (a GPT-2 reader has ~100)


@dataclasses.dataclass
class Prompts:
    """Laundry List prompts of several lengths, right-padded to one length (nothing at or before END
    sees the padding under causal attention)."""

    tokens: np.ndarray  # [n, P]
    end: np.ndarray  # [n] position of "left"
    n_items: np.ndarray  # [n]
    target: np.ndarray  # [n] list index of the answer
    answer: np.ndarray  # [n] answer token id
    item: np.ndarray  # [n] answer item index (into the task's items)
    slots: np.ndarray  # [n, P] bool: first-list slots of the repeated items

    def __len__(self):
        return len(self.end)

    def take(self, idx) -> "Prompts":
        return Prompts(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def max_items(model) -> int:
    """The longest list this model is asked about: N_MAX, or fewer if its positions are fewer."""
    return int(min(N_MAX, (model.cfg.n_ctx - 5) // 2, len(laundry.ITEMS)))


def dataset(model, seed: int, n_per: int, lengths=None) -> Prompts:
    """n_per prompts for each list length (default 2..max_items(model)), all padded to one length."""
    if model.tokenizer is None:
        raise ValueError("talking-heads needs a model with a tokenizer (the prompts are built from words)")
    top = max_items(model)
    task = laundry.LaundryList(max_items=top)
    lengths = list(range(laundry.MIN_ITEMS, top + 1)) if lengths is None else list(lengths)
    for N in lengths:
        task.check(N)
    vocab = laundry.Vocab(model.tokenizer, task)
    rng = np.random.default_rng(seed)
    P = laundry.prompt_length(max(lengths))
    rows = []
    for N in lengths:
        b = task.sample(rng, n_per, N)
        toks = np.full((n_per, P), vocab.bos, np.int32)
        toks[:, : laundry.prompt_length(N)] = vocab.ids(b.words())
        pos = laundry.positions(N)
        slots = np.zeros((n_per, P), bool)
        slots[:, pos["items"]] = True
        slots[np.arange(n_per), pos["items"][b.target]] = False
        rows.append(Prompts(toks, np.full(n_per, pos["end"]), np.full(n_per, N), b.target, vocab.item_ids(b.answer), b.answer,
                            slots))
    return Prompts(*(np.concatenate([getattr(r, f.name) for r in rows]) for f in dataclasses.fields(Prompts)))


def _chunks(n: int):
    """Row indices in chunks of one size (the last padded by repeating its final row), so every pass
    over a set of prompts runs one compiled program; yields (indices, number of real rows)."""
    size = min(CHUNK, n)
    for i in range(0, n, size):
        idx = np.arange(i, min(i + size, n))
        yield np.concatenate([idx, np.full(size - len(idx), idx[-1])]), len(idx)


def passes(model, p: Prompts, make_edits=None, take=None):
    """Greedy next token at each prompt's END [n], and take(cache, rows) stacked over rows (or None).
    Every call records the same sites (every layer's attention pattern, resid_pre and keys), so
    unedited passes and weight edits share one compiled program. make_edits(rows) -> edits."""
    L = model.cfg.n_layers
    names = [f"blocks.{l}.{s}" for l in range(L) for s in ("attn.hook_pattern", "hook_resid_pre", "attn.hook_k")]
    preds, got = [], []
    for idx, n_ok in _chunks(len(p)):
        logits, cache = model.run_with_cache(p.tokens[idx], names=names, edits=make_edits(idx) if make_edits else ())
        at_end = logits[jnp.arange(len(idx)), jnp.asarray(p.end[idx])]
        preds.append(np.asarray(at_end.argmax(-1))[:n_ok])
        if take is not None:
            got.append(take(cache, idx)[:n_ok])
    return np.concatenate(preds), (np.concatenate(got) if take is not None else None)


def predictions(model, p: Prompts, make_edits=None) -> np.ndarray:
    return passes(model, p, make_edits)[0]


def accuracy_by_n(p: Prompts, pred, lengths) -> np.ndarray:
    return np.array([np.mean(pred[p.n_items == N] == p.answer[p.n_items == N]) for N in lengths])


def end_attention(model, p: Prompts, layers) -> np.ndarray:
    """Attention pattern rows at END for the given layers: [n, len(layers), H, P]."""
    def take(cache, idx):
        pat = np.stack([np.asarray(cache[f"blocks.{l}.attn.hook_pattern"]) for l in layers], 1)  # [b, l, H, Q, K]
        return pat[np.arange(len(idx)), :, :, p.end[idx]]
    return passes(model, p, take=take)[1]


def reader_scores(att, p: Prompts):
    """(attention to the answer's slot [n, ...], summed attention to the repeated items' slots [n, ...])."""
    tgt_pos = laundry.FIRST_SLOT + p.target
    n = np.arange(len(p))
    return att[n, ..., tgt_pos], np.einsum("n...k,nk->n...", att, p.slots.astype(att.dtype))


def resid_at_end(model, p: Prompts, layer: int, key_head: int):
    """resid_pre[layer] at END [n, D] and key head key_head's keys in that layer [n, P, dh]."""
    def take(cache, idx):
        x = np.asarray(cache[f"blocks.{layer}.hook_resid_pre"])[np.arange(len(idx)), p.end[idx]]
        k = np.asarray(cache[f"blocks.{layer}.attn.hook_k"])[:, :, key_head]
        return np.concatenate([x, k.reshape(len(idx), -1)], -1)
    both = passes(model, p, take=take)[1].astype(np.float64)
    D = model.cfg.d_model
    return both[:, :D], both[:, D:].reshape(len(p), p.tokens.shape[1], -1)


def centroid_decode(train_x, train_y, test_x, test_y) -> float:
    """Nearest-centroid accuracy (classes seen in training only)."""
    cls = np.unique(train_y)
    cent = np.stack([train_x[train_y == c].mean(0) for c in cls])
    pred = cls[np.argmin(((test_x[:, None] - cent[None]) ** 2).sum(-1), 1)]
    return float(np.mean(pred == test_y))


def edit_params(model, chosen, factor):
    """New params with each chosen (layer, head, component) of the writers' OV rescaled by factor."""
    m = model
    for (l, h) in sorted({(l, h) for l, h, _ in chosen}):
        m = m.with_params(circuits.rescale_components(m, l, h, [r for ll, hh, r in chosen if (ll, hh) == (l, h)], factor))
    return m.params


def run(model, report, *, batch: int | None = None, seed: int = 0, quick: bool = False) -> None:
    cfg = model.cfg
    L, H, D = cfg.n_layers, cfg.n_heads, cfg.d_model
    if L < 2:
        raise ValueError("talking-heads needs at least two layers (a writer before the reader)")
    n_per = batch or (24 if quick else 200)
    if n_per < 4:
        raise ValueError(f"batch is the number of prompts per list length (split into dev and test halves); give at least 4, got {n_per}")
    p = dataset(model, seed, n_per)
    lengths = sorted(set(p.n_items.tolist()))
    half = np.arange(len(p)) % 2 == 0
    dev, test = p.take(half), p.take(~half)

    # ---------------------------------------------------------------- 1. accuracy against N
    dev_pred = predictions(model, dev)
    acc_dev = accuracy_by_n(dev, dev_pred, lengths)
    base_pred = predictions(model, test)
    acc_test = accuracy_by_n(test, base_pred, lengths)
    drop = float(acc_test[0] - acc_test[-1])
    report.number("n_prompts", len(p))
    report.number("accuracy_by_n_test", dict(zip(map(str, lengths), acc_test)))
    report.section("Laundry List", (
        f"{n_per} prompts per list length N = {lengths[0]}..{lengths[-1]} (seed {seed}), 'packed i_1 .. i_N . took <all but one, "
        f"shuffled> . left' -> the item left out; half for choosing (dev), half for the numbers (test). Greedy accuracy on "
        f"test falls from {acc_test[0]:.0%} (N={lengths[0]}) to {acc_test[-1]:.0%} (N={lengths[-1]})."))
    long = test.n_items == lengths[-1]
    at = [long & (test.target == t) for t in range(lengths[-1])]
    report.table("accuracy_by_position", [dict(answer_index=t, accuracy=float(np.mean(base_pred[m] == test.answer[m])) if m.any()
                                               else None, n=int(m.sum())) for t, m in enumerate(at)],
        caption=f"test accuracy at N={lengths[-1]} by the answer's position in the list (the paper: recall depends on item order)")
    report.claim("accuracy falls as the list grows", "falls with N (GPT-2; per-N numbers need the PDF)",
                 f"{acc_test[0]:.0%} at N={lengths[0]} -> {acc_test[-1]:.0%} at N={lengths[-1]}", drop >= 0.2,
                 "holds if accuracy at the shortest list minus the longest is at least 20 points (test half)")

    # ---------------------------------------------------------------- 2. the reader (a mover head)
    att = end_attention(model, dev, range(1, L))  # [n, L-1, H, P]
    to_tgt, to_rep = reader_scores(att, dev)
    mover = to_tgt.mean(0)  # [L-1, H]
    lr, hr = np.unravel_index(int(np.argmax(mover)), mover.shape)
    lr = int(lr) + 1
    hr = int(hr)
    report.number("reader", f"L{lr}H{hr}")
    report.section("Reader", (
        f"The reader is L{lr}H{hr}: at END it attends {mover[lr - 1, hr]:.2f} to the answer's slot and "
        f"{to_rep.mean(0)[lr - 1, hr]:.2f} in total to the repeated items' slots (mean over dev prompts; highest "
        "attention to the answer among heads in layers >= 1)."))

    # ---------------------------------------------------------------- 3. composition per component (weights)
    cs = np.asarray(circuits.component_composition(model, "Q"))[:lr, :, :, lr, hr]  # [lr, H, dh]
    dh = cs.shape[-1]
    _, sv, vh = (np.asarray(x) for x in circuits.svd(model, "OV"))
    # CS_r is normalised by the component's own size, so a component with a negligible singular value can
    # score high; its share of the head's composition, w_r = s_r CS_r / ||OV||_F (sum_r w_r^2 = the head's
    # CS^2), ranks the channels, i.e. what the writer actually sends the reader
    w = cs * sv[:lr] / np.sqrt((sv[:lr] ** 2).sum(-1, keepdims=True))
    pairs = [tuple(int(i) for i in np.unravel_index(f, w.shape)) for f in np.argsort(-w, axis=None)]
    chans = [dict(writer=f"L{l}H{h}", component=r, singular_value=float(sv[l, h, r]), score=float(cs[l, h, r]),
                  share_of_head=float(w[l, h, r])) for l, h, r in pairs[:10]]
    report.table("channels", chans, caption=f"top channels into L{lr}H{hr}'s query, from weights alone, ranked by share_of_head "
                 f"(score: CS_r; a random direction scores ~{1 / np.sqrt(D):.3f})")

    # ---------------------------------------------------------------- 4. data check: remove one component
    sub = dev if quick else dev.take(np.arange(min(len(dev), 2 * CHUNK)))  # chunk-sized: no new program
    a_r0 = float(reader_scores(end_attention(model, sub, [lr])[:, 0, hr], sub)[1].mean())
    delta = np.full_like(cs, np.nan)  # writers beyond the MAX_WRITERS strongest (by head composition) stay NaN
    take = lambda cache, idx: np.asarray(cache[f"blocks.{lr}.attn.hook_pattern"][:, hr])[np.arange(len(idx)), sub.end[idx]]
    head_cs = np.sqrt((w**2).sum(-1))
    for f in np.argsort(-head_cs, axis=None)[:MAX_WRITERS]:
        l, h = (int(i) for i in np.unravel_index(f, head_cs.shape))
        for r in range(dh):
            # = circuits.remove_components(model, l, h, [r]) (W_O projected off v_r), as an edit of the head's
            # output: the basis is data, so every removal shares one compiled program
            edit = (E.subspace_patch("attn.hook_result", jnp.zeros(D), jnp.asarray(vh[l, h, r][:, None]), layers=l, heads=h),)
            _, rep = reader_scores(passes(model, sub, lambda idx: edit, take)[1], sub)
            delta[l, h, r] = rep.mean() - a_r0
    from scipy.stats import spearmanr

    done = ~np.isnan(delta)
    rho = float(spearmanr(cs[done], delta[done]).correlation)
    rho_w = float(spearmanr(w[done], delta[done]).correlation)
    rho_abs = float(spearmanr(w[done], np.abs(delta[done])).correlation)
    wl, wh = np.unravel_index(int(np.nanargmax(np.abs(delta).sum(-1))), delta.shape[:2])
    own = np.sort(np.abs(delta[wl, wh]))[::-1]
    share = float(own[:2].sum() / max(own.sum(), 1e-12))
    top_cs = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.where(done, cs, -1))), cs.shape))
    rank_of_top = int((delta[done] > delta[top_cs]).sum()) + 1
    report.number("data_check", dict(spearman=rho, spearman_share=rho_w, spearman_share_vs_abs=rho_abs, main_writer=f"L{wl}H{wh}",
                                     top2_share=share, attention_to_repeats=float(a_r0),
                                     top_cs_component=f"L{top_cs[0]}H{top_cs[1]} C{top_cs[2]}", its_data_rank=rank_of_top))
    panels = lambda v, title: dict(values=v.reshape(lr * H, dh), row_labels=[f"L{l}H{h}" for l in range(lr) for h in range(H)],
                                   col_labels=[f"C{r}" for r in range(dh)], title=title, xlabel="OV component", ylabel="writer")
    report.figure("composition", [panels(cs, f"composition score into L{lr}H{hr} (Q)")], caption="weights: per-component Q-composition")
    report.figure("data_check", [panels(delta, "attention to repeated items: change on removal")],
                  caption=f"data: removing one component; L{lr}H{hr}'s summed attention to the repeated items at END "
                          f"(baseline {a_r0:.3f})")
    report.claim("composition scores predict the data effect of removing a component", "Fig. 2: weight-based and data-based "
                 "scores agree (qualitative)", f"Spearman {rho:.2f} over {done.sum()} writer components", rho >= 0.5,
                 f"holds at Spearman >= 0.5 between CS_r and the rise in the reader's attention to repeated items; the top-CS "
                 f"component (L{top_cs[0]}H{top_cs[1]} C{top_cs[2]}) ranks {rank_of_top} of {done.sum()} by data effect. Not a "
                 f"criterion (added after the first run): the singular-value-weighted share w_r gives Spearman {rho_w:.2f} "
                 f"(and {rho_abs:.2f} against the size of the change)")
    report.claim("a writer's effect on the reader is concentrated in one or two components", "one or two components (Fig. 2)",
                 f"top 2 of L{wl}H{wh}'s {dh} components: {share:.0%} of its effect", share >= 0.5,
                 "the writer whose removals move the reader most; holds if its top two components carry >= 50% of the summed "
                 "|change|")

    # ---------------------------------------------------------------- 5. the index subspace at END
    chosen = pairs[:N_DIMS]
    B = np.linalg.qr(np.stack([vh[l, h, r] for l, h, r in chosen], 1).astype(np.float64))[0]  # [D, k]
    x_dev, k_dev = resid_at_end(model, dev, lr, hr // cfg.group_size)
    x_test, k_test = resid_at_end(model, test, lr, hr // cfg.group_size)
    c_dev, c_test = x_dev @ B, x_test @ B
    idx_acc = np.mean([centroid_decode(c_dev[dev.n_items == N], dev.target[dev.n_items == N], c_test[test.n_items == N],
                                       test.target[test.n_items == N]) for N in lengths])
    chance = float(np.mean([1 / N for N in lengths]))
    item_acc = centroid_decode(c_dev, dev.item, c_test, test.item)
    xc = x_test - x_test.mean(-1, keepdims=True)
    frac = float(np.mean(((xc @ B) ** 2).sum(-1) / (xc**2).sum(-1)))
    report.number("index_subspace", dict(components=[f"L{l}H{h} C{r}" for l, h, r in chosen], index_decoding=float(idx_acc),
                                         index_chance=chance, item_decoding=item_acc, item_chance=1 / len(laundry.ITEMS)))
    report.claim(f"a {N_DIMS}-D subspace at END indexes the list position", "3-D subspace in GPT-2 traverses list positions",
                 f"answer index decoded {idx_acc:.0%} (chance {chance:.0%}); answer item {item_acc:.0%} "
                 f"(chance {1 / len(laundry.ITEMS):.0%})", idx_acc >= 2 * chance,
                 f"span of the top {N_DIMS} channel components' output directions; nearest centroid per N, dev -> test; holds if "
                 f"the index is decoded at twice chance or better (the item's identity is shown for contrast; "
                 f"{frac:.1%} of END's centred residual energy lies in the subspace)")

    # ---------------------------------------------------------------- 6. interventions
    hard = lengths[len(lengths) // 2 :]  # the longer half of the lengths, where accuracy has fallen
    in_hard = lambda q: np.isin(q.n_items, hard)
    score = lambda q, pred: float(np.mean(pred[in_hard(q)] == q.answer[in_hard(q)]))
    base = score(test, base_pred)
    Bj = jnp.asarray(B, jnp.float32)

    def centroid_edit(q, cent):
        val = np.stack([cent[(int(N), int(t))] for N, t in zip(q.n_items, q.target)]) @ B.T  # [n, D]
        return lambda idx: (E.subspace_patch("resid_pre", jnp.asarray(val[idx, None], jnp.float32), Bj, layers=lr,
                                             pos=q.end[idx, None], pos_axis="selected"),)

    ok_dev = dev_pred == dev.answer
    cent = {}
    for N in lengths:
        for t in range(N):
            sel = (dev.n_items == N) & (dev.target == t)
            good = sel & ok_dev
            cent[(N, t)] = c_dev[good if good.sum() >= 3 else sel].mean(0) if sel.any() else np.zeros(len(chosen))
    Wq = np.asarray(circuits.head_weights(model).W_Q[lr, hr], np.float64)  # [D, dh], ln1 folded

    def shift_dirs(q, x, keys):
        n = np.arange(len(q))
        k_t = keys[n, laundry.FIRST_SLOT + q.target]
        k_rep = np.einsum("npd,np->nd", keys, q.slots) / q.slots.sum(1, keepdims=True)
        g = ((k_t - k_rep) @ Wq.T) @ B @ B.T  # the part in span(B) of the direction raising score(answer) - score(repeats)
        xc = x - x.mean(-1, keepdims=True)
        return g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12) * np.linalg.norm(xc, axis=-1, keepdims=True)

    def shift_edit(q, dirs, alpha):
        return lambda idx: (E.steer("resid_pre", jnp.asarray(alpha * dirs[idx, None], jnp.float32), layers=lr, pos=q.end[idx, None],
                                    pos_axis="selected"),)

    results = {}
    results["centroid"] = (None, predictions(model, test, centroid_edit(test, cent)))
    d_dev, d_test = shift_dirs(dev, x_dev, k_dev), shift_dirs(test, x_test, k_test)
    best = max(ALPHAS, key=lambda a: score(dev, predictions(model, dev, shift_edit(dev, d_dev, a))))
    results["shift"] = (best, predictions(model, test, shift_edit(test, d_test, best)))
    best_f = max(FACTORS, key=lambda f: score(dev, predictions(model.with_params(edit_params(model, chosen, f)), dev)))
    results["weights"] = (best_f, predictions(model.with_params(edit_params(model, chosen, best_f)), test))
    rows = [dict(condition="none", chosen_on_dev="", hard_accuracy=base, **{f"N={N}": a for N, a in zip(lengths, acc_test)})]
    for name, (ch, pred) in results.items():
        rows.append(dict(condition=name, chosen_on_dev="" if ch is None else str(ch), hard_accuracy=score(test, pred),
                         **{f"N={N}": a for N, a in zip(lengths, accuracy_by_n(test, pred, lengths))}))
    report.table("interventions", rows, caption=f"test accuracy per N; 'hard' = the longer half of the lengths: {hard}")
    report.figure("accuracy", _lines(lengths, rows))
    what = {"centroid": ("representation edit: END set to the answer index's centroid in the subspace", "oracle"),
            "shift": ("representation edit: END moved in the subspace toward the answer's key", "oracle; alpha on dev"),
            "weights": ("weight edit of the channel components", "factor on dev; no oracle")}
    for name, (title, how) in what.items():
        gain = 100 * (score(test, results[name][1]) - base)
        room = "" if 100 * (1 - base) >= PAPER_GAIN else (
            f"; it cannot hold here: accuracy on these lengths is {base:.0%} before the edit, less than {PAPER_GAIN:.0f} points "
            "below 100%")
        report.claim(title + " improves accuracy", f">{PAPER_GAIN:.0f}% (often)", f"{gain:+.1f} points ({base:.0%} -> "
                     f"{base + gain / 100:.0%})", gain >= PAPER_GAIN,
                     f"test half, lengths {hard}; {how}; holds at +{PAPER_GAIN:.0f} points or more (the paper's % read as "
                     f"points){room}")
    report.arrays("talking_heads", composition=cs, data_delta=delta, basis=B, coords_test=c_test, accuracy_test=acc_test,
                  accuracy_dev=acc_dev, **{f"pred_{k}": v[1] for k, v in results.items()})


def _lines(lengths, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for r in rows:
        ax.plot(lengths, [100 * r[f"N={N}"] for N in lengths], "o-", label=r["condition"])
    ax.set_xlabel("list length N")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    return fig
