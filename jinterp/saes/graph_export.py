"""Attribution graphs out: the JSON circuit-tracer's / Neuronpedia's viewer reads, and a static PNG.

    saes.graph_export.to_json(graph, "graphs/", slug="induction-1", tokenizer=tok, scan="jinterp/induction-2l")
    saes.graph_export.to_png(graph, "graph.png", tokenizer=tok)

Both show the *pruned* graph (influence.prune: nodes kept up to `node_threshold` of the cumulative
influence on the logits, then edges up to `edge_threshold`), as circuit-tracer's
`create_graph_files` does; pass `pruned=(node_mask, edge_mask, cumulative_scores)` to reuse one
pruning for several outputs.

JSON (reference/dictionaries.md section 4.10): `<slug>.json` = {metadata, qParams, nodes, links},
and `graph-metadata.json` = {"graphs": [metadata, ...]} where an entry with the same slug is
replaced. Node ids: feature `{layer}_{feature}_{pos}`, error `0_{layer}_{pos}`, token
`E_{token_id}_{pos}`, logit `{n_layers+1}_{token_id}_{n_pos-1}`; links carry the raw adjacency
weight A[target, source]. Nodes come in node-index order, links in (target, source) order, exactly
as circuit-tracer 0.5 writes them (tests/test_graph_export.py compares field by field with its output).
One deliberate difference: a list `scan` becomes `custom-<sha1 of the names>` (circuit-tracer uses
Python's `hash`, which changes from process to process).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------
# shared by the JSON, PNG and HTML outputs


def token_str(tokenizer, token_id: int) -> str:
    """One token as text: `tokenizer.decode([id])` (an HF tokenizer, or anything with decode), a
    callable id -> str, or `[id]` without a tokenizer."""
    if tokenizer is None:
        return f"[{int(token_id)}]"
    if hasattr(tokenizer, "decode"):
        return str(tokenizer.decode([int(token_id)]))
    if callable(tokenizer):
        return str(tokenizer(int(token_id)))
    raise TypeError(f"tokenizer must have .decode (an HF tokenizer) or be a callable id -> str, got {type(tokenizer).__name__}")


def check_graph(graph) -> dict:
    """Sizes of the graph's node blocks; ValueError when its arrays disagree with each other."""
    for name in ("tokens", "active_features", "activation_values", "selected_features", "adjacency",
                 "logit_tokens", "logit_probabilities", "n_layers"):
        if not hasattr(graph, name):
            raise ValueError(f"graph has no {name!r}; pass a jinterp.saes.graph.Graph (from the attribution)")
    n_sel, L = len(graph.selected_features), int(graph.n_layers)
    P, n_logits = len(graph.tokens), len(graph.logit_tokens)
    n = n_sel + L * P + P + n_logits
    A = np.asarray(graph.adjacency)
    if A.shape != (n, n):
        raise ValueError(f"graph.adjacency has shape {A.shape} but its nodes number {n} ({n_sel} features + "
                         f"{L}x{P} error + {P} token + {n_logits} logit nodes); the graph's arrays do not belong together")
    af = np.asarray(graph.active_features)
    if af.ndim != 2 or af.shape[1] != 3:
        raise ValueError(f"graph.active_features must be [n_active, 3] (layer, pos, feature), got shape {af.shape}")
    sel = np.asarray(graph.selected_features)
    if sel.size and (sel.min() < 0 or sel.max() >= len(af)):
        raise ValueError(f"graph.selected_features index past the {len(af)} active features")
    if len(graph.logit_probabilities) != n_logits:
        raise ValueError(f"{len(graph.logit_probabilities)} logit probabilities for {n_logits} logit tokens")
    return dict(n_sel=n_sel, n_layers=L, n_pos=P, n_logits=n_logits, n=n, err0=n_sel, tok0=n_sel + L * P,
                logit0=n_sel + L * P + P)


def node_table(graph, tokenizer=None) -> list[dict]:
    """Every node of the graph, in node order: {kind: feature|error|token|logit, layer (token: -1,
    logit: n_layers), pos, node_id (circuit-tracer's), label, and feature / token_id, activation,
    token_prob where they apply}."""
    s = check_graph(graph)
    L, P = s["n_layers"], s["n_pos"]
    af, act = np.asarray(graph.active_features), np.asarray(graph.activation_values)
    out = []
    for i, k in enumerate(np.asarray(graph.selected_features)):
        layer, pos, feat = (int(v) for v in af[k])
        out.append(dict(kind="feature", layer=layer, pos=pos, feature=feat, activation=float(act[k]),
                        node_id=f"{layer}_{feat}_{pos}", label=f"L{layer} F{feat}"))
    for layer in range(L):
        for pos in range(P):
            out.append(dict(kind="error", layer=layer, pos=pos, node_id=f"0_{layer}_{pos}", label=f"err L{layer}"))
    toks = [int(t) for t in np.asarray(graph.tokens)]
    for pos, t in enumerate(toks):
        out.append(dict(kind="token", layer=-1, pos=pos, token_id=t, node_id=f"E_{t}_{pos}", label=token_str(tokenizer, t)))
    for t, p in zip(np.asarray(graph.logit_tokens), np.asarray(graph.logit_probabilities)):
        t = int(t)
        out.append(dict(kind="logit", layer=L, pos=P - 1, token_id=t, token_prob=float(p),
                        node_id=f"{L + 1}_{t}_{P - 1}", label=token_str(tokenizer, t)))
    return out


def pruned_graph(graph, node_threshold=0.8, edge_threshold=0.98, pruned=None):
    """(node_mask [n], edge_mask [n, n], cumulative_scores [n]) as numpy: influence.prune's, or `pruned`."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (a fraction of the total influence), got {v}")
    s = check_graph(graph)
    if pruned is None:
        from jinterp.saes.influence import prune

        pruned = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    node_mask, edge_mask, cum = (np.asarray(a) for a in pruned)
    n = s["n"]
    if node_mask.shape != (n,) or edge_mask.shape != (n, n) or cum.shape != (n,):
        raise ValueError(f"pruned must be (node_mask [{n}], edge_mask [{n}, {n}], cumulative_scores [{n}]), got shapes "
                         f"{node_mask.shape}, {edge_mask.shape}, {cum.shape}")
    return node_mask.astype(bool), edge_mask.astype(bool), cum


def kept(graph, table, node_mask, edge_mask):
    """(kept node indices in node order, links [(source, target, weight)] in (target, source) order):
    kept edges between kept nodes; nodes without a kept link are dropped except tokens and logits."""
    keep = set(np.flatnonzero(node_mask).tolist())
    A = np.asarray(graph.adjacency)
    dst, src = np.nonzero(edge_mask)
    links = [(int(s), int(d), float(A[d, s])) for d, s in zip(dst, src) if s in keep and d in keep]
    linked = {i for s, d, _ in links for i in (s, d)}
    nodes = [i for i in sorted(keep) if i in linked or table[i]["kind"] in ("token", "logit")]
    return nodes, links


# ---------------------------------------------------------------------------------------------
# JSON


def graph_dict(graph, *, slug: str, tokenizer=None, node_threshold=0.8, edge_threshold=0.98, scan=None,
               prompt=None, pruned=None) -> dict:
    """The viewer's JSON document as a dict (what `to_json` writes)."""
    if scan is None:
        scan = getattr(graph, "scan", None)
    if scan is None:
        raise ValueError("pass scan=...: the id of the transcoder set the graph was built with (a hub repo id such as "
                         "'mwhanna/gemma-scope-transcoders', or any name for local viewing); Neuronpedia needs it")
    if isinstance(scan, (list, tuple)):
        transcoder_list = [str(x) for x in scan]
        scan = "custom-" + str(int(hashlib.sha1("-".join(transcoder_list).encode()).hexdigest()[:15], 16))
    else:
        transcoder_list = []
    table = node_table(graph, tokenizer)
    node_mask, edge_mask, cum = pruned_graph(graph, node_threshold, edge_threshold, pruned)
    idx, links = kept(graph, table, node_mask, edge_mask)
    L = int(graph.n_layers)
    first_logit = next(i for i, t in enumerate(table) if t["kind"] == "logit")
    nodes = []
    for i in idx:
        t = table[i]
        kind, layer, pos = t["kind"], t["layer"], t["pos"]
        node = dict(node_id=t["node_id"], feature=0, layer=str(layer), ctx_idx=pos, feature_type="", token_prob=0.0,
                    is_target_logit=False, run_idx=0, reverse_ctx_idx=0, jsNodeId="", clerp="",
                    influence=float(cum[i]), activation=None)
        if kind == "feature":
            f = t["feature"]
            node.update(feature=(layer + f) * (layer + f + 1) // 2 + f, feature_type="cross layer transcoder",
                        jsNodeId=f"{layer}_{f}-0", activation=t["activation"])
        elif kind == "error":
            node.update(feature=-1, feature_type="mlp reconstruction error", jsNodeId=f"{layer}_{pos}-0")
        elif kind == "token":
            node.update(feature=pos, layer="E", feature_type="embedding", jsNodeId=f"E_{t['token_id']}-{pos}")
        else:  # logit: circuit-tracer leaves its influence unset
            p = t["token_prob"]
            node.update(feature=t["token_id"], layer=str(L + 1), feature_type="logit", token_prob=p,
                        is_target_logit=i == first_logit, jsNodeId=f"L_{t['token_id']}-{pos}",
                        clerp=f'Output "{t["label"]}" (p={p:.3f})', influence=None)
        nodes.append(node)
    prompt_tokens = [t["label"] for t in table if t["kind"] == "token"]
    meta = dict(slug=slug, scan=str(scan), transcoder_list=transcoder_list, prompt_tokens=prompt_tokens,
                prompt="".join(prompt_tokens) if prompt is None else str(prompt), node_threshold=float(node_threshold),
                schema_version=1)
    qparams = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    return dict(metadata=meta, qParams=qparams, nodes=nodes,
                links=[dict(source=table[s]["node_id"], target=table[d]["node_id"], weight=w) for s, d, w in links])


def _check_slug(slug):
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise ValueError(f"slug must be a file-name-safe id (letters, digits, '.', '_', '-'; not starting with a "
                         f"punctuation mark), got {slug!r}")


def to_json(graph, path, *, slug: str, tokenizer=None, node_threshold=0.8, edge_threshold=0.98, scan=None,
            prompt=None, pruned=None, overwrite: bool = False) -> Path:
    """Write `<path>/<slug>.json` (the viewer's graph file) and add its metadata to
    `<path>/graph-metadata.json`, replacing an entry with the same slug. Refuses to overwrite an
    existing `<slug>.json` unless overwrite=True. `prompt` defaults to the tokens joined. Returns
    the path of `<slug>.json`. Point circuit-tracer's local server (`circuit-tracer start-server
    --graph_file_dir <path>`) or Neuronpedia's uploader at the folder."""
    _check_slug(slug)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"path {out} is a file; to_json writes <slug>.json and graph-metadata.json into a folder")
    file = out / f"{slug}.json"
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file} exists; pass overwrite=True to replace it, or choose another slug")
    doc = graph_dict(graph, slug=slug, tokenizer=tokenizer, node_threshold=node_threshold,
                     edge_threshold=edge_threshold, scan=scan, prompt=prompt, pruned=pruned)
    out.mkdir(parents=True, exist_ok=True)
    meta_file = out / "graph-metadata.json"
    registry = {"graphs": []}
    if meta_file.exists():
        try:
            registry = json.loads(meta_file.read_text())
            graphs = registry["graphs"]
            if not isinstance(graphs, list):
                raise TypeError
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_file} is not a graph-metadata file ({{\"graphs\": [...]}}); move it away") from e
    registry["graphs"] = [g for g in registry["graphs"] if g.get("slug") != slug] + [doc["metadata"]]
    file.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    meta_file.write_text(json.dumps(registry, indent=2, ensure_ascii=False))
    return file


# ---------------------------------------------------------------------------------------------
# PNG


def layout(graph, table, nodes) -> dict:
    """(x, y) of each kept node: x = position (nodes sharing a cell spread across it), y = row
    (tokens 0, layer l at l + 1, logits at n_layers + 1)."""
    cells: dict = {}
    for i in nodes:
        t = table[i]
        cells.setdefault((t["pos"], t["layer"]), []).append(i)
    xy = {}
    top = int(graph.n_layers)
    for (pos, layer), members in cells.items():
        k = len(members)
        step = 0.6 if layer == top else min(0.8 / max(k, 1), 0.25)  # logits: room for their labels
        for j, i in enumerate(members):
            xy[i] = (pos + (j - (k - 1) / 2) * step, layer + 1)
    return xy


def to_png(graph, path, *, tokenizer=None, node_threshold=0.8, edge_threshold=0.98, pruned=None, title=None,
           figsize=None, dpi: int = 150):
    """Draw the pruned graph to `path` (PNG) and return the matplotlib Figure: positions on the x
    axis (token labels at the bottom), layers on the y axis (logits at the top with their
    probabilities), edge width by |weight| (relative to the largest kept edge), colour by sign
    (blue positive, red negative). Features are circles, error nodes grey squares."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    table = node_table(graph, tokenizer)
    node_mask, edge_mask, _ = pruned_graph(graph, node_threshold, edge_threshold, pruned)
    nodes, links = kept(graph, table, node_mask, edge_mask)
    xy = layout(graph, table, nodes)
    L, P = int(graph.n_layers), len(graph.tokens)
    fig = Figure(figsize=figsize or (max(6.0, 1.3 * P + 2), max(4.0, 1.0 * (L + 2) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if links:
        wmax = max(abs(w) for _, _, w in links) or 1.0
        segs = [(xy[s], xy[d]) for s, d, _ in links]
        widths = [0.3 + 3.2 * abs(w) / wmax for _, _, w in links]
        colors = ["tab:blue" if w >= 0 else "tab:red" for _, _, w in links]
        ax.add_collection(LineCollection(segs, linewidths=widths, colors=colors, alpha=0.55, zorder=1))
    style = {"feature": ("o", "#f4c542"), "error": ("s", "#9e9e9e"), "token": ("D", "#8fd19e"), "logit": ("h", "#c39bd3")}
    for kind, (marker, color) in style.items():
        pts = [xy[i] for i in nodes if table[i]["kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=120, c=color, edgecolors="black", linewidths=0.6, zorder=2, label=kind)
    for i in nodes:
        t = table[i]
        if t["kind"] == "feature":
            ax.annotate(str(t["feature"]), xy[i], fontsize=6, ha="center", va="center", zorder=3)
        elif t["kind"] == "logit":
            ax.annotate(f"{t['label']!r}\np={t['token_prob']:.2f}", xy[i], xytext=(0, 9), textcoords="offset points",
                        fontsize=7, ha="center", va="bottom")
    ax.set_xticks(range(P))
    ax.set_xticklabels([repr(t["label"])[1:-1] for t in table if t["kind"] == "token"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(L + 2))
    ax.set_yticklabels(["tokens"] + [f"L{l}" for l in range(L)] + ["logits"])
    xs = [x for x, _ in xy.values()] or [0.0]
    ax.set_xlim(min(-0.7, min(xs) - 0.4), max(P - 0.3, max(xs) + 0.4))
    ax.set_ylim(-0.5, L + 2.0)
    ax.legend(loc="upper left", fontsize=7, markerscale=0.6, frameon=False)
    ax.set_title(title or f"attribution graph: {len(nodes)} nodes, {len(links)} edges (node {node_threshold}, edge {edge_threshold})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return fig
