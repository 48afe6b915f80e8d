"""Model: a static config, a parameter pytree and (optionally) a tokenizer, with compiled entry points."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import arch
from jinterp import edits as E
from jinterp import sites as S
from jinterp.cache import ActivationCache
from jinterp.config import Config
from jinterp.io import orbax


class InputError(ValueError):
    """Bad tokens, masks or shapes handed to a model."""


_forward = jax.jit(arch.forward, static_argnames=("cfg", "record", "logits_at"))
_generate = jax.jit(
    arch.generate,
    static_argnames=(
        "cfg", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    ),
)

def _logits_at(logits_at, P: int):
    """logits_at (None, an int or ints in -P..P-1) -> a static tuple of absolute positions; an
    out-of-range position is an InputError, not wrapped around."""
    if logits_at is None:
        return None
    a = np.atleast_1d(np.asarray(logits_at))
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"logits_at must be an int or a list of int positions, got {a.dtype} of shape {a.shape}")
    bad = [int(i) for i in a if not -P <= int(i) < P]
    if bad:
        raise InputError(f"logits_at position {bad[0]} is outside the sequence of {P} tokens (valid: {-P}..{P - 1})")
    return tuple(int(i) % P for i in a)


class Model:
    def __init__(self, config: Config, params: dict, tokenizer=None, name: str | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.name = name or config.family

    @property
    def cfg(self) -> Config:
        return self.config

    def __getattr__(self, item):
        """TransformerLens-style weights: model.W_Q [L, H, D, dh], model.W_U, ... (see arch.WEIGHTS)."""
        if item in arch.WEIGHTS:
            try:
                return arch.weight(self.__dict__["params"], item)
            except KeyError as e:
                raise AttributeError(f"this {self.config.family} model has no {item}") from e
        raise AttributeError(item)

    @property
    def dtype(self):
        return self.W_E.dtype

    @property
    def mesh(self):
        """The device mesh the parameters are sharded on (jinterp.load(..., mesh=)), or None."""
        from jinterp.sharding import mesh_of

        return mesh_of(self.params)

    def with_params(self, params) -> "Model":
        """The same model with other parameters (e.g. after a weight edit)."""
        return Model(self.config, params, self.tokenizer, self.name)

    # ------------------------------------------------------------------ structure
    def site_names(self) -> list[str]:
        return S.all_names(self.config)

    def summary(self) -> str:
        c = self.config
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))
        lines = [
            f"{self.name}: {c.family}, {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads"
            + (f" ({c.n_kv_heads} key/value heads)" if c.n_kv_heads != c.n_heads else "")
            + f" of d_head {c.d_head}, d_mlp {c.d_mlp}, vocab {c.d_vocab}, context {c.n_ctx}",
            f"  {n_params:,} parameters, dtype {self.dtype}",
            f"  norm {c.norm}, positions {c.positional}, mlp {c.mlp} {c.act}"
            + (", parallel residual" if c.parallel_residual else "")
            + (", tied embeddings" if c.tied_embeddings else ""),
            "  parameters:",
        ]
        flat = jax.tree_util.tree_flatten_with_path(self.params)[0]
        for path, a in flat:
            name = ".".join(str(getattr(k, "key", k)) for k in path)
            lines.append(f"    {name:28s} {list(a.shape)}")
        lines.append(f"  sites per block: {', '.join(S.block_sites(c))}")
        return "\n".join(lines)

    def __repr__(self):
        c = self.config
        return f"Model({self.name!r}, {c.family}, L={c.n_layers}, D={c.d_model}, H={c.n_heads}, V={c.d_vocab})"

    # ------------------------------------------------------------------ tokens
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def to_tokens(self, text, prepend_bos: bool = True, padding_side: str = "right"):
        """Text (str or list of str) -> int32 tokens [batch, pos]. Pads lists; see to_tokens_and_mask for the mask."""
        return self.to_tokens_and_mask(text, prepend_bos, padding_side)[0]

    def to_tokens_and_mask(self, text, prepend_bos: bool = True, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tok = self._need_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        bos = tok.bos_token_id
        if prepend_bos and bos is not None:
            ids = [[bos] + i for i in ids]
        n = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        out = np.full((len(ids), n), pad, np.int32)
        mask = np.zeros((len(ids), n), bool)
        for r, i in enumerate(ids):
            sl = slice(0, len(i)) if padding_side == "right" else slice(n - len(i), n)
            out[r, sl] = i
            mask[r, sl] = True
        return out, mask

    def to_str_tokens(self, tokens, prepend_bos: bool = True) -> list:
        tok = self._need_tokenizer()
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens, prepend_bos)[0]
        a = np.asarray(tokens)
        if a.ndim == 2:
            return [self.to_str_tokens(r) for r in a]
        return [tok.decode([int(t)]) for t in a]

    def to_string(self, tokens) -> str | list:
        tok = self._need_tokenizer()
        a = np.asarray(tokens)
        if a.ndim == 2:
            return [tok.decode(r.tolist()) for r in a]
        return tok.decode(a.tolist())

    def to_single_token(self, s: str) -> int:
        ids = self._need_tokenizer()(s, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{s!r} is {len(ids)} tokens, not one")
        return ids[0]

    def prepare_inputs(self, tokens, attention_mask=None, *, extra_len: int = 0):
        """Validate tokens (ids [batch, pos] or [pos], or text) and the mask at the boundary ->
        (int32 tokens [batch, pos], bool mask or None). Raises InputError naming the problem."""
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
            if attention_mask is not None:
                raise InputError("pass attention_mask only with token ids")
            tokens, attention_mask = self.to_tokens_and_mask(tokens)
            if attention_mask.all():
                attention_mask = None
        try:
            a = np.asarray(tokens)
        except ValueError as e:
            raise InputError(f"tokens must be a rectangular array of ints: {e}") from e
        if a.dtype == object or not (np.issubdtype(a.dtype, np.integer)):
            raise InputError(f"tokens must be integer ids, got dtype {a.dtype}")
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2:
            raise InputError(f"tokens must be [batch, pos], got shape {a.shape}")
        if a.shape[1] == 0:
            raise InputError("tokens are empty")
        V = self.config.d_vocab
        bad = (a < 0) | (a >= V)
        if bad.any():
            b, p = np.argwhere(bad)[0]
            raise InputError(
                f"token id {int(a[b, p])} at batch {b}, position {p} is outside the vocabulary (0..{V - 1}). "
                "Were these tokens made by another model's tokenizer?"
            )
        if a.shape[1] + extra_len > self.config.max_len:
            raise InputError(
                f"sequence of {a.shape[1]} tokens"
                + (f" plus {extra_len} to generate" if extra_len else "")
                + f" is longer than this model's context of {self.config.max_len}; truncate the input"
            )
        if attention_mask is not None:
            m = np.asarray(attention_mask)
            if m.shape != a.shape:
                raise InputError(f"attention_mask has shape {m.shape} but tokens have shape {a.shape}")
            m = m.astype(bool)
            if not m.any(axis=1).all():
                raise InputError("attention_mask has a row with no real tokens")
            attention_mask = jnp.asarray(m)
        return jnp.asarray(a, jnp.int32), attention_mask

    def tokens_to_residual_directions(self, tokens):
        """The residual-stream direction [..., d_model] whose dot product with the normalised final
        residual is each token's logit (minus biases): W_U[:, token] scaled by the final norm's weight
        (what TransformerLens's W_U is after fold_ln)."""
        a = np.asarray(tokens)
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"tokens must be integer ids, got dtype {a.dtype}")
        V = self.config.d_vocab
        if a.size and (a.min() < 0 or a.max() >= V):
            bad = int(a.min()) if a.min() < 0 else int(a.max())
            raise InputError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        t = jnp.asarray(a)
        W_U = self.W_U.astype(jnp.float32)
        return jnp.moveaxis(jnp.take(W_U, t, axis=1), 0, -1) * self.ln_final_w.astype(jnp.float32)

    # ------------------------------------------------------------------ running
    def __call__(self, tokens, attention_mask=None, edits=(), *, logits_at=None):
        """Logits [batch, pos, d_vocab] (or at positions logits_at only)."""
        tokens, mask = self.prepare_inputs(tokens, attention_mask)
        edits = E.validate(self.config, edits, *tokens.shape)
        la = _logits_at(logits_at, tokens.shape[1])
        logits, _ = _forward(self.params, tokens, mask, edits, cfg=self.config, logits_at=la)
        return logits

    def run_with_cache(self, tokens, names=None, attention_mask=None, edits=()):
        """(logits, ActivationCache). names: None (every site), a list of full site names, or a predicate."""
        tokens, mask = self.prepare_inputs(tokens, attention_mask)
        edits = E.validate(self.config, edits, *tokens.shape)
        record = S.select(self.config, names)
        logits, acts = _forward(
            self.params, tokens, mask, edits, cfg=self.config, record=tuple(sorted(record.items()))
        )
        return logits, ActivationCache(self.config, acts, record, self, tokens=np.asarray(tokens), attention_mask=mask, edited=bool(edits))

    def warmup(self, batch: int, seq: int, *, names=None, attention_mask: bool = False, logits_at=None) -> "Model":
        """Compile ahead of time what model(tokens) (and model.run_with_cache(tokens, names), when
        names is given: a list of sites, a predicate, or True for every site) runs on tokens of shape
        [batch, seq], without running it, so the first real call with that shape does not compile.
        With the persistent compilation cache on (jinterp.compile_cache), a later process loads the
        compiled programs from disk instead. attention_mask: warm the padded variant (a mask passed);
        logits_at: as in __call__. Tokens are int32 and the parameters keep their dtype. Returns self."""
        if int(batch) < 1 or int(seq) < 1:
            raise InputError(f"warmup needs batch and seq of at least 1, got {batch}, {seq}")
        ids = np.zeros((int(batch), int(seq)), np.int64)  # numpy's default ints: also warms their cast to int32
        tokens, mask = self.prepare_inputs(ids, np.ones(ids.shape, bool) if attention_mask else None)
        la = _logits_at(logits_at, tokens.shape[1])
        _forward.lower(self.params, tokens, mask, (), cfg=self.config, logits_at=la).compile()
        if names is not None:
            record = S.select(self.config, None if names is True else names)
            _forward.lower(self.params, tokens, mask, (), cfg=self.config,
                           record=tuple(sorted(record.items()))).compile()
        return self

    def generate(
        self,
        tokens,
        max_new_tokens: int = 10,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        attention_mask=None,
        edits=(),
        stop_at_eos: bool = True,
    ):
        """Greedy or sampled continuation with a KV cache, compiled. Returns tokens [batch, pos + new]
        (a string if a string was given). Batched prompts must be left-padded (text input is).
        Edits apply on the prompt pass and, where their positions reach them, to generated tokens."""
        as_text = isinstance(tokens, str)
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
            tokens, attention_mask = self.to_tokens_and_mask(tokens, padding_side="left")
        if int(max_new_tokens) < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not 0 <= int(top_k) <= self.config.d_vocab:
            raise InputError(f"top_k must be in 0..{self.config.d_vocab} (0 = off), got {top_k}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise InputError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        tokens, mask = self.prepare_inputs(tokens, attention_mask, extra_len=max_new_tokens)
        if mask is not None and not bool(np.asarray(mask)[:, -1].all()):
            raise InputError("generate needs left-padded prompts: the last column must be a real token in every row")
        edits = E.validate(self.config, edits, *tokens.shape)
        eos = None
        if stop_at_eos and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        new = _generate(
            self.params, tokens, mask, edits, jax.random.PRNGKey(seed), cfg=self.config,
            max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
            top_k=int(top_k), top_p=float(top_p), eos_token_id=eos, pad_token_id=pad,
        )
        out = jnp.concatenate([tokens, new], axis=1)
        if as_text:
            return self.to_string(out[0])
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path):
        """Save converted parameters with orbax (plus config and tokenizer); jinterp.load(path) restores them."""
        orbax.save_model(path, self.config, self.params, self.tokenizer, self.name)

