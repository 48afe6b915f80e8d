"""Attribution graphs of induction (Ameisen et al. 2025, "Circuit Tracing"; Kamath et al. 2025, "Tracing Attention Computation").

The question. An attribution graph explains one prediction as a graph of transcoder features,
error nodes and token nodes in a *local replacement model*: every MLP is replaced by its
transcoder (plus an error node), and the attention patterns and norm scales are frozen at the
clean run's values. Edges that cross positions are then attention OV paths weighted by the
frozen pattern; *why* a head attends where it does (its QK circuit) is not in the graph (Ameisen
et al., limitations: "missing attention circuits"; Kamath et al. add QK attributions for this
reason, with induction as their first example). On the induction organism the mechanism is known
(experiments/induction.py): previous-token heads in layer 0 write "the token before me" at each
position; induction heads in layer 1 use it as their *key* (K-composition), so from the current
token A at END they attend to the position after A's earlier occurrence and copy that token B.
In the frozen graph this should show as: the logit for B <- token node B at the earlier copy
(position j+1) through the induction heads' OV, directly and through layer-0 features at j+1
(and layer-1 features at END); the previous-token head's part is a pattern effect, so it is
missing (it appears only through V-composition: token A at j -> previous-token head OV -> j+1).

The steps:

1. Prompts [BOS, w1..w_s, w1..w_m] of distinct random words: END holds w_m, whose earlier
   occurrence is at j = m, so the answer w_{m+1} sits at j+1. The organism's heads are classified
   as in the induction experiment (detect.head_scores on [BOS, w1..w20, w1..w20] rows).
2. `saes.attribute` with the shipped transcoders (models/induction-2l/dictionaries/transcoders),
   all prompts in one batched call; `influence.graph_scores`; influence on the correct logit.
3. Head loadings of the edge token(j+1) -> correct logit: the frozen linear model (patterns,
   norm scales and MLP outputs patched to their clean values) with every head's z frozen except
   the chosen ones, the token vector added at j+1; with every head live this is the graph's edge.
4. What the graph cannot show: mean-ablate the previous-token heads' output at j+1 with the
   layer-1 patterns frozen (the graph's world: only the OV path changes) and recomputed.
5. Intervention: ablate the top-3 features by influence on the correct logit (`saes.intervene`,
   attention frozen), against the graph's linear prediction.
6. Exports of the first prompt's pruned graph: viewer JSON, PNG, HTML with top activations.

Read the claims table first, then `graph.png` / `graph.html` (open it in a browser) and
`influence.csv`.
"""

from __future__ import annotations

import numpy as np

from jinterp import detect, edits, saes
from jinterp import sites as S
from jinterp.train import organisms

NAME = "attribution-graph"
TITLE = "Attribution graphs of induction (Ameisen et al. 2025; Kamath et al. 2025)"
ORGANISM = "induction-2l"
TOP_FEATURES = 3  # features ablated in the intervention
TOKEN_RULE = 0.9  # the copied token must be the top token node in at least 90% of the prompts
HEAD_SHARE = 0.5  # the induction heads alone carry at least half of the token(j+1) -> logit edge
PATTERN_SHARE = 0.5  # the previous-token heads act mostly (> 50%) through the patterns


def transcoders_for(model):
    """The shipped per-layer transcoders of the organism (DictionaryError when they do not fit `model`)."""
    path = organisms.models_dir() / ORGANISM / "dictionaries" / "transcoders"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; train it with `jinterp train-dictionaries {ORGANISM} --out "
                                f"{path.parent}`")
    tc = saes.load(str(path))
    saes.check(tc, model)
    return tc


def prompts(vocab: int, n: int, seg: int, m: int, seed: int) -> np.ndarray:
    """[n, 1 + seg + m]: [BOS, w1..w_seg, w1..w_m] with distinct words (ids >= 2) in each row."""
    if not 1 <= m < seg:
        raise ValueError(f"m must be in 1..seg-1 so that the answer w_(m+1) exists, got m={m}, seg={seg}")
    rng = np.random.default_rng(seed)
    words = np.stack([rng.choice(np.arange(2, vocab), seg, replace=False) for _ in range(n)])
    return np.concatenate([np.zeros((n, 1), np.int64), words, words[:, :m]], 1).astype(np.int32)


def cached_sites(cfg):
    """(per-layer sites, global sites) that one clean run records for the frozen model, plus hook_embed."""
    block = ["attn.hook_pattern", "attn.hook_z", "hook_mlp_out"] + [s for s in S.block_sites(cfg) if s.endswith("hook_scale")]
    return block, [s for s in S.global_sites(cfg) if s.endswith("hook_scale")] + ["hook_embed"]


def clean_cache(model, toks) -> dict:
    """{site: numpy array} of one clean run (and "logits"); per-layer sites stacked [L, B, ...]."""
    L = model.cfg.n_layers
    block, glob = cached_sites(model.cfg)
    logits, cache = model.run_with_cache(toks, names=[f"blocks.{l}.{s}" for s in block for l in range(L)] + glob)
    out = {s: np.stack([np.asarray(cache[f"blocks.{l}.{s}"]) for l in range(L)]) for s in block}
    return out | {s: np.asarray(cache[s]) for s in glob} | {"logits": np.asarray(logits)}


def frozen_edits(cfg, cache):
    """live [L, H] -> edits making the forward linear in added vectors: patterns, norm scales and MLP
    outputs at their clean values (`cache` from clean_cache); z of the heads with live[l, h] == 0 frozen too."""
    block, glob = cached_sites(cfg)
    es = [edits.patch(s, cache[s], per_layer=True) for s in block if s != "attn.hook_z"]
    es += [edits.patch(s, cache[s]) for s in glob if s != "hook_embed"]
    z = edits.Value(cache["attn.hook_z"], ("layer", "batch", "pos", "head", "d_head"))

    def with_live(live):
        mask = np.broadcast_to((1.0 - live)[:, :, None], live.shape + (cfg.d_head,)).astype(np.float32)
        return es + [edits.edit("attn.hook_z", edits.SetWhere(z, edits.Value(mask, ("layer", "head", "d_head"))))]

    return with_live


def demeaned(logits, token):
    lg = np.asarray(logits, np.float64)
    return lg[..., token] - lg.mean(-1)


def _name(heads):
    return ", ".join(f"L{l}H{h}" for l, h in heads) or "none"


def run(model, report, *, batch: int | None = None, seed: int = 0, quick: bool = False) -> None:
    from experiments.induction import SCORE_THRESHOLD, dataset

    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    tc = transcoders_for(model)
    n = batch or (2 if quick else 16)
    seg, m = (8, 5) if quick else (16, 8)
    seg = min(seg, cfg.n_ctx - m - 1)
    toks = prompts(cfg.d_vocab, n, seg, m, seed)
    P = toks.shape[1]
    END, J, J1 = P - 1, m, m + 1
    answer = toks[:, J1]
    tok_str = lambda t: saes.graph_export.token_str(model.tokenizer, t)  # noqa: E731
    report.number("n_prompts", n)
    report.number("prompt_layout", f"[BOS, w1..w{seg}, w1..w{m}]: END={END}, earlier occurrence j={J}, answer at j+1={J1}")

    # ---------------------------------------------------------------- 1. the organism's heads
    # one clean run records everything later steps need: the prompts, 32 reference rows of the same layout
    # (the ablation's mean) and the head detector's rows [BOS, w1..w20, w1..w20] (padded to one length)
    ref = prompts(cfg.d_vocab, 32, seg, m, seed + 1)
    det = dataset(model, 16 if quick else 32, min(20, (cfg.n_ctx - 1) // 2), seed + 7)
    if det.shape[1] < P:
        raise ValueError(f"the head detector's rows ({det.shape[1]} tokens) are shorter than the prompts ({P})")
    # the prompts are padded at the end: causal attention leaves their first P positions as they are
    full = clean_cache(model, np.concatenate([np.pad(x, ((0, 0), (0, det.shape[1] - P))) for x in (toks, ref)] + [det]))
    block, glob = cached_sites(cfg)
    cache = {k: full[k][:, :n, :, :P, :P] if k == "attn.hook_pattern" else full[k][:, :n, :P] if k in block
             else full[k][:n, :P] for k in full}
    pats_det = full["attn.hook_pattern"][:, n + 32:]
    sc = {k: np.asarray(detect.score_patterns(pats_det, mask(det)), np.float64) for k, mask in detect.MASKS.items()}
    prev = [(l, h) for l in range(L) for h in range(H) if sc["previous_token"][l, h] > SCORE_THRESHOLD]
    ind = [(l, h) for l in range(1, L) for h in range(H) if sc["induction"][l, h] > SCORE_THRESHOLD]
    report.number("previous_token_heads", _name(prev))
    report.number("induction_heads", _name(ind))
    report.section("Prompts and heads", (
        f"{n} prompts [BOS, w1..w{seg}, w1..w{m}] of distinct random words (seed {seed}); END (position {END}) holds "
        f"w{m}, its earlier occurrence is position j={J}, the answer w{m + 1} sits at j+1={J1}. Heads as the induction "
        f"experiment classifies them (score > {SCORE_THRESHOLD}): previous-token {_name(prev)}, induction {_name(ind)}."))

    # ---------------------------------------------------------------- 2. graphs
    graphs = saes.attribute(model, tc, toks)
    scores = np.array([saes.influence.graph_scores(g) for g in graphs])
    report.number("replacement_score_mean", float(scores[:, 0].mean()))
    report.number("completeness_score_mean", float(scores[:, 1].mean()))
    top1 = np.array([g.logit_tokens[0] == a for g, a in zip(graphs, answer)])
    p_ans = np.array([float(g.logit_probabilities[0]) if t else 0.0 for g, t in zip(graphs, top1)])
    report.number("answer_is_top_logit", float(top1.mean()))
    report.number("answer_probability_mean", float(p_ans.mean()))
    per, rows0 = [], []
    for b, g in enumerate(graphs):
        k = int(np.flatnonzero(g.logit_tokens == answer[b])[0]) if answer[b] in g.logit_tokens else None
        if k is None:
            per.append(None)
            continue
        node = g.logit_nodes.start + k
        w = np.zeros(g.n_nodes, np.float32)
        w[node] = 1.0
        infl = saes.influence.power_series(saes.influence.normalized(g.adjacency), w)
        tokens = infl[g.token_nodes.start:g.token_nodes.stop]
        feats = g.features
        fi = infl[:g.n_features]
        group = lambda sel: float(fi[sel].sum() / max(fi.sum(), 1e-12))  # noqa: E731
        top = np.argsort(-fi, kind="stable")[:TOP_FEATURES]
        per.append(dict(k=k, node=node, infl=infl, top_token=int(np.argmax(tokens)), tok_j1=float(tokens[J1]),
                        tok_j=float(tokens[J]), tok_end=float(tokens[END]),
                        feat_l0_j1=group((feats[:, 0] == 0) & (feats[:, 1] == J1)),
                        feat_last_end=group((feats[:, 0] == L - 1) & (feats[:, 1] == END)),
                        err=float(infl[g.error_nodes.start:g.error_nodes.stop].sum()), top=top))
        if b == 0:
            labels = g.node_labels(model.tokenizer)
            for i in np.argsort(-infl, kind="stable")[:15]:
                rows0.append(dict(node=labels[i], influence_on_answer=float(infl[i]), direct_edge=float(g.adjacency[node, i])))
    ok = [r for r in per if r is not None]
    copied = np.mean([r["top_token"] == J1 for r in ok]) if ok else 0.0
    mean = lambda key: float(np.mean([r[key] for r in ok])) if ok else float("nan")  # noqa: E731
    for key in ("tok_j1", "tok_j", "tok_end", "feat_l0_j1", "feat_last_end", "err"):
        report.number(f"influence_{key}_mean", mean(key))
    report.section("The graphs", (
        f"`saes.attribute` on all {n} prompts in one call, the organism's transcoders (d_tc {tc.d_sae}). Mean "
        f"replacement score {scores[:, 0].mean():.3f}, completeness {scores[:, 1].mean():.3f} (circuit-tracer's "
        f"definitions). The answer is the top logit in {top1.mean():.0%} of prompts (mean p {p_ans.mean():.3f}). "
        f"Influence on the answer's logit (row-normalised |A|, power series): token at j+1 {mean('tok_j1'):.3f}, "
        f"token at j {mean('tok_j'):.3f}, token at END {mean('tok_end'):.3f}, all error nodes {mean('err'):.3f}; of the "
        f"features' influence, {mean('feat_l0_j1'):.0%} sits in layer-0 features at j+1 and {mean('feat_last_end'):.0%} "
        f"in layer-{L - 1} features at END."))
    report.table("influence", rows0, caption="Prompt 0: the nodes with the largest influence on the answer's logit")
    report.claim("the answer's logit is driven by the token after the earlier occurrence (OV of the induction heads, frozen pattern)",
                 "edges across positions are OV paths weighted by the frozen pattern (Ameisen et al. 2025)",
                 f"top token node is j+1 in {copied:.0%} of prompts (influence {mean('tok_j1'):.3f})",
                 bool(ok) and copied >= TOKEN_RULE, f"holds if token j+1 is the answer logit's most influential token "
                 f"node in >= {TOKEN_RULE:.0%} of prompts")
    report.claim("the feature path runs through layer-0 features at j+1 and layer-1 features at END",
                 "token -> features at the source position -> (attention) -> features at END -> logit",
                 f"{mean('feat_l0_j1') + mean('feat_last_end'):.0%} of the features' influence",
                 bool(ok) and mean("feat_l0_j1") + mean("feat_last_end") > 0.5,
                 "holds if those two groups hold most (> 50%) of the feature nodes' influence on the answer")

    # ---------------------------------------------------------------- 3. head loadings
    embed = cache["hook_embed"].astype(np.float32)
    add = np.zeros_like(embed)
    add[:, J1] = embed[:, J1]
    configs = {"all heads": np.ones((L, H))}
    configs.update({f"L{l}H{h} only": np.eye(L * H)[l * H + h].reshape(L, H) for l in range(L) for h in range(H)})
    ind_live = np.zeros((L, H))
    for l, h in ind:
        ind_live[l, h] = 1
    configs["induction heads only"] = ind_live
    clean = cache["logits"][:, END]  # = the frozen model's logits with nothing added
    effect, frozen = {}, frozen_edits(cfg, cache)
    for label, live in configs.items():  # the live mask is data: one compiled program
        moved = np.asarray(model(toks, edits=frozen(live) + [edits.steer("hook_embed", add)]))[:, END]
        effect[label] = np.array([demeaned(moved[b], answer[b]) - demeaned(clean[b], answer[b]) for b in range(n)])
    edge = np.array([g.adjacency[r["node"], g.token_nodes.start + J1] if r else np.nan for g, r in zip(graphs, per)])
    report.number("edge_token_j1_to_answer_mean", float(np.nanmean(edge)))
    report.number("edge_check_max_abs_diff", float(np.nanmax(np.abs(edge - effect["all heads"]))))
    share = {k: float(np.nanmean(v / edge)) for k, v in effect.items()}
    pattern = cache["attn.hook_pattern"][L - 1]
    rows = [dict(heads=k, mean_effect=float(np.nanmean(v)), share_of_edge=share[k]) for k, v in effect.items()]
    report.section("Head loadings of the edge token(j+1) -> answer", (
        "The frozen linear model (attention patterns, norm scales and MLP outputs patched to the clean run's) with z "
        "frozen for every head but the live ones; the token vector W_E[w] is added at j+1 and the answer's demeaned "
        f"logit change read at END. With every head live this is the graph's edge (max difference "
        f"{report.numbers['edge_check_max_abs_diff']:.2g}). Layer-{L - 1} attention END -> j+1 (frozen pattern): " + ", ".join(
            f"L{L - 1}H{h} {pattern[:, h, END, J1].mean():.2f}" for h in range(H)) + "."))
    report.table("head_loadings", rows)
    best = max((k for k in configs if k.endswith(" only") and k.startswith("L")), key=lambda k: abs(share[k]))
    report.claim("the token(j+1) -> answer edge is carried by the organism's induction heads",
                 "edges decompose into head loadings (Kamath et al. 2025); induction heads copy (Elhage et al. 2021)",
                 f"induction heads ({_name(ind)}) alone carry {share['induction heads only']:.0%}; largest single: {best}",
                 bool(ind) and share["induction heads only"] >= HEAD_SHARE and tuple(int(c) for c in best[1:-5].split("H")) in ind,
                 f"holds if the induction heads alone carry >= {HEAD_SHARE:.0%} of the edge and the single head with the "
                 "largest loading is one of them")

    # ---------------------------------------------------------------- 4. what is not in the graph
    mean_z = full["attn.hook_z"][0, n:n + 32, :P].mean(0, keepdims=True)
    ablate = [edits.patch("attn.hook_z", mean_z, layers=0, pos=J1, heads=h) for l, h in prev if l == 0]
    pats = cache["attn.hook_pattern"]
    drop = {}
    for label, freeze in (("patterns frozen", True), ("patterns recomputed", False)):  # the layer mask is data
        es = [edits.patch("attn.hook_pattern", pats, per_layer=True, layers=np.full(L, freeze))] + ablate
        out = np.asarray(model(toks, edits=es))[:, END] if ablate else clean
        drop[label] = float(np.mean([demeaned(clean[b], answer[b]) - demeaned(out[b], answer[b]) for b in range(n)]))
        report.number(f"prev_token_ablation_drop_{label.replace(' ', '_')}", drop[label])
    via_pattern = 1 - drop["patterns frozen"] / drop["patterns recomputed"] if drop["patterns recomputed"] > 0 else float("nan")
    report.section("What the graph cannot show", (
        f"Mean-ablating the previous-token heads ({_name(prev)}) at j+1 (mean over 32 other prompts of the same layout) "
        f"lowers the answer's demeaned logit by {drop['patterns recomputed']:.2f} when the attention patterns are "
        f"recomputed, but changes it by {-drop['patterns frozen']:+.2f} when they are frozen, as in the graph: the rest acts "
        "through the "
        "induction heads' pattern (their keys, K-composition), which has no node or edge in an attribution graph. In the "
        f"graph the previous-token head appears only as an OV path from the token at j (influence {mean('tok_j'):.3f} vs "
        f"{mean('tok_j1'):.3f} for j+1)."))
    report.claim("the previous-token -> induction link (K-composition) is missing from the graph",
                 "QK circuits are not explained by attribution graphs (Ameisen et al. 2025 limitations; Kamath et al. 2025)",
                 f"answer logit drop {drop['patterns recomputed']:.2f} with patterns recomputed, {drop['patterns frozen']:+.2f} "
                 f"with them frozen ({via_pattern:.0%} via the patterns)",
                 bool(prev) and via_pattern > PATTERN_SHARE,
                 f"holds if more than {PATTERN_SHARE:.0%} of the drop disappears when the patterns are frozen")

    # ---------------------------------------------------------------- 5. intervention
    rows, meas, pred, direct = [], [], [], []
    for b, (g, r) in enumerate(zip(graphs, per)):
        if r is None:
            continue
        f3 = [tuple(int(x) for x in g.features[i]) for i in r["top"]]
        iv = [(l, p, f, 0.0) for l, p, f in f3]
        new = np.asarray(saes.intervene(model, tc, toks[b], iv))[END]
        A = g.adjacency.astype(np.float64)
        Ap = A.copy()
        Ap[r["top"]] = 0  # ablated features do not respond
        u = np.zeros(g.n_nodes)
        u[r["top"]] = -1.0  # each loses its whole contribution a_s W_dec
        x = np.linalg.solve(np.eye(g.n_nodes) - Ap, u)
        d0 = demeaned(clean[b], answer[b])
        meas.append(demeaned(new, answer[b]) - d0)
        pred.append(float((A[r["node"]] @ x)))
        direct.append(float(-A[r["node"], r["top"]].sum()))
        rows.append(dict(prompt=b, features=" ".join(f"L{l}P{p}F{f}" for l, p, f in f3), graph_prediction=pred[-1],
                         graph_direct=direct[-1], intervene=meas[-1],
                         logit_change=float(new[answer[b]] - clean[b, answer[b]])))
    report.number("intervention_features", [r["features"] for r in rows])
    report.number("intervention_demeaned_logit_change", meas)
    report.number("intervention_graph_prediction", pred)
    report.section("Intervention", (
        f"Per prompt, the top {TOP_FEATURES} features by influence on the answer's logit are set to 0 with "
        "`saes.intervene` (attention frozen, every later MLP recomputed with its error term, as circuit-tracer's "
        "feature_intervention). The graph's prediction propagates the loss linearly through the other features' edges "
        "(x = (Id - A')^-1 u, A' without the ablated features' rows); 'graph_direct' is the direct edges alone, which "
        "`saes.intervene(..., constrained=True)` reproduces exactly. Changes are of the answer's demeaned logit "
        "(logit minus the mean logit, the graph's target); `logit_change` is the raw logit's."))
    report.table("intervention", rows)
    report.claim(f"ablating the top {TOP_FEATURES} induction-path features lowers the answer's logit",
                 "interventions agree with the graph's prediction (Ameisen et al. 2025 validation)",
                 f"mean {np.mean(meas):+.2f} vs graph {np.mean(pred):+.2f}" if rows else "no graph had the answer as a logit",
                 bool(rows) and all(v < 0 for v in meas),
                 "holds if the demeaned answer logit falls in every prompt")

    # ---------------------------------------------------------------- 6. exports
    g0 = graphs[0]
    pruned = saes.influence.prune(g0)
    saes.to_json(g0, report.stage, slug="induction-0", tokenizer=model.tokenizer, scan=f"jinterp/{ORGANISM}", pruned=pruned)
    report.files += ["induction-0.json", "graph-metadata.json"]
    report.figure("graph", saes.to_png(g0, report.stage / "graph_tmp.png", tokenizer=model.tokenizer, pruned=pruned,
                                       title="prompt 0: " + " ".join(tok_str(t) for t in toks[0])),
                  caption="prompt 0, pruned graph (node threshold 0.8, edge threshold 0.98)")
    (report.stage / "graph_tmp.png").unlink()
    kept = [tuple(int(x) for x in g0.features[i][[0, 2]]) for i in np.flatnonzero(pruned.node_mask[:g0.n_features])]
    rec = organisms.recipe(ORGANISM)
    rng = np.random.default_rng(seed + 2)
    batches = [rec.induction_batch(rng, 16 if quick else 64, 20, cfg.d_vocab, 4, 8) for _ in range(1 if quick else 4)]
    top_acts = saes.feature_top_activations(model, tc, batches, sorted(set(kept)), k=5 if quick else 10) if kept else {}
    saes.to_html(g0, report.stage / "graph.html", tokenizer=model.tokenizer, top_activations=top_acts, pruned=pruned)
    report.files.append("graph.html")
    g0.save(report.stage / "graph0.npz")
    report.files.append("graph0.npz")
    report.number("pruned_nodes", int(pruned.node_mask.sum()))
    report.number("pruned_edges", int(pruned.edge_mask.sum()))
    report.text(f"Prompt 0's pruned graph keeps {int(pruned.node_mask.sum())} of {g0.n_nodes} nodes and "
                f"{int(pruned.edge_mask.sum())} edges: `induction-0.json` (+ `graph-metadata.json`; circuit-tracer's "
                "viewer reads the folder), `graph.html` (self-contained, with each kept feature's top activations on the "
                "organism's training distribution), `graph0.npz` (the full graph, `saes.Graph.load`).")
    report.arrays("attribution_graph", tokens=toks, graph_scores=scores, edge_token_j1=edge,
                  **{f"loading_{k.replace(' ', '_')}": v for k, v in effect.items()})
