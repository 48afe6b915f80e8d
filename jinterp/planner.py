"""Memory planning from a config alone: what one device holds for a model, a forward, a full
activation cache and a sweep's chunk, and whether it fits (`jinterp plan` on the command line).

Parameters follow jinterp.sharding's rules exactly (norm weights stay float32, as loading does).
Activations and cache are estimates of what is live: a forward's residual-sized tensors (x6), its
MLP hidden (x3), attention scores and pattern (2 x B*H*T*T) and the logits (B*T*V); the cache holds
every site `run_with_cache` records, sized by the site's layout. Head, d_mlp and vocabulary axes
are divided by the mesh's "model" axis. A mixture of experts' MLP hidden is n_experts wide (every
expert runs on every token), divided by the "expert" axis. The sweep chunk is the size the driver picks: as many cells
as fit in engine.plan.chunk_budget: MEMORY_FRACTION of the device's memory left free by the
parameters and the base run (`memory` is the device's free memory before loading).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from jinterp import sharding
from jinterp.arch import emitted_sites, param_shapes
from jinterp.config import Config
from jinterp.edits import site_shape
from jinterp.engine.plan import MEMORY_FRACTION, bytes_per_cell, device_memory
from jinterp.loading import resolve_dtype

GiB = 2**30


def config_of(source) -> Config:
    """A Config from a Config, a model directory or bundled name, or a path to config.json (no weights read)."""
    if isinstance(source, Config):
        return source
    from jinterp import loading
    from jinterp.arch import families
    from jinterp.io import hf

    p = Path(str(source)).expanduser()
    d = p.parent if p.name == "config.json" else (p if p.is_dir() else loading.resolve(source))
    hf_cfg = hf.read_config(d, families.supported())
    return families.family_for(hf_cfg.model_type).config(hf_cfg)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    name: str
    mesh: dict
    dtype: str
    batch: int
    seq: int
    params: int  # bytes per device
    activations: int
    cache: int
    chunk_cells: int  # cells per sweep chunk the driver would run
    chunk: int  # bytes of that chunk
    memory: int  # free bytes per device before loading, planned for
    cfg: Config = dataclasses.field(repr=False)

    @property
    def total(self) -> int:
        """A sweep's peak: parameters, the base run's activations, and one chunk."""
        return self.params + self.activations + self.chunk

    @property
    def fits(self) -> bool:
        return self.params + self.activations <= self.memory and self.chunk_cells >= 1

    def __str__(self):
        rows = [("parameters", self.params), ("one forward's activations", self.activations),
                ("full activation cache", self.cache), (f"sweep chunk ({self.chunk_cells} cells)", self.chunk),
                ("free memory", self.memory)]
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items()) or "one device"
        lines = [f"{self.name}: batch {self.batch} x seq {self.seq}, {self.dtype}, mesh {mesh}; per device:"]
        lines += [f"  {k:<32}{v / GiB:>10.2f} GiB" for k, v in rows]
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        if self.fits:
            return f"fits: a sweep peaks near {self.total / GiB:.2f} GiB per device"
        over = self.params + self.activations - self.memory
        return f"does not fit: {over / GiB:.2f} GiB per device over. Try: " + "; ".join(self.suggestions())

    def suggestions(self) -> list[str]:
        out = []
        if self.dtype == "float32":
            p = plan(self.cfg, self.batch, self.seq, mesh=self.mesh, dtype="bfloat16", memory=self.memory)
            if p.fits:
                out.append("dtype bfloat16")
        n = math.prod(self.mesh.values()) if self.mesh else 1
        for devices in (2 * n, 4 * n, 8 * n, 16 * n, 64 * n):
            for m in sorted({d for d in range(1, devices + 1) if devices % d == 0}, reverse=True):
                shape = {"data": devices // m, "model": m}
                try:
                    p = plan(self.cfg, self.batch, self.seq, mesh=shape, dtype=self.dtype, memory=self.memory)
                except sharding.ShardingError:
                    continue
                if p.fits:
                    out.append(f"{devices} devices as --mesh data={devices // m},model={m}")
                    break
            if len(out) and out[-1].startswith(f"{devices} devices"):
                break
        if self.batch > 1:
            p = plan(self.cfg, 1, self.seq, mesh=self.mesh, dtype=self.dtype, memory=self.memory)
            if p.fits:
                out.append("a smaller batch (1 fits)")
        return out or ["a machine with more memory per device"]


def plan(source, batch: int, seq: int, *, mesh=None, dtype="float32", n_cells=None, memory=None,
         name=None) -> MemoryPlan:
    """Per-device memory of a model, a forward of batch x seq, its full cache and a sweep chunk (module
    docstring). mesh: None, a Mesh or {"data": d, "model": m}; memory: bytes per device to plan for
    (default: this machine's, engine.plan.device_memory); n_cells: the sweep's cells (default
    resid_pre's n_layers x seq)."""
    cfg = config_of(source)
    shape = {} if mesh is None else (dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh))
    shape = {k: int(v) for k, v in shape.items()}
    dt = str(resolve_dtype(dtype))  # a clear error for an unknown name
    item = 2 if dt in ("bfloat16", "float16") else 4
    specs = sharding.param_specs(cfg, shape)  # checks the mesh
    import jax

    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = 0
    for (path, s), spec in zip(jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0], flat_specs):
        norm = any(str(getattr(k, "key", "")).startswith(("ln", "q_norm", "k_norm")) for k in path)
        params += sharding.per_device_bytes(s.shape, spec, shape, 4 if norm else item)
    m = sharding.axis_size(shape, sharding.MODEL)
    B, T, D, H, F, V = batch, seq, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab
    if cfg.mlp == "moe":  # every expert runs on every token (arch/moe.py): E hidden widths, split over "expert"
        F = F * cfg.n_experts / sharding.axis_size(shape, sharding.EXPERT) + cfg.d_shared
    acts = item * B * T * (6 * D + (3 * F + 2 * H * T + V) / m)
    block, glob = emitted_sites(cfg)
    per_layer = sum(math.prod(site_shape(cfg, s, B, T).values()) for s in block)
    cache = item * (cfg.n_layers * per_layer + sum(math.prod(site_shape(cfg, s, B, T).values()) for s in glob)) / m
    memory = device_memory() if memory is None else int(memory)
    per_cell = bytes_per_cell(cfg, B, T, T, 1, 2, item)
    n = n_cells or cfg.n_layers * T
    # the driver's chunk: MEMORY_FRACTION of what is free once the parameters and base run are in memory
    cells = max(0, min(n, int(MEMORY_FRACTION * max(0, memory - params - acts) // per_cell)))
    return MemoryPlan(name or getattr(cfg, "family", "model"), shape, dt, B, T, int(params), int(acts), int(cache),
                      cells, int(cells * per_cell), memory, cfg)
