"""Sparse dictionaries (SAEs and transcoders) as pytrees, with pure encode / decode.

A `Dictionary` holds its arrays as leaves (so `jit`, `vmap` and `grad` see them) and its kind,
site and sizes as static fields. Weights are kept in one orientation whatever the file's::

    W_enc [d_in, d_sae]    pre = x_c @ W_enc + b_enc          (SAELens orientation)
    W_dec [d_sae, d_out]   y   = a @ W_dec + b_dec [+ x @ W_skip]
    W_skip [d_in, d_out]   optional skip connection (transcoders)

with x_c = x - b_dec when `apply_b_dec_to_input` (SAELens SAEs), else x. Activations a:

    standard   relu(pre)
    jumprelu   relu(pre) * (pre > threshold)        (SAELens, Gemma Scope)
               pre * (pre > threshold)              (circuit-tracer: clamp=False)
    topk       relu of the k largest entries of pre (per token), 0 elsewhere (circuit-tracer: no relu)
    gated      (x_c @ W_enc + b_gate > 0) * relu(x_c @ (W_enc * exp(r_mag)) + b_mag)

`normalize` is SAELens's inference normalisation: "none", "constant_norm_rescale"
(x * sqrt(d_in)/|x| in, divided back out) or "layer_norm" ((x - mu)/(sd + 1e-5) in, y*sd + mu
out, unbiased sd). A dictionary on `attn.hook_z` accepts [..., head, d_head] and flattens it.

A stacked dictionary (per-layer transcoders loaded together) has a leading layer axis on every
array and `layers` naming them; its encode/decode map x [..., layer, d_in] layer by layer, and
`dictionary[l]` is one layer's dictionary. `CrossLayerTranscoder` is the cross-layer kind.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

ARCHITECTURES = ("standard", "jumprelu", "topk", "gated")
NORMALIZE = ("none", "constant_norm_rescale", "layer_norm")


def _activate(d, pre, xc):
    """Feature activations from the pre-activation (and, for gated, the centred input)."""
    arch = d.architecture
    if arch == "standard":
        return jax.nn.relu(pre)
    if arch == "jumprelu":
        base = jax.nn.relu(pre) if d.clamp else pre
        return base * (pre > d.threshold).astype(pre.dtype)
    if arch == "topk":
        if d.rescale_acts_by_decoder_norm:
            pre = pre * jnp.linalg.norm(d.W_dec, axis=-1)
        vals, idx = jax.lax.top_k(pre, d.k)
        vals = jax.nn.relu(vals) if d.clamp else vals
        # scatter the k kept values back into a dense [..., d_sae] (one-hot sum keeps it vmap/grad-friendly)
        onehot = jax.nn.one_hot(idx, pre.shape[-1], dtype=pre.dtype)  # [..., k, d_sae]
        return jnp.einsum("...k,...kf->...f", vals, onehot)
    if arch == "gated":
        gate = (xc @ d.W_enc + d.b_gate) > 0
        mag = jax.nn.relu(xc @ (d.W_enc * jnp.exp(d.r_mag)) + d.b_mag)
        return gate.astype(mag.dtype) * mag
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


@struct.dataclass
class Dictionary:
    """An SAE (d_out == d_in, reads and writes one site) or a transcoder (reads `site`, writes
    `out_site`). Arrays are leaves; everything else is static. See the module docstring for the maths."""

    W_enc: jax.Array  # [d_in, d_sae]
    W_dec: jax.Array  # [d_sae, d_out]
    b_dec: jax.Array  # [d_out]
    b_enc: jax.Array | None = None  # [d_sae] (None for gated)
    threshold: jax.Array | None = None  # [d_sae] (jumprelu)
    b_gate: jax.Array | None = None  # [d_sae] (gated)
    r_mag: jax.Array | None = None
    b_mag: jax.Array | None = None
    W_skip: jax.Array | None = None  # [d_in, d_out] (skip transcoders): + x @ W_skip

    architecture: str = struct.field(pytree_node=False, default="standard")
    k: int | None = struct.field(pytree_node=False, default=None)  # topk
    rescale_acts_by_decoder_norm: bool = struct.field(pytree_node=False, default=False)
    clamp: bool = struct.field(pytree_node=False, default=True)  # jumprelu/topk: ReLU too (SAELens); not circuit-tracer
    apply_b_dec_to_input: bool = struct.field(pytree_node=False, default=False)
    normalize: str = struct.field(pytree_node=False, default="none")
    hook_z: bool = struct.field(pytree_node=False, default=False)  # input may be [..., head, d_head]
    site: str | None = struct.field(pytree_node=False, default=None)  # our local site name it reads
    out_site: str | None = struct.field(pytree_node=False, default=None)  # transcoders: the site it writes
    layer: int | None = struct.field(pytree_node=False, default=None)  # None: global site, or stacked
    layers: tuple | None = struct.field(pytree_node=False, default=None)  # stacked: the layer of each row
    hook_name: str | None = struct.field(pytree_node=False, default=None)  # as the file named it
    format: str | None = struct.field(pytree_node=False, default=None)  # which loader read it
    source: str | None = struct.field(pytree_node=False, default=None)  # path or hub id

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def stacked(self) -> bool:
        return self.layers is not None

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[-2])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[-1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[-1])

    @property
    def is_transcoder(self) -> bool:
        return self.out_site is not None and self.out_site != self.site

    @property
    def site_name(self) -> str | None:
        """The full site name it reads, e.g. 'blocks.3.hook_resid_post' (None when stacked)."""
        if self.site is None or self.stacked:
            return None
        return self.site if self.layer is None else f"blocks.{self.layer}.{self.site}"

    @property
    def out_site_name(self) -> str | None:
        site = self.out_site or self.site
        if site is None or self.stacked:
            return None
        return site if self.layer is None else f"blocks.{self.layer}.{site}"

    def __getitem__(self, layer: int) -> "Dictionary":
        """One layer of a stacked dictionary (by model layer number)."""
        if not self.stacked:
            raise TypeError("this dictionary is for one site; only a stacked (per-layer) set can be indexed by layer")
        if layer not in self.layers:
            raise KeyError(f"no layer {layer} in this set; it has layers {list(self.layers)}")
        i = self.layers.index(layer)
        one = jax.tree_util.tree_map(lambda a: a[i], self)
        return dataclasses.replace(one, layer=layer, layers=None)

    def __repr__(self):
        shape = f"d_in={self.d_in}, d_sae={self.d_sae}" + (f", d_out={self.d_out}" if self.d_out != self.d_in else "")
        where = self.site_name or (f"{self.site} x layers {list(self.layers)}" if self.stacked else self.site)
        extra = f", k={self.k}" if self.architecture == "topk" else ""
        out = f" -> {self.out_site}" if self.is_transcoder else ""
        return f"Dictionary({self.architecture}{extra}, {shape}, site={where}{out}, format={self.format})"

    # ---- maths ---------------------------------------------------------------------------
    def _flat(self, x):
        x = jnp.asarray(x)
        if self.hook_z and x.ndim >= 2 and x.shape[-1] != self.d_in and x.shape[-2] * x.shape[-1] == self.d_in:
            x = x.reshape(x.shape[:-2] + (self.d_in,))
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input's last axis has size {x.shape[-1]} but this dictionary has d_in={self.d_in}")
        return x

    def _norm_in(self, x):
        """(normalised x, state to undo it on the way out)."""
        if self.normalize == "constant_norm_rescale":
            c = jnp.sqrt(jnp.asarray(self.d_in, x.dtype)) / jnp.linalg.norm(x, axis=-1, keepdims=True)
            return x * c, c
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdims=True)
            sd = jnp.std(x - mu, axis=-1, keepdims=True, ddof=1)
            return (x - mu) / (sd + 1e-5), (mu, sd)
        return x, None

    def _norm_out(self, y, state):
        if self.normalize == "constant_norm_rescale":
            return y / state
        if self.normalize == "layer_norm":
            mu, sd = state
            return y * sd + mu
        return y

    def _encode(self, x):
        x, state = self._norm_in(x)
        xc = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = None if self.architecture == "gated" else xc @ self.W_enc + self.b_enc
        return _activate(self, pre, xc), state

    def _decode(self, f, state=None):
        a = f
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            a = a / jnp.linalg.norm(self.W_dec, axis=-1)
        y = a @ self.W_dec + self.b_dec
        return self._norm_out(y, state)

    def _per_layer(self, fn, x):
        """Apply fn(one_layer_dictionary, x_l) across the layer axis (-2 of x) of a stacked dictionary."""
        if x.ndim < 2 or x.shape[-2] != len(self.layers):
            raise ValueError(
                f"a stacked dictionary over {len(self.layers)} layers needs x [..., {len(self.layers)}, d], got {x.shape}"
            )
        one = dataclasses.replace(self, layers=None)
        return jax.vmap(fn, in_axes=(0, -2), out_axes=-2)(one, x)

    def encode(self, x):
        """Feature activations [..., d_sae] for inputs x [..., d_in] (hook_z: or [..., head, d_head])."""
        if self.stacked:
            return self._per_layer(lambda d, xl: d.encode(xl), jnp.asarray(x))
        return self._encode(self._flat(x))[0]

    def decode(self, f, x=None):
        """Output [..., d_out] from activations f [..., d_sae]. With per-token input normalisation
        (constant_norm_rescale / layer_norm) the output is un-normalised with x's statistics, so
        pass the input x; `__call__` does this for you. The skip term is not included (see __call__)."""
        if self.stacked:
            if x is None:
                return self._per_layer(lambda d, fl: d.decode(fl), jnp.asarray(f))
            return jax.vmap(lambda d, fl, xl: d.decode(fl, xl), in_axes=(0, -2, -2), out_axes=-2)(
                dataclasses.replace(self, layers=None), jnp.asarray(f), jnp.asarray(x)
            )
        state = None
        if self.normalize != "none":
            if x is None:
                raise ValueError(f"decode of a {self.normalize!r} dictionary needs the input x to undo its normalisation")
            state = self._norm_in(self._flat(x))[1]
        return self._decode(jnp.asarray(f), state)

    def skip(self, x):
        """The skip term x @ W_skip (zeros when there is none)."""
        x = self._flat(x)
        if self.W_skip is None:
            return jnp.zeros(x.shape[:-1] + (self.d_out,), x.dtype)
        return x @ self.W_skip

    def __call__(self, x):
        """The reconstruction (SAE) or prediction (transcoder): decode(encode(x)) [+ skip].
        A hook_z SAE given [..., head, d_head] returns that shape."""
        if self.stacked:
            return self._per_layer(lambda d, xl: d(xl), jnp.asarray(x))
        x = jnp.asarray(x)
        xf = self._flat(x)
        f, state = self._encode(xf)
        y = self._decode(f, state)
        if self.W_skip is not None:
            y = y + xf @ self.W_skip
        if self.hook_z and x.shape[-1] != self.d_in and y.shape[-1] == self.d_in:
            y = y.reshape(x.shape)
        return y


@struct.dataclass
class CrossLayerTranscoder:
    """A cross-layer transcoder (circuit-tracer format): source layer i reads `site` at layer i
    and writes every output layer l >= i.

        a[i]   = act(x[i] @ W_enc[i] + b_enc[i])                         [..., d_sae]
        y[l]   = sum_{i<=l} a[i] @ W_dec[i][:, l - i, :] + b_dec[l] [+ x[l] @ W_skip[l]]

    W_enc [L, d_in, d_sae], b_enc [L, d_sae], threshold [L, d_sae] (jumprelu), W_dec a tuple of L
    arrays [d_sae, L - i, d_out], b_dec [L, d_out], W_skip [L, d_in, d_out] optional. x is
    [..., L, d_in] (the input site at every layer)."""

    W_enc: jax.Array
    b_enc: jax.Array
    W_dec: tuple
    b_dec: jax.Array
    threshold: jax.Array | None = None
    W_skip: jax.Array | None = None

    architecture: str = struct.field(pytree_node=False, default="standard")
    clamp: bool = struct.field(pytree_node=False, default=False)
    site: str | None = struct.field(pytree_node=False, default=None)
    out_site: str | None = struct.field(pytree_node=False, default=None)
    hook_name: str | None = struct.field(pytree_node=False, default=None)
    format: str | None = struct.field(pytree_node=False, default="circuit_tracer_clt")
    source: str | None = struct.field(pytree_node=False, default=None)

    @property
    def n_layers(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[2])

    @property
    def d_out(self) -> int:
        return int(self.b_dec.shape[-1])

    def __repr__(self):
        return (f"CrossLayerTranscoder({self.architecture}, layers={self.n_layers}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"d_out={self.d_out}, {self.site} -> {self.out_site})")

    def _check_x(self, x, name="x"):
        x = jnp.asarray(x)
        if x.ndim < 2 or x.shape[-2:] != (self.n_layers, self.d_in):
            raise ValueError(f"{name} must be [..., {self.n_layers} layers, {self.d_in}], got {x.shape}")
        return x

    def encode(self, x):
        """Activations [..., L, d_sae] from the input site at every layer, x [..., L, d_in]."""
        x = self._check_x(x)
        pre = jnp.einsum("...ld,ldf->...lf", x, self.W_enc) + self.b_enc
        if self.architecture == "jumprelu":
            base = jax.nn.relu(pre) if self.clamp else pre
            return base * (pre > self.threshold).astype(pre.dtype)
        return jax.nn.relu(pre)

    def decode(self, f):
        """Outputs [..., L, d_out] from activations f [..., L, d_sae] (no skip term)."""
        f = jnp.asarray(f)
        L = self.n_layers
        outs = []
        for l in range(L):
            y = self.b_dec[l]
            for i in range(l + 1):
                y = y + f[..., i, :] @ self.W_dec[i][:, l - i, :]
            outs.append(jnp.broadcast_to(y, f.shape[:-2] + (self.d_out,)))
        return jnp.stack(outs, axis=-2)

    def __call__(self, x):
        x = self._check_x(x)
        y = self.decode(self.encode(x))
        if self.W_skip is not None:
            y = y + jnp.einsum("...ld,ldo->...lo", x, self.W_skip)
        return y
