"""A self-contained HTML page to browse an attribution graph, and each feature's top activations.

    tops = saes.graph_html.feature_top_activations(model, transcoders, batches, features, k=8)
    saes.graph_html.to_html(graph, "graph.html", tokenizer=tok, top_activations=tops)

The page needs no server and no network: its script and style are inline and the graph is
embedded as JSON (the same nodes and links as graph_export.to_json writes, plus a layout). Click
a node to list its incoming and outgoing edges (click one to move along it) and, for a feature,
its top activations: contexts with the activating token highlighted. Opening `page.html#<node_id>`
selects that node. When the script has run, the page's title is "ok:<number of nodes>" (a
headless browser reads it to check the page; an error sets it to "error: ...").

`top_activations` maps (layer, feature) to [(tokens as strings, position, value), ...], the
form `feature_top_activations` returns: it runs the model over batches of tokens, encodes the
transcoders' input site at the layers asked for, and keeps a running top-k per feature in one
jitted program (vmapped over features).
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jinterp.saes.graph_export import graph_dict, kept, layout, node_table, pruned_graph, token_str


def _embed(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' survive as themselves."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _check_top(top_activations) -> dict:
    out = {}
    for key, rows in (top_activations or {}).items():
        try:
            layer, feature = (int(v) for v in key)
        except (TypeError, ValueError) as e:
            raise ValueError(f"top_activations keys must be (layer, feature) pairs, got {key!r}") from e
        clean = []
        for r in rows:
            try:
                toks, pos, value = r
                toks = [str(t) for t in toks]
                pos, value = int(pos), float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"top_activations[{key!r}] rows must be (tokens as strings, position, value), got {r!r}") from e
            if not 0 <= pos < len(toks):
                raise ValueError(f"top_activations[{key!r}]: position {pos} is outside its {len(toks)} tokens")
            clean.append(dict(tokens=toks, pos=pos, value=value if np.isfinite(value) else None))
        out[f"{layer}_{feature}"] = clean
    return out


def to_html(graph, path, *, tokenizer=None, top_activations=None, node_threshold=0.8, edge_threshold=0.98,
            pruned=None, title=None, overwrite: bool = True) -> Path:
    """Write the browsable page for the pruned graph to `path` (see the module docstring); returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the path of the .html file to write")
    pruned = pruned_graph(graph, node_threshold, edge_threshold, pruned)
    doc = graph_dict(graph, slug="page", tokenizer=tokenizer, node_threshold=node_threshold,
                     edge_threshold=edge_threshold, scan="-", pruned=pruned)
    table = node_table(graph, tokenizer)
    idx, _ = kept(graph, table, pruned[0], pruned[1])
    xy = layout(graph, table, idx)
    for i, node in zip(idx, doc["nodes"]):
        t = table[i]
        x, y = xy[i]
        node.update(kind=t["kind"], label=t["label"], x=float(x), y=float(y), feature_index=t.get("feature"))
    title = title or "attribution graph: " + "".join(doc["metadata"]["prompt_tokens"])
    data = dict(title=title, n_pos=len(graph.tokens), n_layers=int(graph.n_layers), nodes=doc["nodes"],
                links=doc["links"], top_activations=_check_top(top_activations))
    page = resources.files("jinterp.saes").joinpath("templates/graph.html").read_text(encoding="utf-8")
    page = page.replace("__TITLE__", html.escape(title)).replace("__GRAPH_DATA__", _embed(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# top activations


def _features(transcoders, features):
    from jinterp.saes.dictionary import CrossLayerTranscoder, Dictionary

    if isinstance(transcoders, CrossLayerTranscoder):
        layers, d_sae = tuple(range(transcoders.n_layers)), transcoders.d_sae
    elif isinstance(transcoders, Dictionary) and transcoders.stacked:
        layers, d_sae = tuple(transcoders.layers), transcoders.d_sae
    elif isinstance(transcoders, Dictionary) and transcoders.layer is not None:
        layers, d_sae = (transcoders.layer,), transcoders.d_sae
    else:
        raise ValueError("transcoders must be a per-layer set (a stacked saes.Dictionary), one layer's Dictionary or a "
                         f"CrossLayerTranscoder, got {type(transcoders).__name__}")
    if transcoders.site is None:
        raise ValueError(f"{transcoders!r} does not say which site it reads; load it with hook_name=...")
    feats = [(int(l), int(f)) for l, f in features]
    if not feats:
        raise ValueError("features is empty; pass (layer, feature) pairs, e.g. the graph's feature nodes")
    for l, f in feats:
        if l not in layers:
            raise ValueError(f"feature ({l}, {f}): no transcoder at layer {l}; these transcoders cover layers {list(layers)}")
        if not 0 <= f < d_sae:
            raise ValueError(f"feature ({l}, {f}): feature index out of range 0..{d_sae - 1}")
    return feats, layers


def _encode_fn(transcoders, layers, feats):
    """x [B, P, n_layers_needed, d_in] -> the requested features' activations [n_feat, B, P]."""
    from jinterp.saes.dictionary import CrossLayerTranscoder

    need = sorted({l for l, _ in feats})
    col = {l: j for j, l in enumerate(need)}
    li = jnp.asarray([col[l] for l, _ in feats])
    fi = jnp.asarray([f for _, f in feats])

    def enc(x):
        if isinstance(transcoders, CrossLayerTranscoder):
            full = jnp.zeros(x.shape[:2] + (transcoders.n_layers, x.shape[-1]), x.dtype).at[:, :, jnp.asarray(need)].set(x)
            a = transcoders.encode(full)[:, :, jnp.asarray(need)]
        elif transcoders.stacked:
            a = jnp.stack([transcoders[l].encode(x[:, :, j]) for j, l in enumerate(need)], axis=2)
        else:
            a = transcoders.encode(x[:, :, 0])[:, :, None]
        return jnp.moveaxis(a[:, :, li, fi], -1, 0)  # [n_feat, B, P]

    return need, enc


@jax.jit
def _merge(best_v, best_i, new_v, new_i):
    """Running top-k per feature (vmapped over features): keep the k largest of best and new."""
    k = best_v.shape[-1]

    def one(bv, bi, nv):
        v, j = jax.lax.top_k(jnp.concatenate([bv, nv]), k)
        return v, jnp.concatenate([bi, new_i])[j]

    return jax.vmap(one)(best_v, best_i, new_v)


def feature_top_activations(model, transcoders, token_batches, features, k: int = 10, *, tokenizer=None,
                            skip_bos: bool = True, window=(12, 4)) -> dict:
    """{(layer, feature): [(tokens as strings, position, value), ...]}: each feature's k largest
    positive activations over `token_batches` (an iterable of token id arrays [batch, pos]),
    largest first. The tokens are the context around the activating token (`window` = (tokens
    before, tokens after)); position indexes the activating token in them. skip_bos leaves out
    position 0. `tokenizer` defaults to the model's."""
    feats, layers = _features(transcoders, features)
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    need, enc = _encode_fn(transcoders, layers, feats)
    names = [f"blocks.{l}.{transcoders.site}" for l in need]
    enc = jax.jit(enc)
    best_v = jnp.full((len(feats), int(k)), -jnp.inf, jnp.float32)
    best_i = jnp.zeros((len(feats), int(k)), jnp.int32)
    rows, n_rows, P = [], 0, None
    for batch in token_batches:
        tb, mask = model.prepare_inputs(batch)
        if mask is not None:
            raise ValueError("token_batches must hold prompts of one length (no padding); pass token id arrays [batch, pos]")
        B, Pb = tb.shape
        if P is not None and Pb != P:
            raise ValueError(f"every batch must have the same length; got {Pb} after {P}")
        P = Pb
        if (n_rows + B) * P >= 2**31:
            raise ValueError("too many tokens for int32 indices; pass fewer batches")
        _, cache = model.run_with_cache(tb, names=names)
        x = jnp.stack([cache[n] for n in names], axis=2).astype(jnp.float32)
        a = enc(x)
        if skip_bos:
            a = a.at[:, :, 0].set(-jnp.inf)
        flat = a.reshape(len(feats), B * P)
        best_v, best_i = _merge(best_v, best_i, flat, jnp.arange(B * P, dtype=jnp.int32) + n_rows * P)
        rows.append(np.asarray(tb))
        n_rows += B
    if not rows:
        raise ValueError("token_batches is empty")
    toks = np.concatenate(rows)
    vals, idx = np.asarray(best_v), np.asarray(best_i)
    before, after = window
    out = {}
    for (l, f), vs, ids in zip(feats, vals, idx):
        lst = []
        for v, i in zip(vs, ids):
            if not np.isfinite(v) or v <= 0:
                continue
            r, p = divmod(int(i), P)
            lo, hi = max(0, p - int(before)), min(P, p + int(after) + 1)
            lst.append(([token_str(tok, t) for t in toks[r, lo:hi]], p - lo, float(v)))
        out[(l, f)] = lst
    return out
