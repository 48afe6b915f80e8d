"""Attribution graphs: circuit-tracer 0.5's algorithm (dictionaries.md §4) as compiled, batched programs.

    graph = saes.attribute(model, transcoders, tokens)       # tokens [P] -> Graph; [N, P] -> N graphs
    node_mask, edge_mask, scores = saes.influence.prune(graph)

Every MLP is replaced by its transcoder plus an error node; attention patterns and norm scales are
frozen (the local replacement model, `saes.replacement`). Nodes, in order (rows = targets,
columns = sources of `Graph.adjacency`):

    [selected features (layer, pos, feature order) | errors L x n_pos (l * n_pos + p) | tokens n_pos | logits]

A[t, s] is source s's direct effect on target t's pre-activation (a feature's encoder direction at
its input site; a logit's demeaned unembedding column at ln_final's output) in the frozen linear
model. Error and token rows and logit columns are zero. Logit targets: the most probable tokens
at the last position, the smallest prefix holding `desired_logit_prob` of the mass, at most
`max_n_logits`. `max_feature_nodes` caps the feature rows: after the logit rows, features are
taken in order of partial influence (re-ranked every `update_interval` batches), and the columns
of features never visited are dropped.

One compiled program encodes the clean run; one more computes edge rows, `batch_size` targets per
vmapped backward pass, every prompt of the batch at once, split over `mesh` when given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import sites as S
from jinterp.saes import influence as I
from jinterp.saes import replacement as R
from jinterp.saes.dictionary import CrossLayerTranscoder, Dictionary
from jinterp.saes.tensors import DictionaryError

ARRAYS = ("tokens", "active_features", "activation_values", "selected_features", "adjacency", "logit_tokens",
          "logit_probabilities")
SCALARS = ("n_layers", "n_pos", "vocab_size")


@dataclasses.dataclass
class Graph:
    """One prompt's attribution graph (module docstring for the node order)."""

    tokens: np.ndarray  # [n_pos] int
    active_features: np.ndarray  # [n_active, 3] (layer, pos, feature)
    activation_values: np.ndarray  # [n_active]
    selected_features: np.ndarray  # [n_sel] indices into active_features
    adjacency: np.ndarray  # [n, n] float32, rows = targets, columns = sources
    logit_tokens: np.ndarray  # [n_logits] vocab ids
    logit_probabilities: np.ndarray  # [n_logits]
    n_layers: int
    n_pos: int
    vocab_size: int

    # ---- node index ranges -------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits

    @property
    def feature_nodes(self) -> range:
        return range(0, self.n_features)

    @property
    def error_nodes(self) -> range:
        """Error node of (layer l, position p) is error_nodes[l * n_pos + p]."""
        return range(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def token_nodes(self) -> range:
        start = self.error_nodes.stop
        return range(start, start + self.n_pos)

    @property
    def logit_nodes(self) -> range:
        start = self.token_nodes.stop
        return range(start, start + self.n_logits)

    @property
    def logit_weights(self) -> np.ndarray:
        """[n]: the logit probabilities at the logit nodes, 0 elsewhere (influence's starting weights)."""
        w = np.zeros(self.n_nodes, np.float32)
        w[self.logit_nodes.start:] = self.logit_probabilities
        return w

    @property
    def features(self) -> np.ndarray:
        """[n_sel, 3] (layer, pos, feature) of each feature node."""
        return np.asarray(self.active_features)[np.asarray(self.selected_features, np.int64)].reshape(-1, 3)

    def node_labels(self, tokenizer=None) -> list[str]:
        """One label per node: 'L1 P3 F17', 'err L1 P3', 'tok P3 "the"' (or its id), 'logit " cat" p=0.42'."""
        tok = (lambda t: repr(tokenizer.decode([int(t)]))) if tokenizer is not None else (lambda t: f"#{int(t)}")
        out = [f"L{l} P{p} F{f}" for l, p, f in self.features]
        out += [f"err L{l} P{p}" for l in range(self.n_layers) for p in range(self.n_pos)]
        out += [f"tok P{p} {tok(t)}" for p, t in enumerate(self.tokens)]
        out += [f"logit {tok(t)} p={float(pr):.3g}" for t, pr in zip(self.logit_tokens, self.logit_probabilities)]
        return out

    def __repr__(self):
        return (f"Graph({self.n_pos} positions, {self.n_layers} layers, {self.n_features}/{len(self.active_features)} "
                f"features, {self.n_logits} logits, {self.n_nodes} nodes)")

    # ---- files -----------------------------------------------------------------------------
    def save(self, path) -> str:
        """Write an .npz (the suffix is added when missing); refuses to overwrite an existing file."""
        path = os.fspath(path)
        path = path if path.endswith(".npz") else path + ".npz"
        try:
            f = open(path, "xb")
        except FileExistsError:
            raise FileExistsError(f"{path} exists; attribution graphs are not overwritten: pick a new name or remove it") from None
        with f:
            np.savez(f, **{k: np.asarray(getattr(self, k)) for k in ARRAYS + SCALARS})
        return path

    @classmethod
    def load(cls, path) -> "Graph":
        with np.load(os.fspath(path)) as z:
            missing = [k for k in ARRAYS + SCALARS if k not in z.files]
            if missing:
                raise ValueError(f"{path} is not an attribution graph file: it lacks {missing}")
            return cls(**{k: z[k] for k in ARRAYS}, **{k: int(z[k]) for k in SCALARS})


# ---------------------------------------------------------------------------------------------
# inputs


def _stack(dicts, n_layers) -> Dictionary:
    ds = list(dicts)
    if not all(isinstance(d, Dictionary) for d in ds):
        raise DictionaryError("transcoders must be saes.Dictionary objects (one per layer), a stacked Dictionary, "
                              f"got {[type(d).__name__ for d in ds]}")
    if any(d.stacked for d in ds):
        raise DictionaryError("pass one stacked Dictionary or a list of single-layer ones, not a list of stacked sets")
    layers = tuple(d.layer if d.layer is not None else i for i, d in enumerate(ds))
    if len(ds) != n_layers:
        raise DictionaryError(f"{len(ds)} transcoders for a model with {n_layers} layers: attribution replaces every "
                              f"MLP, so pass one transcoder per layer 0..{n_layers - 1}")
    kinds = {(d.architecture, d.site, d.out_site, d.W_skip is None, d.W_enc.shape, d.W_dec.shape) for d in ds}
    if len(kinds) > 1:
        raise DictionaryError("the per-layer transcoders differ in architecture, sites, skip or shape; they must match to be stacked")
    same = dict(layer=None, hook_name=ds[0].hook_name, source=ds[0].source)  # static fields: one treedef
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[dataclasses.replace(d, **same) for d in ds])
    return dataclasses.replace(stacked, layers=layers, layer=None)


def transcoder_set(transcoders, model) -> tuple[Dictionary | CrossLayerTranscoder, str]:
    """(stacked per-layer transcoders or a cross-layer transcoder, their input site) after checking
    they fit `model` (DictionaryError)."""
    from jinterp.saes import check

    cfg = model.config
    L = cfg.n_layers
    if isinstance(transcoders, CrossLayerTranscoder):
        tc = transcoders
    else:
        tc = transcoders if isinstance(transcoders, Dictionary) and transcoders.stacked else _stack(
            [transcoders] if isinstance(transcoders, Dictionary) else transcoders, L)
    if isinstance(tc, CrossLayerTranscoder):
        if tc.n_layers != L:
            raise DictionaryError(f"this cross-layer transcoder has {tc.n_layers} layers but the model has {L}")
    elif tuple(tc.layers) != tuple(range(L)):
        raise DictionaryError(f"the transcoders cover layers {list(tc.layers)} but the model has {L} layers: attribution "
                              f"replaces every MLP, so pass one transcoder per layer 0..{L - 1}")
    if tc.out_site != R.OUT_SITE:
        raise DictionaryError(f"{tc!r} writes {tc.out_site!r}; an attribution graph replaces each MLP, so its transcoder "
                              f"must write {R.OUT_SITE} (load it with its output hook, e.g. blocks.{{l}}.hook_mlp_out)")
    order = S.block_sites(cfg)
    if tc.site not in order or order.index(tc.site) >= order.index(R.OUT_SITE) or S.layout(tc.site) != S.layout(R.OUT_SITE):
        before = [s for s in order[:order.index(R.OUT_SITE)] if S.layout(s) == S.layout(R.OUT_SITE)]
        raise DictionaryError(f"{tc!r} reads {tc.site!r}; a transcoder for attribution reads a residual-width site of "
                              f"its block before {R.OUT_SITE}: one of {before}")
    if isinstance(tc, Dictionary) and (tc.architecture == "gated" or tc.normalize != "none"
                                       or tc.rescale_acts_by_decoder_norm):
        raise DictionaryError(f"{tc!r}: attribution needs pre-activations x @ W_enc + b_enc and activations decoded as "
                              "a @ W_dec (no gated encoder, no input normalisation, no decoder-norm rescaling)")
    check(tc, model)
    return tc, tc.site


def _tokens(model, tokens):
    if isinstance(tokens, str):
        single = True
    elif isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str):
        single = False
    else:
        single = np.ndim(tokens) == 1
    toks, mask = model.prepare_inputs(tokens)
    if mask is not None:
        raise ValueError("these prompts have different lengths (padding); attribute prompts of one length together")
    return np.asarray(toks), single


def _positive(name, v, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int" + (" or None" if allow_none else "") + f", got {v!r}")
    return int(v)


def salient_logits(probs, max_n_logits=10, desired_logit_prob=0.95):
    """(vocab ids, probabilities): the top max_n_logits by probability, cut after the smallest
    prefix whose cumulative probability reaches desired_logit_prob (§4.5)."""
    order = np.argsort(-probs, kind="stable")[:max_n_logits]
    p = probs[order]
    cut = int(np.searchsorted(np.cumsum(p), desired_logit_prob)) + 1
    return order[:cut], p[:cut]


def _bucket(n: int) -> int:
    """n rounded up to m * 2^e with m in 4..8 (at most 25% padding; few distinct shapes, few compiles)."""
    if n <= 8:
        return max(n, 1)
    e = n.bit_length() - 3
    return -(-n // (1 << e)) << e


# ---------------------------------------------------------------------------------------------
# the algorithm


def attribute(model, transcoders, tokens, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              batch_size: int | None = None, max_feature_nodes: int | None = None, zero_positions=(0,),
              mesh=None, update_interval: int = 4):
    """The attribution graph of each prompt (module docstring).

    transcoders: per-layer transcoders writing hook_mlp_out (a stacked Dictionary or a list, one per
    layer), or a CrossLayerTranscoder (each feature's edges sum over the layers it writes). tokens: [P] ids or a string -> one Graph; [N, P] -> a list of N graphs, computed in the
    same programs. batch_size: target rows per vmapped backward pass (default: up to 512).
    zero_positions: positions whose features and errors are zeroed (the BOS position by default).
    mesh: a jax Mesh whose first axis splits the target rows over devices."""
    cfg = model.config
    tc, in_site = transcoder_set(transcoders, model)
    toks, single = _tokens(model, tokens)
    N, P = toks.shape
    max_n_logits = _positive("max_n_logits", max_n_logits)
    batch_size = _positive("batch_size", batch_size, allow_none=True)
    max_feature_nodes = _positive("max_feature_nodes", max_feature_nodes, allow_none=True)
    update_interval = _positive("update_interval", update_interval)
    if not 0.0 < float(desired_logit_prob) <= 1.0:
        raise ValueError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
    zp = np.atleast_1d(np.asarray(zero_positions if zero_positions is not None else [], np.int64))
    if zp.ndim != 1 or ((zp < 0) | (zp >= P)).any():
        raise ValueError(f"zero_positions must be positions in 0..{P - 1}, got {zero_positions!r}")
    if mesh is not None and model.mesh is not None:
        raise ValueError("this model's parameters are sharded on a mesh already; drop mesh= (it splits the target rows "
                         "of a model held whole on every device)")
    if mesh is not None:
        from jinterp.sharding import auto

        mesh = auto(mesh)
    n_dev = 1 if mesh is None else int(mesh.shape[mesh.axis_names[0]])
    zero = np.zeros(P, bool)
    zero[zp] = True

    c = R.clean_run(model.params, tc, jnp.asarray(toks), jnp.asarray(zero), cfg=cfg, in_site=in_site)
    acts, probs = np.asarray(c["acts"]), np.asarray(c["probs"])
    active = [np.argwhere(acts[b] != 0) for b in range(N)]  # (layer, pos, feature), in index order
    values = [acts[b][tuple(a.T)] for b, a in enumerate(active)]
    logits = [salient_logits(probs[b], max_n_logits, float(desired_logit_prob)) for b in range(N)]
    n_act = [len(a) for a in active]
    L = cfg.n_layers
    src_dev, S_pad = _source_grid(active, values, L, P, isinstance(tc, CrossLayerTranscoder))

    def run(specs, bs, R_pad=None):
        """specs[b]: list of (kind, layer, pos, id) target rows -> host rows [len, n_active_b + (L+1)P + n_logits_b],
        computed in calls of R_pad rows per prompt (default: one call, R_pad a bucketed multiple of bs)."""
        n_rows = max(1, max(len(s) for s in specs))
        if R_pad is None:
            R_pad = n_dev * bs * _bucket(math.ceil(n_rows / (n_dev * bs)))
        if n_rows > R_pad:
            parts = [run([s[i:i + R_pad] for s in specs], bs, R_pad) for i in range(0, n_rows, R_pad)]
            return [np.concatenate([p[b] for p in parts]) for b in range(N)]
        rows = np.zeros((4, N, R_pad), np.int64)
        rows[0] = 2
        for b, s in enumerate(specs):
            if s:
                rows[:, b, :len(s)] = np.asarray(s, np.int64).T
        out = np.asarray(R.edge_rows(model.params, tc, jnp.asarray(toks), src_dev, c["errors"], c["embed"],
                                     tuple(jnp.asarray(r, jnp.int32) for r in rows), cfg=cfg, in_site=in_site, batch=bs,
                                     mesh=mesh))
        res = []
        for b, s in enumerate(specs):
            o = out[b, :len(s)]
            res.append(np.concatenate([o[:, :n_act[b]], o[:, S_pad:], np.zeros((len(s), len(logits[b][0])), np.float32)], 1))
        return res

    logit_specs = [[(1, 0, 0, int(v)) for v in ids] for ids, _ in logits]
    feat_specs = [[(0, int(l), int(p), int(f)) for l, p, f in a] for a in active]
    caps = [n if max_feature_nodes is None else min(max_feature_nodes, n) for n in n_act]
    if all(cap == n for cap, n in zip(caps, n_act)):  # every feature row: one call
        total = max(len(ls) + len(fs) for ls, fs in zip(logit_specs, feat_specs))
        bs = batch_size or min(512, _bucket(math.ceil(total / n_dev)))
        out = run([ls + fs for ls, fs in zip(logit_specs, feat_specs)], bs)
        done = [(o[len(ls):], o[:len(ls)], np.arange(n)) for o, ls, n in zip(out, logit_specs, n_act)]
    else:
        done = _capped(run, logit_specs, feat_specs, logits, n_act, caps, batch_size or 512, update_interval, n_dev)
    graphs = [_assemble(toks[b], active[b], values[b], *done[b], logits[b], L, P, cfg.d_vocab) for b in range(N)]
    return graphs[0] if single else graphs


def _source_grid(active, values, L, P, cross_layer: bool):
    """Decoder rows grouped by slot l*P + p: (source layer, feature, value) [N, L*P, M] (M: the most
    in one slot, rounded up to a power of two), each source's rows in the flat grid [N, S_pad, J]
    (J = 1; L for a cross-layer transcoder, whose feature at layer i has a row at every slot (l, p),
    l >= i; unused entries point past the grid, at a zero), and S_pad."""
    N = len(active)
    J = L if cross_layer else 1
    # one decoder row per (source, output layer): source index, its layer, position, feature, output layer
    rows = []
    for a in active:
        src = np.arange(len(a))
        if cross_layer:
            out = np.concatenate([np.arange(l, L) for l in a[:, 0]]) if len(a) else np.zeros(0, np.int64)
            src = np.repeat(src, L - a[:, 0])
        else:
            out = a[:, 0]
        r = np.stack([src, a[src, 0], a[src, 1], a[src, 2], out], 1) if len(a) else np.zeros((0, 5), np.int64)
        rows.append(r[np.lexsort((r[:, 0], r[:, 4] * P + r[:, 2]))])  # by slot, then source order
    slots = [r[:, 4] * P + r[:, 2] for r in rows]
    most = max([1] + [int(np.bincount(s).max()) for s in slots if len(s)])
    M = 1 << (most - 1).bit_length()  # a power of two: prompts of one length rarely need a new program
    S_pad = _bucket(max(16, max(len(a) for a in active)))
    ids = np.zeros((2, N, L * P, M), np.int32)
    val = np.zeros((N, L * P, M), np.float32)
    flat = np.full((N, S_pad, J), L * P * M, np.int32)
    for b, (r, s) in enumerate(zip(rows, slots)):
        j = np.arange(len(s)) - np.searchsorted(s, s)  # rank within its slot (rows are sorted by slot)
        ids[:, b, s, j] = r[:, 1], r[:, 3]
        val[b, s, j] = values[b][r[:, 0]]
        k = r[:, 4] - r[:, 1] if cross_layer else np.zeros(len(r), np.int64)  # which of the source's rows
        flat[b, r[:, 0], k] = s * M + j
    return tuple(jnp.asarray(x) for x in (ids[0], ids[1], val, flat)), S_pad


def _capped(run, logit_specs, feat_specs, logits, n_act, caps, bs, update_interval, n_dev):
    """The max_feature_nodes path (§4.4): logit rows first, then batches of update_interval * bs
    features per prompt, chosen by partial influence over the rows computed so far."""
    N = len(n_act)
    q = update_interval * bs
    run = functools.partial(run, bs=bs, R_pad=n_dev * bs * math.ceil(q / (n_dev * bs)))  # one shape for every call
    rows = [[r] for r in run(logit_specs)]
    # row -> node index: logit rows are the last nodes of the partial edge matrix
    nodes = [[np.arange(len(logit_specs[b])) + rows[b][0].shape[1] - len(logit_specs[b])] for b in range(N)]
    visited = [np.zeros(n, bool) for n in n_act]
    while any(v.sum() < cap for v, cap in zip(visited, caps)):
        picks = []
        for b in range(N):
            left = caps[b] - visited[b].sum()
            if left <= 0:
                picks.append(np.zeros(0, np.int64))
                continue
            if caps[b] == n_act[b]:
                rank = np.arange(n_act[b])
            else:
                w = np.zeros(rows[b][0].shape[1], np.float32)
                w[-len(logits[b][1]):] = logits[b][1]
                infl = I.partial_influence(np.concatenate(rows[b]), w, np.concatenate(nodes[b]))
                rank = np.argsort(-infl[:n_act[b]], kind="stable")
            picks.append(rank[~visited[b][rank]][:min(q, left)])
        out = run([[feat_specs[b][i] for i in p] for b, p in enumerate(picks)])
        for b, p in enumerate(picks):
            if len(p):
                rows[b].append(out[b])
                nodes[b].append(p)
                visited[b][p] = True
    done = []
    for b in range(N):
        allrows, allnodes = np.concatenate(rows[b]), np.concatenate(nodes[b])
        sel = np.flatnonzero(visited[b])
        is_feat = allnodes < n_act[b]
        feat_rows = np.zeros((n_act[b], allrows.shape[1]), np.float32)
        feat_rows[allnodes[is_feat]] = allrows[is_feat]
        done.append((feat_rows[sel], allrows[~is_feat], sel))
    return done


def _assemble(tokens, active, values, feat_rows, logit_rows, sel, logits, L, P, V) -> Graph:
    """The square adjacency (§4.6): unvisited features' columns dropped; error/token rows zero."""
    n_active = len(active)
    cols = np.concatenate([sel, np.arange(n_active, feat_rows.shape[1])]).astype(np.int64)
    n = len(cols)
    A = np.zeros((n, n), np.float32)
    A[:len(sel)] = feat_rows[:, cols]
    n_logits = len(logits[0])
    A[n - n_logits:] = logit_rows[:, cols]
    return Graph(tokens=np.asarray(tokens, np.int32), active_features=np.asarray(active, np.int32).reshape(-1, 3),
                 activation_values=np.asarray(values, np.float32), selected_features=np.asarray(sel, np.int64),
                 adjacency=A, logit_tokens=np.asarray(logits[0], np.int64),
                 logit_probabilities=np.asarray(logits[1], np.float32), n_layers=int(L), n_pos=int(P), vocab_size=int(V))
