"""Work accounting for sweeps: the matrix-product FLOPs a sweep performed, and the fewest an exact
sweep needs, so benchmarks can show the gap to the limit.

Counted: the products of attention (Q, K, V, O projections, scores and mixes) and the MLP, and the
unembedding; norms, softmax and other elementwise work are left out of both figures.

The minimum for a cell whose edits start at layer l and position p: layers >= l at positions >= p
(keys and values before p come from the base run), attention over causal keys only, the last block's
queries and MLP only at the positions the metric reads, and logits only at those positions and
token ids. Plus one base forward, which every exact sweep needs (the cached run cells start from).

Mixture of experts: the decoder runs every expert on every token (arch/moe.py), so the FLOPs performed
count all n_experts experts per row; the minimum counts the top_k experts a sparse dispatch would run.
Both count the router and the shared expert.
"""

from __future__ import annotations

import numpy as np


def mlp_flops(cfg, sparse: bool = False) -> int:
    """Matrix-product FLOPs of one row's MLP. Mixture of experts: every expert (as the decoder computes
    them), or only the top_k chosen ones when sparse, plus the router and the shared expert."""
    D, F = cfg.d_model, cfg.d_mlp
    if cfg.mlp != "moe":
        return (3 if cfg.mlp == "gated" else 2) * 2 * D * F
    n = cfg.top_k if sparse else cfg.n_experts
    return n * 3 * 2 * D * F + 2 * D * cfg.n_experts + 3 * 2 * D * cfg.d_shared + 2 * D * cfg.shared_gate


def _block(cfg, q_rows, kv_rows, pairs, from_z=False, sparse=False):
    """One block's FLOPs: q_rows query rows (Q, O, MLP), kv_rows key/value rows, `pairs` (query, key)
    pairs of scores and mixes; from_z: the block resumes from attention mixes (O and MLP only);
    sparse: a mixture of experts runs only its chosen experts (see mlp_flops)."""
    D, H, K, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    mlp = mlp_flops(cfg, sparse)
    qo = 2 * D * H * dh
    if from_z:
        return q_rows * (qo + mlp)
    return q_rows * (2 * qo + mlp) + kv_rows * 4 * D * K * dh + pairs * 4 * H * dh


def packed_waste(cfg, P: int) -> float:
    """Share of a re-run row's FLOPs that a packed staircase still spends on a row before its cell's first
    position (arch.resume_cells): that row's queries' scores and mixes over P keys."""
    return _block(cfg, 0, 0, P) / _block(cfg, 1, 1, P)


def forward_flops(cfg, batch: int, P: int, sparse: bool = False) -> int:
    """One full forward of batch x P tokens with logits everywhere (causal attention); sparse: count a
    mixture of experts' chosen experts only (mlp_flops)."""
    per_layer = _block(cfg, P, P, P * (P + 1) // 2, sparse=sparse)
    return int(batch * (cfg.n_layers * per_layer + 2 * cfg.d_model * cfg.d_vocab * P))


def minimum_flops(cfg, batch: int, P: int, first_layer, first_pos, positions=None, n_vocab=None,
                  from_z: bool = False) -> int:
    """The fewest FLOPs an exact sweep of these cells needs (module docstring), base run included.
    from_z: the edits sit at or after attn.hook_z, so a cell's first block needs only its output
    projection and MLP (attention there is unchanged)."""
    read = np.arange(P) if positions is None else np.asarray(positions)
    V = cfg.d_vocab if n_vocab is None else n_vocab
    L = cfg.n_layers
    total = forward_flops(cfg, batch, P, sparse=True)
    blk = lambda *a: _block(*a, sparse=True)
    for l, p in zip(np.asarray(first_layer), np.asarray(first_pos)):
        l, p = int(l), int(min(p, P))
        rows = P - p
        if rows == 0:
            continue
        causal = sum(q + 1 for q in range(p, P))
        n_read = int((read >= p).sum())
        last_q = n_read if positions is not None else rows
        last_pairs = sum(q + 1 for q in read if q >= p) if positions is not None else causal
        per = (L - 1 - l) * blk(cfg, rows, rows, causal) + blk(cfg, last_q, rows, last_pairs)
        if from_z and l < L - 1:
            per += blk(cfg, rows, rows, causal, True) - blk(cfg, rows, rows, causal)
        total += batch * (per + 2 * cfg.d_model * V * n_read)
    return int(total)


def minimum_for(cfg, stats: dict) -> int:
    """minimum_flops for the sweep `sweep(..., stats={})` recorded."""
    return minimum_flops(cfg, stats["batch"], stats["P"], stats["first_layer"], stats["first_pos"],
                         stats["positions"], stats["n_vocab"], from_z=stats["from_z"])


def performed_flops(cfg, stats: dict) -> int:
    """FLOPs a sweep performed, from the record `sweep(..., stats={})` fills: its chunks as planned
    (padding included), the rows each re-ran, the keys attention read, and the logits it computed.
    A packed chunk's products run each cell's rows from its own first position; on a mesh every
    device's products are as large as the busiest device's (arch/packing.py)."""
    B, P, L = stats["batch"], stats["P"], cfg.n_layers
    positions, V = stats["positions"], stats["n_vocab"]
    read = np.arange(P) if positions is None else np.asarray(positions)
    total = forward_flops(cfg, B, P)  # the base run
    for ch in stats["chunks"]:
        s0 = ch["s0"]
        q_all = int((read >= s0).sum()) if positions is not None else P - s0  # query rows of the last block
        starts = np.asarray([l for l, _ in ch["starts"]])
        if ch.get("packed") is None:  # every cell computes every row from s0: one device's worth
            slot_start = np.repeat(starts, [n for _, n in ch["starts"]])
            first = np.full((1, len(slot_start)), s0)
        else:  # [devices, cells per device], each device's slice in start-layer order
            slot_start = np.repeat(starts, ch["counts"])
            first = np.maximum(np.asarray(ch["packed"]), s0)
        n_dev = len(first)
        live = P - first
        live_last = (read[None, None] >= first[..., None]).sum(-1) if positions is not None else live
        for l in range(int(slot_start.min()), L) if len(slot_start) else ():
            active = slot_start <= l
            # cells starting here resume from the base run's attention mixes (output projection and MLP only)
            split = stats["from_z"] and l < L - 1
            for group, from_z in (((active & (slot_start == l), True), (active & (slot_start < l), False)) if split
                                  else ((active, False),)):
                n = int(group.sum())
                if not n:
                    continue
                q_rows = (live_last if l == L - 1 else live)[:, group].sum(1)
                pairs = n_dev * n * (q_all if l == L - 1 else P - s0) * P  # attention: every row from s0
                total += B * _block(cfg, n_dev * int(q_rows.max()), n_dev * int(live[:, group].sum(1).max()), pairs, from_z)
        total += B * 2 * cfg.d_model * V * len(read) * n_dev * len(slot_start)
    return int(total)
