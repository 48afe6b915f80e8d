"""Influence, pruning and scores of attribution graphs (circuit-tracer 0.5, dictionaries.md §4.7-4.9).

Pure numpy functions of the adjacency A [n, n] (rows = targets, columns = sources) and the logit
weights w [n] (the logit probabilities at the logit nodes, 0 elsewhere; `Graph.logit_weights`):

    Â = |A| / rowsum|A|                           normalized(A)     (row sums clamped at 1e-10)
    I = w (Â + Â² + ...) = w ((Id - Â)^-1 - Id)   influence(A, w)   (the series ends: the graph is a DAG)

`prune(graph)` keeps the nodes holding node_threshold of the total influence (tokens and logits
always), then the edges holding edge_threshold of the edge influence Â'[t, s] (I'[t] + w[t]) in the
graph of kept nodes, then drops, to a fixed point, feature and error nodes without an outgoing kept
edge and feature nodes without an incoming one. `graph_scores(graph)` gives circuit-tracer's
replacement and completeness scores.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _matrix(a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"an adjacency matrix must be square [n, n], got shape {a.shape}")
    return a.astype(np.result_type(a.dtype, np.float32), copy=False)


def normalized(adjacency, eps: float = 1e-10) -> np.ndarray:
    """|A| with each row divided by its sum (clamped at eps): the fraction of each target's input per source."""
    a = np.abs(_matrix(adjacency))
    return a / np.maximum(a.sum(axis=1, keepdims=True), eps)


def power_series(matrix, weights, max_iter: int = 1000) -> np.ndarray:
    """w M + w M² + ... for a nilpotent M, summed until the term is exactly zero."""
    v = np.asarray(weights, matrix.dtype) @ matrix
    total = v.copy()
    for _ in range(max_iter):
        if not v.any():
            return total
        v = v @ matrix
        total += v
    raise RuntimeError(f"the influence series did not end within {max_iter} steps: the graph has a cycle")


def influence(adjacency, logit_weights, max_iter: int = 1000) -> np.ndarray:
    """[n] influence of every node on the logits: w ((Id - Â)^-1 - Id) with Â = normalized(adjacency)."""
    A = _matrix(adjacency)
    w = np.asarray(logit_weights)
    if w.shape != (A.shape[0],):
        raise ValueError(f"logit_weights must be [n] = [{A.shape[0]}] (probabilities at the logit nodes), got {w.shape}")
    return power_series(normalized(A), w, max_iter)


def partial_influence(rows, logit_weights, row_nodes, max_iter: int = 128) -> np.ndarray:
    """Influence from the rows computed so far (§4.4): rows [k, n] are the edge rows of nodes
    row_nodes [k]; the rest of the graph is taken to have no inputs. Row sums clamp at 1e-8."""
    a = np.abs(np.asarray(rows, np.float32))
    a = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-8)
    prod = np.asarray(logit_weights, np.float32)
    idx = np.asarray(row_nodes, np.int64)
    total = np.zeros(a.shape[1], np.float32)
    for _ in range(max_iter):
        prod = prod[idx] @ a
        if not prod.any():
            return total
        total += prod
    raise RuntimeError(f"the partial influence series did not end within {max_iter} steps")


def find_threshold(scores, threshold: float) -> float:
    """The score at which the descending cumulative sum first reaches `threshold` of the total."""
    s = np.sort(np.asarray(scores).ravel())[::-1]
    cum = np.cumsum(s) / s.sum()
    return s[min(int(np.searchsorted(cum, threshold)), len(s) - 1)]


def cumulative_scores(scores) -> np.ndarray:
    """Each node's cumulative fraction of the total at its rank (descending)."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    out = np.zeros(scores.shape, np.float64)
    out[order] = np.cumsum(scores[order]) / scores.sum()
    return out


class Pruned(NamedTuple):
    node_mask: np.ndarray  # [n] bool
    edge_mask: np.ndarray  # [n, n] bool (rows = targets)
    cumulative_scores: np.ndarray  # [n]


def _counts(graph):
    return len(graph.selected_features), len(graph.tokens), len(graph.logit_tokens), int(graph.n_layers)


def prune(graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """(node_mask, edge_mask, cumulative_scores) by circuit-tracer's rules (module docstring)."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (a fraction of the total influence), got {t}")
    n_feat, n_tok, n_logit, _ = _counts(graph)
    A = _matrix(graph.adjacency)
    w = np.asarray(graph.logit_weights, A.dtype)
    node_infl = influence(A, w)
    node_mask = node_infl >= find_threshold(node_infl, node_threshold)
    fixed = A.shape[0] - n_logit - n_tok  # tokens and logits are always kept
    node_mask[fixed:] = True
    pruned = A.copy()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalized(pruned)
    edge_scores = norm * (power_series(norm, w) + w)[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores, edge_threshold)
    while True:
        old = node_mask.copy()
        node_mask[:fixed] &= edge_mask[:, :fixed].any(axis=0)  # feature and error nodes need an outgoing edge
        node_mask[:n_feat] &= edge_mask[:n_feat].any(axis=1)  # feature nodes need an incoming one
        if (node_mask == old).all():
            break
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
    return Pruned(node_mask, edge_mask, cumulative_scores(node_infl))


def graph_scores(graph) -> tuple[float, float]:
    """(replacement, completeness): the share of the logits' influence reaching them from tokens
    rather than errors, and the influence-weighted share of each node's input not from errors."""
    n_feat, n_tok, _, L = _counts(graph)
    A = _matrix(graph.adjacency)
    w = np.asarray(graph.logit_weights, A.dtype)
    norm = normalized(A)
    infl = power_series(norm, w)
    errors = slice(n_feat, n_feat + L * n_tok)
    tok = infl[errors.stop:errors.stop + n_tok].sum()
    err = infl[errors].sum()
    replacement = tok / (tok + err)
    out = infl + w
    completeness = ((1 - norm[:, errors].sum(axis=1)) * out).sum() / out.sum()
    return float(replacement), float(completeness)
