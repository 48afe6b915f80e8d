"""The IOI circuit (Wang et al., ICLR 2023): which heads make a model say "Mary" after "When Mary and John went to the store, John gave a drink to".

The question: by what path does the model find the indirect object (IO, the name said once) and
not the subject (S, the name said twice)? In GPT-2 small the paper finds name-mover heads
(9.9, 9.6, 10.0) that attend from END to IO and copy it; S-inhibition heads (7.3, 7.9, 8.6, 8.10)
that tell the name movers' *queries* not to attend to S; and induction and duplicate-token heads
that mark, at S2, that S occurred before, which the S-inhibition heads read through their
*values*. Here, on the bundled organism ioi-4l by default (or GPT-2 small with --model DIR):

1. Task. Prompts from experiments/data/ioi.py (15 BABA templates + ABBA swaps), and p_ABC (three
   unrelated names at IO, S1, S2). LD = logit(IO) - logit(S) at END; the rate of IO over S.
2. Head activation patching (noising): each head's output, at every position, is replaced in the
   clean run by its value on the p_ABC prompt (`patching.attn_head_out_all_pos(model, clean,
   abc_cache, metric)`). Effects are 100 * (LD_patched - LD) / LD, in % of the clean LD.
3. Path patching (Algorithm 1, `patching.path_patching`) from every sender head to (a) the final
   residual stream, i.e. the logits (senders at all positions); (b) the name movers' queries
   (sender and receiver at END); (c) the S-inhibition heads' values (sender and receiver at S2);
   (d) the induction heads' keys (sender and receiver at S1+1).
4. Head classes, by stated rules. An effect "counts" if it is at least 5% of the clean LD in
   size and more than 3 standard errors (over prompts) from 0:
   - name mover: counting negative direct effect (3a), and mean attention END->IO larger than
     END->S1 + END->S2;
   - negative name mover: counting positive direct effect (3a);
   - S-inhibition: counting negative effect through the name movers' queries (3b), not a name mover;
   - induction / duplicate-token: counting negative effect through the S-inhibition heads'
     values (3c); induction if its attention S2->S1+1 exceeds S2->S1, else duplicate-token
     (`jinterp.detect` scores on repeated random tokens are reported beside it);
   - previous-token: counting negative effect through the induction heads' keys (3d).
   Backup name movers (heads that take over when the name movers are knocked out) are not searched for.
5. Knockouts are mean ablations over p_ABC with means per template (and word order), per
   position, as in the paper: each head's z is set to the mean of its z over the p_ABC prompts of
   the same template. All knockout configurations (every single head, each class, the circuit
   and its complement, ...) run in one compiled sweep whose cells are [layer, head] masks.
6. Faithfulness: F(M) is the mean LD of the model, F(C) that of the circuit C (all heads outside C
   knocked out; MLPs and embeddings kept; whole heads at every position rather than the paper's
   (head, position) pairs). We report |F(M) - F(C)| / F(M) and the recovered fraction F(C)/F(M).
   Completeness (simplified): max over K in {each class, each single circuit head} of
   |F(C \\ K) - F(M \\ K)| / F(M) (the paper searches K greedily). Minimality (simplified): for
   each v in C, max over K in {{}, v's class minus v} of |F(C \\ (K + v)) - F(C \\ K)| / F(M); the
   paper asks for at least 1%.
7. A learned mask (`jinterp.train.masks`, hard-concrete L0 gates, Louizos et al. 2018): one gate per
   head, trained to keep the mean LD while every gated-off head is mean-ablated as in 5, with a
   penalty per kept head. Its circuit (gate > 0.5) is knocked out in the same sweep as C, and
   compared with C: size, F, Jaccard overlap, the heads only one method keeps.

Read the report's claims table first: the paper's numbers beside ours. On the organism the head
identities cannot match GPT-2's, so the claims compare structure (name movers in late layers,
S-inhibition heads before them acting through their queries, ...), and `holds` says what the
organism shows. On GPT-2 small the claims compare head identities with the paper's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from experiments.data import ioi as data
from jinterp import detect, engine, metrics, patching
from jinterp import edits as E
from jinterp.results import Labelled
from jinterp.train import masks

NAME = "ioi"
TITLE = "Interpretability in the Wild: a circuit for indirect object identification in GPT-2 small (Wang et al., ICLR 2023)"
ORGANISM = "ioi-4l"

PAPER = dict(
    logit_diff=3.56, io_over_s=0.993, io_prob=0.49, faithfulness=0.87, incompleteness=None,
    name_movers=("9.9", "9.6", "10.0"), s_inhibition=("7.3", "7.9", "8.6", "8.10"),
    negative_name_movers=("10.7", "11.10"), induction=("5.5", "5.8", "5.9", "6.9"),
    duplicate_token=("0.1", "0.10", "3.0"), previous_token=("2.2", "4.11"),
    nm_knockout_drop=0.05,
)
MASK_SPARSITY = 0.02  # learned mask: the penalty per kept head, in units of the squared relative LD error
THRESHOLD = 5.0  # % of the clean logit difference
N_SE = 3.0       # standard errors


# ----------------------------------------------------------------------------------------
# a knockout as data: z <- where(mask[layer, head], mean, z); the mask is a sweep cell


@dataclasses.dataclass(frozen=True)
class KnockoutCell:
    """Cell {"mask": [layer, head]}: mean-ablate the masked heads' z (data: per-example means [L, B, P, H, dh])."""

    def __call__(self, cell, data, runner):
        op = E.SetWhere(E.Value(data, ("layer", "batch", "pos", "head", "d_head")),
                      E.Value(cell["mask"][:, :, None], ("layer", "head", "d_head")))
        return runner.score((E.edit("attn.hook_z", op),))


# ----------------------------------------------------------------------------------------


def _label(h) -> str:
    return f"{h[0]}.{h[1]}"


def _heads_where(m) -> list[tuple[int, int]]:
    return [tuple(map(int, x)) for x in np.argwhere(m)]


def _is_gpt2_small(cfg) -> bool:
    return cfg.family == "gpt2" and (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab) == (12, 12, 768, 50257)


def _effects(per_example, ld_clean):
    """Per-example metric [..., B] -> (mean effect %, standard error %) against the clean per-example LD."""
    v = np.asarray(per_example, np.float64)
    d = v - ld_clean
    base = ld_clean.mean()
    return 100 * d.mean(-1) / base, 100 * d.std(-1, ddof=1) / np.sqrt(d.shape[-1]) / abs(base)


def _counts(eff, se, sign):
    return (sign * eff >= THRESHOLD) & (np.abs(eff) > N_SE * se)


def _grid(model, values, name) -> Labelled:
    cfg = model.config
    return Labelled(values, ("layer", "head"), (tuple(map(str, range(cfg.n_layers))), tuple(map(str, range(cfg.n_heads)))), name=name)


def make_generator(tokenizer):
    """The IOI generator for this tokenizer; names/places/objects that split are dropped (and listed)."""
    dropped = []
    kw = dict(names=list(data.NAMES), places=list(data.PLACES), objects=list(data.OBJECTS))
    for _ in range(2):
        try:
            return data.IOIGenerator(tokenizer, **kw), dropped
        except data.SplitWordError as e:
            dropped += e.words
            kw = {k: [w for w in v if w not in e.words] for k, v in kw.items()}
    return data.IOIGenerator(tokenizer, **kw), dropped


def run(model, report, *, batch=None, seed=0, quick=False):
    cfg = model.config
    L, H = cfg.n_layers, cfg.n_heads
    n = batch or (48 if quick else 160)
    gen, dropped = make_generator(model.tokenizer)
    rng = np.random.default_rng(seed)
    b = gen.sample(rng, n)
    clean, abc = b.tokens, b.corrupted
    rows = np.arange(n)
    gpt2 = _is_gpt2_small(cfg)
    report.number("n_prompts", n)
    report.number("dropped_words", dropped)

    # ---- 1. the task -------------------------------------------------------------------
    ld_ex = metrics.logit_diff(b.answers, pos=b.end, per_example=True)
    logits, cache = model.run_with_cache(clean, names=lambda s: s.endswith("attn.hook_z") or s.endswith("attn.hook_pattern"))
    abc_logits, abc_cache = model.run_with_cache(abc, names=lambda s: s.endswith("attn.hook_z"))
    ld = np.asarray(ld_ex(logits), np.float64)
    ld_abc = np.asarray(ld_ex(abc_logits), np.float64)
    lg = np.asarray(logits, np.float32)[rows, b.end]
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    io_prob = float(p[rows, b.answers[:, 0]].mean())
    F_M = float(ld.mean())
    io_over_s = float((ld > 0).mean())
    report.section("1. The task", (
        f"{n} prompts ({gen.n_templates} templates, BABA and ABBA; seed {seed}), e.g. `{gen.text(b, 0)}` -> "
        f"`{gen.tokenizer.decode([int(b.answers[0, 0])])}`; p_ABC: `{gen.text(b, 0, corrupted=True)}`. "
        f"Mean LD {F_M:.3f} (p_ABC: {ld_abc.mean():.3f}); IO over S {100 * io_over_s:.1f}%; mean p(IO) {io_prob:.3f}."
        + (f" Dropped (not single tokens): {', '.join(dropped)}." if dropped else "")))
    report.number("logit_diff", F_M)
    report.number("logit_diff_abc", float(ld_abc.mean()))
    report.number("io_over_s", io_over_s)
    report.number("io_prob", io_prob)

    # attention from END (to IO, S1, S2) and from S2 (to S1, S1+1), every head: [L, H]
    pat = np.asarray(cache.stack("attn.hook_pattern"), np.float32)  # [L, B, H, Q, K]
    # (advanced indices split by a slice put the batch axis first)
    at_end = np.moveaxis(pat[:, rows, :, b.end, :], 0, 1)  # [L, B, H, K]: the END query row
    at_s2 = np.moveaxis(pat[:, rows, :, b.s2, :], 0, 1)    # the S2 query row
    take = lambda a, pos: a[:, rows, :, pos].mean(0)        # a [L, B, H, K], key per example -> [L, H]
    att = {"END->IO": take(at_end, b.io), "END->S1": take(at_end, b.s1), "END->S2": take(at_end, b.s2),
           "S2->S1": take(at_s2, b.s1), "S2->S1+1": take(at_s2, b.s1 + 1)}

    # ---- 2. head activation patching (noising) -----------------------------------------
    act = patching.attn_head_out_all_pos(model, clean, abc_cache, ld_ex, progress=False)
    act_eff, act_se = _effects(act.values, ld)
    report.section("2. Head activation patching", (
        "Each head's output (z, at every position) in the clean run replaced by its value on the p_ABC prompt; "
        "effect = 100 (LD_patched - LD) / LD, % of the clean LD (negative: the head carries the answer)."))
    report.figure("head_patching", _grid(model, act_eff, "head patching: LD change, % (p_ABC -> clean)"), caption="Activation patching of head outputs")

    # ---- 3a. path patching to the logits -----------------------------------------------
    pp = {}
    pp["logits"] = patching.path_patching(model, clean, abc, ld_ex, receivers="resid", progress=False)
    direct, direct_se = _effects(pp["logits"].values, ld)
    nm_attn = att["END->IO"] > att["END->S1"] + att["END->S2"]
    nm_mask = _counts(direct, direct_se, -1) & nm_attn
    neg_mask = _counts(direct, direct_se, +1)
    nms = _heads_where(nm_mask)
    neg = _heads_where(neg_mask)

    # ---- 3b. to the name movers' queries at END ----------------------------------------
    end_sel = b.end[:, None]
    s2_sel = b.s2[:, None]
    sin, ind, dup, prev = [], [], [], []
    eff_q = eff_v = eff_k = None
    if nms:
        pp["nm_queries"] = patching.path_patching(model, clean, abc, ld_ex, receivers=[(l, h, "q") for l, h in nms],
                                                  sender_pos=end_sel, receiver_pos=end_sel, progress=False)
        eff_q, se_q = _effects(pp["nm_queries"].values, ld)
        sin = [h for h in _heads_where(_counts(eff_q, se_q, -1)) if h not in nms]
    # ---- 3c. to the S-inhibition heads' values at S2 -----------------------------------
    if sin:
        pp["sin_values"] = patching.path_patching(model, clean, abc, ld_ex, receivers=[(l, h, "v") for l, h in sin],
                                                  sender_pos=s2_sel, receiver_pos=s2_sel, progress=False)
        eff_v, se_v = _effects(pp["sin_values"].values, ld)
        for h in _heads_where(_counts(eff_v, se_v, -1)):
            if h in sin or h in nms:
                continue
            (ind if att["S2->S1+1"][h] > att["S2->S1"][h] else dup).append(h)
    # ---- 3d. to the induction heads' keys at S1+1 --------------------------------------
    if ind:
        s1p = (b.s1 + 1)[:, None]
        pp["induction_keys"] = patching.path_patching(model, clean, abc, ld_ex, receivers=[(l, h, "k") for l, h in ind],
                                                      sender_pos=s1p, receiver_pos=s1p, progress=False)
        eff_k, se_k = _effects(pp["induction_keys"].values, ld)
        prev = [h for h in _heads_where(_counts(eff_k, se_k, -1)) if h not in ind + dup + sin + nms]

    classes = {"name mover": nms, "negative name mover": [h for h in neg if h not in nms], "S-inhibition": sin,
               "induction": ind, "duplicate-token": dup, "previous-token": prev}
    report.section("3. Path patching", (
        "Algorithm 1: sender head h takes its p_ABC value, every other head's output is frozen to its clean value "
        "(MLPs and LayerNorms recompute), the receivers are recorded, then the clean run is repeated with only the "
        "receivers patched. Effects in % of the clean LD. Receivers: the logits (senders at every position); the "
        "name movers' queries (at END); the S-inhibition heads' values (at S2); the induction heads' keys (at S1+1)."))
    titles = {"logits": "-> logits (direct effect)", "nm_queries": "-> name movers' queries (END)",
              "sin_values": "-> S-inhibition values (S2)", "induction_keys": "-> induction keys (S1+1)"}
    for k, res in pp.items():
        e, _ = _effects(res.values, ld)
        report.figure(f"path_patching_{k}", _grid(model, e, f"path patching {titles[k]}, % LD"), caption=f"Path patching {titles[k]}")

    # detector scores on repeated random tokens
    drng = np.random.default_rng(seed + 1)
    lo = 2 if cfg.d_vocab < 1000 else 1000
    r = drng.integers(lo, min(cfg.d_vocab, lo + 20000), size=(16, 10))
    bos = gen.bos if gen.bos is not None else 0
    rep = np.concatenate([np.full((16, 1), bos), r, r], 1).astype(np.int32)
    det = detect.head_scores(model, rep)

    # head table
    table = []
    cls_of = {h: c for c, hs in classes.items() for h in hs}
    for l in range(L):
        for h in range(H):
            row = dict(head=f"{l}.{h}", layer=l, index=h, cls=cls_of.get((l, h), ""),
                       act_patch=act_eff[l, h], direct=direct[l, h], direct_se=direct_se[l, h],
                       via_nm_q=None if eff_q is None else eff_q[l, h], via_sin_v=None if eff_v is None else eff_v[l, h],
                       via_ind_k=None if eff_k is None else eff_k[l, h])
            row.update({k: float(v[l, h]) for k, v in att.items()})
            row.update({f"detect_{k}": float(np.asarray(v.values)[l, h]) for k, v in det.items()})
            table.append(row)
    report.table("heads", table, caption="Every head: its class, effects (% of clean LD) and attention (mean over prompts).", max_rows=L * H if L * H <= 32 else 30)
    report.text("Classes found: " + "; ".join(f"{c}: {', '.join(map(_label, hs)) or '—'}" for c, hs in classes.items()))

    # attention of the name movers (and the other end-position heads)
    show = list(dict.fromkeys(nms + classes["negative name mover"] + sin
                              + ([tuple(map(int, s.split("."))) for s in PAPER["name_movers"] + PAPER["s_inhibition"]] if gpt2 else [])))
    if not show or L * H <= 32:
        show = [(l, h) for l in range(L) for h in range(H)]
    amat = np.array([[att["END->IO"][h], att["END->S1"][h], att["END->S2"][h]] for h in show])
    report.figure("attention_end", Labelled(amat, ("head", "key"), (tuple(map(_label, show)), ("IO", "S1", "S2")),
                                            name="attention from END (mean over prompts)"),
                  caption="Attention from END to IO, S1 and S2 (name movers attend to IO)")

    # ---- 5. knockouts (mean ablation over p_ABC, per template) --------------------------
    z_abc = np.asarray(abc_cache.stack("attn.hook_z"))  # [L, B, P, H, dh]
    zmean = jnp.asarray(data.template_means(z_abc, b.template, b.abba, axis=1))
    circuit = [h for hs in classes.values() for h in hs]
    cmask = np.zeros((L, H), bool)
    for h in circuit:
        cmask[h] = True
    # 6 (trained here, so its circuit joins the knockout sweep): a learned hard-concrete head mask that
    # keeps the mean LD while every head it drops is mean-ablated exactly as the knockouts do
    mask = masks.fit(model, clean, ld_ex, ablation=zmean, sparsity=MASK_SPARSITY, kind="hard_concrete",
                     steps=100 if quick else 300, seed=seed, progress=False)
    kmask = mask.kept()
    configs = []  # (name, ablated mask)

    def add(name, m):
        configs.append((name, np.asarray(m, bool)))

    def without(hs):
        m = np.zeros((L, H), bool)
        for h in hs:
            m[h] = True
        return m

    for l in range(L):
        for h in range(H):
            add(f"head {l}.{h}", without([(l, h)]))
    add("M", np.zeros((L, H), bool))
    add("C", ~cmask)
    add("mask circuit", ~kmask)
    add("C | mask circuit", ~(cmask | kmask))
    for c, hs in classes.items():
        if hs:
            add(f"M \\ {c}", without(hs))
            add(f"C \\ {c}", ~cmask | without(hs))
    for v in circuit:
        cv = [c for c, hs in classes.items() if v in hs][0]
        rest = [h for h in classes[cv] if h != v]
        add(f"M \\ {_label(v)}", without([v]))
        add(f"C \\ {_label(v)}", ~cmask | without([v]))
        if rest:
            add(f"C \\ ({cv} - {_label(v)})", ~cmask | without(rest))
            add(f"C \\ {cv}", ~cmask | without(classes[cv]))
    names = [c[0] for c in configs]
    ko_masks = np.stack([c[1] for c in configs]).astype(np.float32)
    ko = np.asarray(engine.sweep(model, clean, {"mask": ko_masks}, KnockoutCell(), data=zmean, metric=ld_ex, progress=False,
                                 desc="knockouts"))  # [N, B]
    F = dict(zip(names, ko.astype(np.float64).mean(-1).tolist()))
    single = np.array([F[f"head {l}.{h}"] for l in range(L) for h in range(H)]).reshape(L, H)
    report.section("4. Knockouts (mean ablation over p_ABC, per template)", (
        f"F(M) (nothing knocked out, through the same program) = {F['M']:.3f}; the circuit C = {len(circuit)} of "
        f"{L * H} heads."))
    report.figure("knockout_single", _grid(model, 100 * (single - F_M) / F_M, "single-head knockout: LD change, % of F(M)"),
                  caption="Knocking out one head (mean over p_ABC, per template)")
    F_C = F["C"]
    faith_gap = abs(F_M - F_C) / F_M
    recovered = F_C / F_M
    inc = {}
    for c, hs in classes.items():
        if hs:
            inc[c] = abs(F[f"C \\ {c}"] - F[f"M \\ {c}"]) / F_M
    for v in circuit:
        inc[_label(v)] = abs(F[f"C \\ {_label(v)}"] - F[f"M \\ {_label(v)}"]) / F_M
    incompleteness = max(inc.values()) if inc else float("nan")
    worst_k = max(inc, key=inc.get) if inc else None
    minimal = {}
    for v in circuit:
        cv = [c for c, hs in classes.items() if v in hs][0]
        d = [abs(F[f"C \\ {_label(v)}"] - F_C) / F_M]
        if f"C \\ ({cv} - {_label(v)})" in F:
            d.append(abs(F[f"C \\ {cv}"] - F[f"C \\ ({cv} - {_label(v)})"]) / F_M)
        minimal[_label(v)] = max(d)
    ko_rows = [dict(config=k, mean_logit_diff=v, change_pct=100 * (v - F_M) / F_M) for k, v in F.items() if not k.startswith("head ")]
    report.table("knockouts", ko_rows, caption="Knockout configurations (\\ = knocked out).", max_rows=40)
    report.section("5. Faithfulness, completeness, minimality", (
        f"F(M) = {F_M:.3f}, F(C) = {F_C:.3f}: |F(M) - F(C)| / F(M) = {faith_gap:.3f}; the circuit recovers "
        f"{100 * recovered:.1f}% of the logit difference. Incompleteness (max over K of |F(C\\K) - F(M\\K)| / F(M), "
        f"K each class or single circuit head): {incompleteness:.3f} (worst K: {worst_k}). Minimality: every circuit "
        f"head's largest contribution |F(C\\(K+v)) - F(C\\K)| / F(M): "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in minimal.items()) + "."))
    for k, v in dict(F_M=F_M, F_C=F_C, faithfulness_gap=faith_gap, recovered=recovered, incompleteness=incompleteness).items():
        report.number(k, float(v))
    report.number("minimality", minimal)
    report.number("classes", {c: [_label(h) for h in hs] for c, hs in classes.items()})

    # ---- 6. a learned mask against the patching circuit -----------------------------------
    m_heads, c_heads = set(mask.heads()), set(circuit)
    union = m_heads | c_heads
    jaccard = len(m_heads & c_heads) / len(union) if union else 1.0
    F_mask = F["mask circuit"]
    only_mask, only_c = sorted(m_heads - c_heads), sorted(c_heads - m_heads)
    agree = "agree" if not (only_mask or only_c) else ("disagree" if not (m_heads & c_heads) else "partly agree")
    report.section("6. A learned mask (hard-concrete L0) against the patching circuit", (
        f"A gate per head (Louizos et al. 2018 hard concrete, `jinterp.train.masks.fit`), trained for {mask.info['steps']} "
        f"Adam steps to keep the mean LD (loss ((LD - F(M)) / F(M))^2 + {MASK_SPARSITY} x expected number of heads kept), "
        "with each gated-off head mean-ablated over p_ABC per template exactly as in the knockouts. "
        f"It keeps {len(m_heads)} of {L * H} heads: {', '.join(map(_label, sorted(m_heads))) or 'none'}. "
        f"Knocking out every other head (the sweep above) gives F = {F_mask:.3f}, {100 * F_mask / F_M:.1f}% of F(M) "
        f"(the patching circuit C, {len(c_heads)} heads: {100 * recovered:.1f}%). Overlap with C: Jaccard {jaccard:.2f}; "
        f"only in the mask: {', '.join(map(_label, only_mask)) or 'none'}; only in C: {', '.join(map(_label, only_c)) or 'none'}. "
        f"The two methods {agree}."
        + ("" if agree == "agree" else " They answer different questions: the mask keeps the fewest heads that hold the "
           "mean LD under knockout, while C collects every head with a counting path-patching effect, so C can hold heads "
           "whose knockout the rest of the model absorbs, and the mask can keep heads whose effects cancel in patching.")))
    report.figure("mask_gates", _grid(model, mask.soft(), "learned mask: deterministic gate per head"),
                  caption="Learned head mask (gate > 0.5: kept)")
    mrows = [dict(head=_label((l, h)), gate=float(mask.soft()[l, h]), log_alpha=float(mask.logits[l, h]),
                  in_mask=bool(kmask[l, h]), in_patching_circuit=bool(cmask[l, h]))
             for l in range(L) for h in range(H) if kmask[l, h] or cmask[l, h]]
    report.table("mask_heads", mrows, caption="Heads in the learned mask or the patching circuit.", max_rows=40)
    for k, v in dict(mask_n_kept=len(m_heads), F_mask=F_mask, mask_recovered=F_mask / F_M,
                     mask_faithfulness_gap=abs(F_M - F_mask) / F_M, mask_jaccard=jaccard,
                     mask_metric_kept=mask.info["metric_kept"], F_C_or_mask=F["C | mask circuit"]).items():
        report.number(k, float(v))
    report.number("mask_heads", [_label(h) for h in sorted(m_heads)])
    report.number("mask_only", [_label(h) for h in only_mask])
    report.number("patching_only", [_label(h) for h in only_c])

    # ---- claims --------------------------------------------------------------------------
    fmt = lambda hs: ", ".join(map(_label, hs)) or "none"
    report.claim("mean logit difference IO - S", PAPER["logit_diff"], round(F_M, 3), F_M > 0,
                 "holds if positive (the model prefers IO); the scale of logits differs between models")
    report.claim("IO over S", PAPER["io_over_s"], round(io_over_s, 4), io_over_s >= 0.95, "holds if >= 95% of prompts")
    nm_ko = F.get("M \\ name mover")
    nm_drop = None if nm_ko is None else (F_M - nm_ko) / F_M
    if gpt2:
        found_nm = {_label(h) for h in nms}
        found_sin = {_label(h) for h in sin}
        ov_nm = len(found_nm & set(PAPER["name_movers"]))
        ov_sin = len(found_sin & set(PAPER["s_inhibition"]))
        report.claim("name movers", ", ".join(PAPER["name_movers"]), fmt(nms), ov_nm >= 2,
                     f"holds if at least 2 of the paper's 3 are ours ({ov_nm} are)")
        report.claim("S-inhibition heads", ", ".join(PAPER["s_inhibition"]), fmt(sin), ov_sin >= 3,
                     f"holds if at least 3 of the paper's 4 are ours ({ov_sin} are)")
        report.claim("negative name movers", ", ".join(PAPER["negative_name_movers"]), fmt(classes["negative name mover"]),
                     len({_label(h) for h in classes["negative name mover"]} & set(PAPER["negative_name_movers"])) >= 1,
                     "holds if one of the paper's is ours")
        report.claim("induction + duplicate-token heads", ", ".join(PAPER["induction"] + PAPER["duplicate_token"]), fmt(ind + dup),
                     len({_label(h) for h in ind + dup} & set(PAPER["induction"] + PAPER["duplicate_token"])) >= 2,
                     "holds if at least 2 of the paper's 7 are ours")
    else:
        late = bool(nms) and all(l >= L / 2 for l, _ in nms)
        report.claim("name-mover heads exist in late layers", ", ".join(PAPER["name_movers"]) + " (of 12 layers)",
                     fmt(nms) + f" (of {L} layers)", late,
                     "holds if some head has a counting negative direct effect and attends END->IO more than to S1+S2, "
                     "and all such heads are in the second half of the layers")
        before = bool(sin) and bool(nms) and max(l for l, _ in sin) < max(l for l, _ in nms)
        report.claim("S-inhibition heads precede the name movers and act through their queries",
                     ", ".join(PAPER["s_inhibition"]), fmt(sin), before,
                     "holds if some head has a counting effect through the name movers' queries at END (and so sits before them)")
        report.claim("induction / duplicate-token heads feed the S-inhibition heads' values at S2",
                     ", ".join(PAPER["induction"] + PAPER["duplicate_token"]), f"induction {fmt(ind)}; duplicate {fmt(dup)}",
                     bool(ind or dup), "holds if some head has a counting effect through the S-inhibition values at S2")
        report.claim("negative name movers exist", ", ".join(PAPER["negative_name_movers"]), fmt(classes["negative name mover"]),
                     bool(classes["negative name mover"]), "holds if some head has a counting positive direct effect")
    report.claim("knocking out the name movers costs little (backup heads)", PAPER["nm_knockout_drop"],
                 None if nm_drop is None else round(nm_drop, 3), nm_drop is not None and nm_drop < 0.2,
                 "fraction of LD lost when the name movers are mean-ablated; holds if < 20%")
    report.claim("faithfulness: the circuit recovers the model's LD", PAPER["faithfulness"], round(recovered, 3),
                 faith_gap <= 0.2, f"F(C)/F(M) with all other heads mean-ablated ({len(circuit)} of {L * H} heads); "
                 "holds if |F(M) - F(C)| / F(M) <= 0.2 (paper: 0.13)")
    report.claim("completeness (simplified)", 0.87, round(incompleteness, 3) if inc else None,
                 bool(inc) and incompleteness <= 0.2,
                 "max |F(C\\K) - F(M\\K)| / F(M) over K = each class or circuit head; holds if <= 0.2. The paper's "
                 "0.87 is its greedy search's largest incompleteness (3.09 of F(M) = 3.56), over far more sets K, so "
                 "its circuit is not complete by this measure either")
    report.claim("a learned head mask (hard-concrete L0) finds the patching circuit",
                 "no number (the paper finds its circuit by path patching; the mask is our cross-check)",
                 round(jaccard, 3), jaccard >= 0.5,
                 f"Jaccard overlap of the mask's {len(m_heads)} heads with C's {len(c_heads)}; holds if >= 0.5 "
                 f"(the mask recovers {100 * F_mask / F_M:.1f}% of F(M), C {100 * recovered:.1f}%)")
    report.claim("minimality: every circuit head contributes >= 1%", 0.01, round(min(minimal.values()), 4) if minimal else None,
                 bool(minimal) and min(minimal.values()) >= 0.01, "smallest max_K |F(C\\(K+v)) - F(C\\K)| / F(M) over circuit heads v")

    report.arrays("raw", logit_diff=ld, logit_diff_abc=ld_abc, head_patching=act.values, tokens=clean, corrupted=abc,
                  answers=b.answers, io=b.io, s1=b.s1, s2=b.s2, end=b.end, template=b.template, abba=b.abba,
                  knockout_masks=ko_masks, knockout_logit_diff=ko, knockout_names=np.array(names),
                  mask_logits=mask.logits, mask_kept=kmask, mask_loss=mask.history["loss"], mask_kept_per_step=mask.history["kept"],
                  **{f"path_patching_{k}": v.values for k, v in pp.items()},
                  **{f"attention_{k.replace('->', '_to_').replace('+', 'p')}": v for k, v in att.items()})
