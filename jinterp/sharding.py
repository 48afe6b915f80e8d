"""Where each parameter lives on a device mesh: partition rules per weight kind.

A mesh has up to two named axes: "model" (tensor parallel: attention heads, d_mlp and the
vocabulary are split over it) and "data" (FSDP-style: d_model is split over it, and a sweep's
cells are split over it). An axis the mesh lacks counts as size 1, so a 1-D mesh named "data" is
plain FSDP and one named "model" plain tensor parallelism.

    embed.W_E [V, D]        (model, data)      unembed.W_U [D, V]   (data, model)
    attn.W_Q [L, H, D, dh]  (-, model, data)   attn.W_O [L, H, dh, D] (-, model, -, data)
    attn.W_K/W_V [L, K, D, dh] like W_Q; K is replicated over "model" when fewer kv heads than it
    mlp.W_in/W_gate [L, D, F] (-, data, model)  mlp.W_out [L, F, D]  (-, model, data)
    biases follow their weight's head / d_mlp / vocab axis; norms and d_model-sized biases replicate

A mixture-of-experts model may add a third axis, "expert" (expert parallelism): its experts are split
over it, each expert's width over "model" and d_model over "data" as for a dense MLP; the router and
the shared expert's gate replicate, the shared expert is split like a dense MLP.

    mlp.experts.W_in/W_gate [L, E, D, F] (-, expert, data, model)   mlp.experts.W_out [L, E, F, D] (-, expert, model, data)

When the vocabulary does not divide by "model" (GPT-2's 50257), the embedding and unembedding split
d_model over both axes instead. XLA's SPMD partitioner turns these placements into the
collectives of the forward; results equal the single-device run up to float summation order.
"""

from __future__ import annotations

import itertools

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MODEL, DATA, EXPERT = "model", "data", "expert"


class ShardingError(ValueError):
    """A mesh that does not fit the model's dimensions."""


def auto(mesh: Mesh) -> Mesh:
    """The same mesh with every axis Auto: XLA propagates the parameters' placements through the
    forward (an Explicit mesh, jax.make_mesh's default, would need every contraction annotated)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def axis_size(mesh, name: str) -> int:
    """Size of axis `name` of `mesh` (a Mesh or a {name: size} dict); 1 if it has none."""
    shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    return int(shape.get(name, 1))


def _suggest(cfg, n_devices: int) -> str:
    fits = []
    for m in range(1, n_devices + 1):
        if n_devices % m:
            continue
        d = n_devices // m
        if not _problems(cfg, {DATA: d, MODEL: m}):
            fits.append(f"data={d},model={m}")
    return "; meshes that fit " + f"{n_devices} devices: " + (", ".join(fits) if fits else "none (use fewer devices)")


def _problems(cfg, shape) -> list[str]:
    m, d, x = axis_size(shape, MODEL), axis_size(shape, DATA), axis_size(shape, EXPERT)
    out = []
    if x > 1 and getattr(cfg, "mlp", None) != "moe":
        out.append(f"the 'expert' axis ({x}) splits the experts of a mixture-of-experts model; this model has none")
    elif x > 1 and cfg.n_experts % x:
        out.append(f"n_experts={cfg.n_experts} does not divide by the 'expert' axis ({x})")
    if getattr(cfg, "d_shared", 0) and cfg.d_shared % m:
        out.append(f"d_shared={cfg.d_shared} (the shared expert's width) does not divide by the 'model' axis ({m})")
    if cfg.n_heads % m:
        out.append(f"n_heads={cfg.n_heads} does not divide by the 'model' axis ({m})")
    if cfg.n_kv_heads >= m and cfg.n_kv_heads % m:
        out.append(f"n_kv_heads={cfg.n_kv_heads} does not divide by the 'model' axis ({m})")
    if cfg.d_mlp % m:
        out.append(f"d_mlp={cfg.d_mlp} does not divide by the 'model' axis ({m})")
    if cfg.d_model % d:
        out.append(f"d_model={cfg.d_model} does not divide by the 'data' axis ({d})")
    if cfg.d_vocab % m and cfg.d_model % (m * d):
        out.append(f"d_vocab={cfg.d_vocab} does not divide by the 'model' axis ({m}), nor d_model={cfg.d_model} by "
                   f"data x model ({m * d})")
    return out


def check_mesh(cfg, mesh) -> None:
    """Raise ShardingError naming each dimension the mesh does not divide, with meshes that fit."""
    shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    unknown = [a for a in shape if a not in (MODEL, DATA, EXPERT)]
    if unknown:
        raise ShardingError(f"mesh axes {unknown} are not used by jinterp; name them 'data' and/or 'model' (and "
                            "'expert' for a mixture of experts), e.g. jax.make_mesh((2, 4), ('data', 'model'))")
    bad = _problems(cfg, shape)
    if bad:
        n = 1
        for v in shape.values():
            n *= int(v)
        raise ShardingError(f"mesh {shape} does not fit this model: " + "; ".join(bad) + _suggest(cfg, n))


def param_specs(cfg, mesh) -> dict:
    """PartitionSpecs for the parameter pytree of `cfg` (the structure of arch.param_shapes) on `mesh`
    (a Mesh or a {axis: size} dict). Checks the mesh first."""
    from jinterp.arch.params import param_shapes

    check_mesh(cfg, mesh)
    m, d = axis_size(mesh, MODEL), axis_size(mesh, DATA)
    M = MODEL if m > 1 else None
    D = DATA if d > 1 else None
    X = EXPERT if axis_size(mesh, EXPERT) > 1 else None
    K = M if cfg.n_kv_heads % m == 0 else None
    if cfg.d_vocab % m == 0:
        emb, unemb, b_u = P(M, D), P(D, M), P(M)
    else:  # split d_model over both axes instead of the vocabulary
        both = tuple(a for a in (D, M) if a) or None
        emb, unemb, b_u = P(None, both), P(both, None), P()
    rules = {
        ("embed", "W_E"): emb,
        ("pos_embed", "W_pos"): P(None, D),
        ("unembed", "W_U"): unemb,
        ("unembed", "b_U"): b_u,
        ("attn", "W_Q"): P(None, M, D, None),
        ("attn", "b_Q"): P(None, M, None),
        ("attn", "W_K"): P(None, K, D, None),
        ("attn", "b_K"): P(None, K, None),
        ("attn", "W_V"): P(None, K, D, None),
        ("attn", "b_V"): P(None, K, None),
        ("attn", "W_O"): P(None, M, None, D),
        ("mlp", "W_in"): P(None, D, M),
        ("mlp", "b_in"): P(None, M),
        ("mlp", "W_gate"): P(None, D, M),
        ("mlp", "b_gate"): P(None, M),
        ("mlp", "W_out"): P(None, M, D),
        ("experts", "W_in"): P(None, X, D, M),
        ("experts", "W_gate"): P(None, X, D, M),
        ("experts", "W_out"): P(None, X, M, D),
        ("shared", "W_in"): P(None, D, M),
        ("shared", "W_gate"): P(None, D, M),
        ("shared", "W_out"): P(None, M, D),
    }

    def spec(path, _):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        return rules.get(keys[-2:], P())

    return jax.tree_util.tree_map_with_path(spec, param_shapes(cfg))


def param_shardings(cfg, mesh: Mesh) -> dict:
    """NamedShardings for the parameter pytree of `cfg` on `mesh` (its axes made Auto)."""
    mesh = auto(mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh))


def mesh_of(params) -> Mesh | None:
    """The mesh the parameters are placed on, or None for single-device parameters."""
    for leaf in jax.tree.leaves(params):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def per_device_bytes(shape, spec: P, mesh, itemsize: int) -> int:
    """Bytes one device holds of an array of `shape` placed by `spec` on `mesh` ({axis: size} ok)."""
    n = itemsize
    for dim, ax in itertools.zip_longest(shape, tuple(spec)):
        if dim is None:
            break
        axes = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
        split = 1
        for a in axes:
            split *= axis_size(mesh, a)
        n *= -(-int(dim) // split)
    return n
