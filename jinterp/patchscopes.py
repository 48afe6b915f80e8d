"""Patchscopes (Ghandeharioun et al. 2024): decode a hidden state by writing it into another prompt.

Take the hidden state h of a source prompt at layer i and position t (by default the residual
stream *after* block i, `hook_resid_post`, as in the paper), write it at the placeholder position
p of a target prompt at layer j (the same site), and let the model continue the target greedily::

    h      = source run: site[i][b, t_b]                          [n_source, batch, d_model]
    tokens = generate(target_b, edits=[patch(site, h, layers=j, pos=p_b)])      per (i, j, b)

The patch is written at an absolute prompt position, so it acts on the prompt pass only: every
generated token reads the patched state through the keys and values of position p, and is itself
computed unpatched. A target such as the identity prompt "cat -> cat; 1135 -> 1135; hello -> hello;
? ->" (`identity_prompt`) asks the model to repeat what the placeholder "?" now holds.

Every (source layer, target layer) pair is one cell of a single compiled sweep (`jinterp.engine`):
the cells' edits are arrays (the source row, the target layer index), vmapped over chunks sized to
the memory budget, so one program serves the whole grid and repeated calls with the same shapes.

    ps = patchscope(model, source_tokens, target_tokens, source_pos=-1, target_pos=p)
    ps.tokens        [n_source_layers, n_target_layers, batch, max_new_tokens]
    ps.texts         the same, decoded (None without a tokenizer)
    ps.first_token   [n_source_layers, n_target_layers, batch]
    ps.hit(targets)  rate at which each example's target token appears among the first k tokens
    ps.to_frame(), ps.plot(path)

`patchscope_states` is the same with the hidden states handed in directly ([n_source, batch,
d_model], e.g. from a cache you already have, or any vector to inspect).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jinterp import edits as E
from jinterp import plots
from jinterp import sites as S
from jinterp.model import InputError
from jinterp.results import Labelled

__all__ = ["Patchscope", "identity_prompt", "patchscope", "patchscope_states"]

_RESID = ("batch", "pos", "d_model")


# ----------------------------------------------------------------------------------------
# the result


@dataclasses.dataclass
class Patchscope:
    """A Patchscopes grid.

    tokens: generated ids [n_source, n_target_layers, batch, max_new_tokens] (after an EOS, when
    stop_at_eos, the tokenizer's pad id, as in `Model.generate`); baseline: the unpatched target's
    generation [batch, max_new_tokens]; texts: the decoded generations (object array, shape of
    tokens minus the token axis) or None without a tokenizer; source_labels / target_layers:
    the labels of the first two axes; target_pos: the placeholder position per example."""

    tokens: np.ndarray
    baseline: np.ndarray
    texts: np.ndarray | None
    source_labels: tuple
    target_layers: tuple
    source_site: str
    target_site: str
    target_pos: np.ndarray
    tokenizer: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def first_token(self) -> np.ndarray:
        """The first generated token [n_source, n_target_layers, batch]: the model's next-token
        prediction on the patched target prompt."""
        return self.tokens[..., 0]

    @property
    def changed(self) -> np.ndarray:
        """Whether the patched generation differs from the unpatched target's [n_source, n_target, batch]."""
        return (self.tokens != self.baseline[None, None]).any(-1)

    def _target_ids(self, targets) -> list[list[int]]:
        B = self.tokens.shape[2]

        def one(t):
            if isinstance(t, str):
                if self.tokenizer is None:
                    raise InputError("string targets need a model with a tokenizer; pass token ids")
                ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
                if len(ids) != 1:
                    raise InputError(f"target {t!r} is {len(ids)} tokens, not one; pass a token id (or a list of ids)")
                return ids
            a = np.atleast_1d(np.asarray(t))
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise InputError(f"a target is a token id, a list of ids (any of them counts) or a string, got {t!r}")
            return [int(x) for x in a]

        if isinstance(targets, (str, int, np.integer)):
            return [one(targets)] * B
        seq = list(targets)
        if len(seq) != B:
            raise InputError(f"targets: one per example ({B}) or one for all, got {len(seq)}")
        return [one(t) for t in seq]

    def hits(self, targets, k: int | None = None) -> np.ndarray:
        """bool [n_source, n_target_layers, batch]: example b's target (an id, a list of ids of
        which any counts, or a single-token string; one for all examples or one per example) is
        among the first k generated tokens (default: all of them)."""
        k = self.tokens.shape[-1] if k is None else int(k)
        if not 1 <= k <= self.tokens.shape[-1]:
            raise InputError(f"k must be in 1..{self.tokens.shape[-1]} (the tokens generated), got {k}")
        ids = self._target_ids(targets)
        gen = self.tokens[..., :k]
        return np.stack([np.isin(gen[:, :, b], ids[b]).any(-1) for b in range(len(ids))], -1)

    def hit(self, targets, k: int | None = None) -> Labelled:
        """The rate, over examples, at which the target appears among the first k generated tokens:
        Labelled [source_layer, target_layer]."""
        return Labelled(self.hits(targets, k).mean(-1), ("source_layer", "target_layer"),
                        (self.source_labels, tuple(map(str, self.target_layers))), name="hit rate")

    def to_frame(self):
        """One row per (source layer, target layer, example): the generated ids, the first token,
        whether the generation differs from the unpatched target's, and the decoded text."""
        import pandas as pd

        Ls, Lt, B, _ = self.tokens.shape
        i, j, b = (a.reshape(-1) for a in np.indices((Ls, Lt, B)))
        cols = dict(source_layer=np.asarray(self.source_labels, object)[i], target_layer=np.asarray(self.target_layers)[j],
                    example=b, target_pos=self.target_pos[b], first_token=self.first_token.reshape(-1),
                    tokens=list(self.tokens.reshape(Ls * Lt * B, -1).tolist()), changed=self.changed.reshape(-1))
        if self.texts is not None:
            cols["text"] = self.texts.reshape(-1)
        return pd.DataFrame(cols)

    def plot(self, path, targets=None, k: int | None = None, title: str | None = None) -> Path:
        """A heatmap PNG over (source layer, target layer): with targets, the hit rate (%); without,
        the share of examples (%) whose generation the patch changed."""
        if targets is not None:
            vals, default = self.hit(targets, k).values * 100, "target among the generated tokens (%)"
        else:
            vals, default = self.changed.mean(-1) * 100, "generation changed by the patch (%)"
        panel = dict(values=vals, row_labels=list(self.source_labels), col_labels=[str(j) for j in self.target_layers],
                     title=title or default, xlabel=f"target layer j ({self.target_site})",
                     ylabel=f"source layer i ({self.source_site})", cmap="Purples", center=False)
        return plots.save_heatmaps(path, [panel])

    def __repr__(self):
        Ls, Lt, B, N = self.tokens.shape
        return (f"Patchscope({self.source_site}[i] -> {self.target_site}[j]: {Ls} source x {Lt} target layers x "
                f"{B} examples, {N} new tokens; changed {self.changed.mean():.0%} of generations)")


# ----------------------------------------------------------------------------------------
# the sweep


@dataclasses.dataclass(frozen=True)
class _Cell:
    """Source row i's state written at the placeholder of target layer j; greedy generation."""

    site: str
    max_new_tokens: int

    def __call__(self, cell, data, runner):
        value = data["states"][cell["source"]][:, None, :]  # [B, 1 (the selected position), d_model]
        e = E.patch(self.site, value, layers=data["layers"][cell["target"]][None], pos=data["pos"], pos_axis="selected")
        return runner.generate((e,), self.max_new_tokens)

    def bounds(self, cell, data, n_layers, n_prompt):
        return jnp.int32(0), jnp.int32(0)  # generation re-runs the whole prompt


def _site(model, site, what) -> str:
    if not isinstance(site, str):
        raise InputError(f"{what} must be a site name like 'hook_resid_post', got {site!r}")
    local = S.ALIASES.get(site, site)
    ok = [s for s in S.block_sites(model.config) if S.BLOCK_SITES[s] == _RESID]
    if local not in ok:
        raise InputError(f"{what} {site!r} is not a residual-shaped block site of this model; use one of {ok}"
                         + S.suggest(local, ok))
    return local


def _layers(model, layers, what) -> tuple[int, ...]:
    L = model.config.n_layers
    if layers is None:
        return tuple(range(L))
    a = np.atleast_1d(np.asarray(list(layers) if isinstance(layers, range) else layers))
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{what} must be None (all), an int or a non-empty list of ints, got {layers!r}")
    bad = [int(x) for x in a if not -L <= x < L]
    if bad:
        raise InputError(f"{what} {bad} out of range for a model with {L} layers (0..{L - 1}, or negative from the end)")
    return tuple(int(x) % L for x in a)


def _positions(pos, B, P, mask, what) -> np.ndarray:
    """An int or one per example -> absolute positions [B], checked against length and padding."""
    a = np.asarray(pos)
    if a.dtype == object or not np.issubdtype(a.dtype, np.integer) or a.ndim > 1:
        raise InputError(f"{what} must be an int or one int per example, got {pos!r}")
    if a.ndim == 1 and len(a) not in (1, B):
        raise InputError(f"{what}: one position for all or one per example ({B}), got {len(a)}")
    a = np.broadcast_to(a.reshape(-1) if a.ndim else a, (B,))
    bad = np.flatnonzero((a < -P) | (a >= P))
    if bad.size:
        raise InputError(f"{what} {int(a[bad[0]])} (example {int(bad[0])}) is out of range for a prompt of {P} tokens")
    a = (a % P).astype(np.int32)
    if mask is not None:
        m = np.asarray(mask)
        pad = np.flatnonzero(~m[np.arange(B), a])
        if pad.size:
            raise InputError(f"{what} {int(a[pad[0]])} is padding in example {int(pad[0])} (attention mask 0); "
                             "give one position per example that points at a real token")
    return a


def _target(model, target_tokens, target_mask, B, max_new_tokens):
    """Target ids and mask [B, P] (a shared prompt tiled to B), left-padded as generation needs."""
    if isinstance(target_tokens, str) or (isinstance(target_tokens, (list, tuple)) and target_tokens
                                          and isinstance(target_tokens[0], str)):
        if target_mask is not None:
            raise InputError("pass target_mask only with token ids")
        target_tokens, target_mask = model.to_tokens_and_mask(target_tokens, padding_side="left")
    tokens, mask = model.prepare_inputs(target_tokens, target_mask, extra_len=max_new_tokens)
    Bt = tokens.shape[0]
    if Bt not in (1, B):
        raise InputError(f"target_tokens have batch {Bt}; give one target prompt shared by every example, or one per "
                         f"example ({B}, the batch of the source)")
    if mask is not None and not bool(np.asarray(mask)[:, -1].all()):
        raise InputError("target prompts must be left-padded (generation continues from the last column), "
                         "so the last column must be a real token in every row")
    if Bt != B:
        tokens = jnp.broadcast_to(tokens, (B, tokens.shape[1]))
        mask = None if mask is None else jnp.broadcast_to(mask, (B, mask.shape[1]))
    return tokens, mask


def patchscope_states(
    model,
    states,
    target_tokens,
    *,
    target_pos,
    target_layers=None,
    target_site: str = "hook_resid_post",
    max_new_tokens: int = 5,
    target_mask=None,
    source_labels=None,
    source_site: str | None = None,
    stop_at_eos: bool = True,
    chunk_size: int | None = None,
    memory_budget: float | None = None,
    progress: bool = False,
) -> Patchscope:
    """Write each hidden state states[i, b] ([n_source, batch, d_model], or [batch, d_model] for one
    source) at target_pos of target prompt b (target_tokens [1 or batch, P]: one prompt shared by
    every example, or one per example) at `target_site` of every layer in target_layers (None: all;
    an int or a list), and generate max_new_tokens greedily. One compiled sweep over all
    (source, target layer) pairs; the patch acts on the prompt pass only."""
    target_site = _site(model, target_site, "target_site")
    tl = _layers(model, target_layers, "target_layers")
    if int(max_new_tokens) < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    st = jnp.asarray(states)
    if st.ndim == 2:
        st = st[None]
    if st.ndim != 3 or st.shape[-1] != model.config.d_model:
        raise InputError(f"states must be [n_source, batch, d_model={model.config.d_model}] (or [batch, d_model]), "
                         f"got shape {tuple(np.shape(states))}")
    if not jnp.issubdtype(st.dtype, jnp.floating):
        raise InputError(f"states must be floating point, got {st.dtype}")
    Ls, B = st.shape[:2]
    tokens, mask = _target(model, target_tokens, target_mask, B, int(max_new_tokens))
    P = tokens.shape[1]
    pos = _positions(target_pos, B, P, mask, "target_pos")
    labels = tuple(str(i) for i in range(Ls)) if source_labels is None else tuple(map(str, source_labels))
    if len(labels) != Ls:
        raise InputError(f"source_labels: one per source row ({Ls}), got {len(labels)}")

    from jinterp.engine import sweep

    grid = np.indices((Ls, len(tl))).reshape(2, -1).astype(np.int32)
    data = {"states": st.astype(model.dtype), "layers": jnp.asarray(tl, jnp.int32), "pos": jnp.asarray(pos)[:, None]}
    out = np.asarray(sweep(model, tokens, {"source": grid[0], "target": grid[1]}, _Cell(target_site, int(max_new_tokens)),
                           data=data, attention_mask=mask, metric_positions=None, chunk_size=chunk_size,
                           memory_budget=memory_budget, progress=progress, desc="patchscope"))
    gen = out.reshape(Ls, len(tl), B, int(max_new_tokens))
    base = np.asarray(model.generate(tokens, int(max_new_tokens), attention_mask=mask, stop_at_eos=stop_at_eos))[:, P:]
    tok = model.tokenizer
    if stop_at_eos and tok is not None and tok.eos_token_id is not None:  # as Model.generate: pad after the first EOS
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        after = np.cumsum(gen == eos, -1) - (gen == eos) > 0
        gen = np.where(after, pad, gen)
    texts = None
    if tok is not None:
        flat = gen.reshape(-1, gen.shape[-1])
        texts = np.empty(len(flat), object)
        texts[:] = [tok.decode(r.tolist()) for r in flat]
        texts = texts.reshape(gen.shape[:-1])
    return Patchscope(gen, base, texts, labels, tl, source_site or target_site, target_site, pos, tok)


def patchscope(
    model,
    source_tokens,
    target_tokens,
    *,
    target_pos,
    source_pos=-1,
    source_layers=None,
    target_layers=None,
    site: str = "hook_resid_post",
    target_site: str | None = None,
    max_new_tokens: int = 5,
    source_mask=None,
    target_mask=None,
    stop_at_eos: bool = True,
    chunk_size: int | None = None,
    memory_budget: float | None = None,
    progress: bool = False,
) -> Patchscope:
    """Patchscopes over every (source layer i, target layer j) pair in one compiled sweep.

    The hidden state at `site` of layer i (default hook_resid_post: the residual stream after block
    i, the paper's h_i) at source_pos of each source prompt (source_tokens [batch, P_s]; an int or
    one position per example) is written at `target_site` (default: the same site) of layer j at
    target_pos of the target prompt (target_tokens [1 or batch, P_t], left-padded; e.g. the
    placeholder of `identity_prompt`), and max_new_tokens are generated greedily with the patch on
    the prompt pass only. source_layers / target_layers: None (all), an int or a list (negative from
    the end). Returns a Patchscope with tokens [n_source_layers, n_target_layers, batch,
    max_new_tokens]. Use hook_resid_pre for the residual entering layer j (layer 0: in place of
    the token's embedding)."""
    site = _site(model, site, "site")
    target_site = site if target_site is None else _site(model, target_site, "target_site")
    sl = _layers(model, source_layers, "source_layers")
    _layers(model, target_layers, "target_layers")
    if int(max_new_tokens) < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokens, mask = model.prepare_inputs(source_tokens, source_mask)
    B, P = tokens.shape
    pos = _positions(source_pos, B, P, mask, "source_pos")
    t_tokens, t_mask = _target(model, target_tokens, target_mask, B, int(max_new_tokens))  # every check before running
    _positions(target_pos, B, t_tokens.shape[1], t_mask, "target_pos")
    names = [S.full_name(l, site) for l in sorted(set(sl))]
    _, cache = model.run_with_cache(tokens, names=names, attention_mask=mask)
    states = jnp.stack([cache[S.full_name(l, site)][jnp.arange(B), jnp.asarray(pos)] for l in sl])  # [Ls, B, d]
    return patchscope_states(model, states, t_tokens, target_pos=target_pos, target_layers=target_layers,
                             target_site=target_site, max_new_tokens=max_new_tokens, target_mask=t_mask,
                             source_labels=sl, source_site=site, stop_at_eos=stop_at_eos, chunk_size=chunk_size,
                             memory_budget=memory_budget, progress=progress)


# ----------------------------------------------------------------------------------------
# target prompts


def identity_prompt(model, words=("cat", "1135", "hello"), placeholder: str = "?", *, arrow: str = "->",
                    sep: str = ";", prepend_bos: bool = True):
    """The Patchscopes identity prompt "cat -> cat; 1135 -> 1135; hello -> hello; ? ->" in this
    model's tokens: (int32 tokens [1, P], the position of the placeholder's last token).

    The text is f"{w} {arrow} {w}" for each few-shot word, joined by f"{sep} ", then
    f"{sep} {placeholder} {arrow}". Models with small word-level vocabularies (the bundled
    organisms) need their own words, and separators set off by spaces, e.g. for kg-6l:
    identity_prompt(model, ["kema", "nudi"], "figa", arrow="=", sep=" ,") -> "kema = kema , nudi =
    nudi , figa =". Raises InputError without a tokenizer or when a piece is not in the vocabulary."""
    tok = model.tokenizer
    if tok is None:
        raise InputError("identity_prompt needs a model with a tokenizer; build the target tokens yourself and pass "
                         "them with target_pos to patchscope")
    if isinstance(words, str):
        words = [words]
    words = [str(w) for w in words]
    if not words:
        raise InputError("identity_prompt needs at least one few-shot word")
    unk = tok.unk_token_id
    if unk is not None:
        missing = [p for p in dict.fromkeys(words + [placeholder, arrow, sep.strip()])
                   if p and unk in tok(p, add_special_tokens=False)["input_ids"]]
        if missing:
            raise InputError(f"{missing} are not in this model's vocabulary (the tokenizer maps them to "
                             f"{tok.unk_token!r}); pass words=, placeholder=, arrow= and sep= that it knows")
    shots = f"{sep} ".join(f"{w} {arrow} {w}" for w in words)
    prefix = f"{shots}{sep} {placeholder}"
    ids = tok(prefix + f" {arrow}", add_special_tokens=False)["input_ids"]
    head = tok(prefix, add_special_tokens=False)["input_ids"]
    if unk is not None and unk in ids:
        raise InputError(f"the prompt {prefix + ' ' + arrow!r} tokenizes with {tok.unk_token!r}; set sep= with spaces "
                         "around it (e.g. ' ,') for a word-level tokenizer")
    if ids[: len(head)] != head:
        raise InputError(f"the placeholder {placeholder!r} merges with the following {arrow!r} in this tokenizer; "
                         "choose another placeholder or arrow")
    bos = tok.bos_token_id
    lead = [bos] if prepend_bos and bos is not None else []
    return np.asarray([lead + ids], np.int32), len(lead) + len(head) - 1
