"""Needle-in-a-haystack prompts over a word vocabulary (Retrieval Head, Wu et al. 2024; methods.md §4).

A prompt is a distractor context ("haystack") of filler words with one needle inserted at a chosen
depth, then a query that names the needle's key again; the model should reproduce the value span::

    [BOS] filler ... filler  KEY V1 V2 V3 .  filler ... filler  ? KEY   ->   V1 V2 V3 .
                             needle (values at [a, b))           query        answer

The needle and query are templates of words ({key}, {value} are placeholders), so a real model
can be given a sentence ("the secret code of {key} is {value} .") and a question. Words become ids
through a `Vocab`, built from any Hugging Face tokenizer: filler, key and value words must each be
one token; `Vocab.split` names the ones that are not (they are dropped from the pools), so the
generator works with the organism's word-level tokenizer and with BPE/SentencePiece ones alike.

    vocab = Vocab.from_tokenizer(tokenizer)
    data = grid(vocab, lengths=(64, 128, 256), depths=(0, .25, .5, .75, 1), n_per_cell=4, seed=0)
    data.prompts[i], data.spans[i], data.answers[i], data.length[i], data.depth[i]
    tokens, weights = training_batch(np.random.default_rng(0), vocab, batch=32, seq_len=256)
"""

from __future__ import annotations

import dataclasses

import numpy as np

FILLER = tuple(
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one you "
    "were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work long "
    "get here between both life being under never day same another know while last might us great old year off "
    "come since against go came right used take three".split()
)
KEYS = tuple(
    "cat dog horse mouse lion tiger bear wolf fox eagle snake whale shark frog duck goose sheep goat pig cow "
    "rabbit monkey camel zebra deer owl crow swan bee ant spider crab seal otter moose rat bat hawk dove "
    "parrot turtle donkey pony mule lamb hen fish worm".split()
)
VALUES = tuple(
    "red blue green yellow black white brown pink purple orange gold silver apple lemon cherry grape peach "
    "plum melon bread cheese butter salt sugar rice corn bean pepper honey milk coffee tea wine glass stone "
    "iron copper paper cotton wool silk leather rubber marble clay sand dust ice snow rain cloud".split()
)
NEEDLE = "{key} {value} ."
QUERY = "? {key}"
STOP = "."


def _word_ids(tokenizer, word: str) -> list[int]:
    """Ids of `word` as it appears after a space in running text (one id when it is one token)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) > 1:  # SentencePiece tokenizers add their own word-start marker
        alt = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(alt) < len(ids):
            ids = alt
    return list(ids)


def single_token_words(tokenizer, words) -> tuple[dict[str, int], list[str]]:
    """({word: id} for the words that are one token, [words that split]), in order."""
    ok, split = {}, []
    for w in words:
        ids = _word_ids(tokenizer, w)
        if len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None):
            ok[w] = ids[0]
        else:
            split.append(w)
    return ok, split


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token ids of the task's words. Templates hold ids, with KEY / VALUE placeholders."""

    bos: int | None
    filler: np.ndarray  # int [n] single-token filler words
    keys: np.ndarray
    values: np.ndarray
    needle: tuple  # ids with KEY and VALUE placeholders
    query: tuple
    stop: int  # the token that ends an answer (the needle's last token); scored, then decoding stops
    split: tuple = ()  # words dropped because the tokenizer splits them

    KEY = -1
    VALUE = -2

    @classmethod
    def from_tokenizer(cls, tokenizer, *, filler=FILLER, keys=KEYS, values=VALUES, needle=NEEDLE, query=QUERY,
                       stop=STOP, bos: bool = True) -> "Vocab":
        """Map the word pools and templates through `tokenizer`. Pools keep only single-token words
        (the others are listed in `.split`); template words may be several tokens. `stop` must be
        one token, and the needle must end with it."""
        pools, split = [], []
        for words in (filler, keys, values):
            ok, bad = single_token_words(tokenizer, words)
            pools.append(np.asarray(list(dict.fromkeys(ok.values())), np.int32))
            split += bad
        f, k, v = pools
        # the pools must not share tokens, or the copy is ambiguous
        k = np.setdiff1d(k, f)
        v = np.setdiff1d(v, np.concatenate([f, k]))
        if len(f) < 8 or len(k) < 4 or len(v) < 8:
            raise ValueError(f"too few single-token words for this tokenizer (filler {len(f)}, keys {len(k)}, values {len(v)})")
        stop_ids = _word_ids(tokenizer, stop)
        if len(stop_ids) != 1:
            raise ValueError(f"the stop word {stop!r} is {len(stop_ids)} tokens for this tokenizer; choose a single-token one")

        def template(text):
            out = []
            for w in text.split():
                out += [cls.KEY] if w == "{key}" else [cls.VALUE] if w == "{value}" else _word_ids(tokenizer, w)
            return tuple(out)

        nd = template(needle)
        if nd[-1] != stop_ids[0]:
            raise ValueError("the needle template must end with the stop word (the answer ends there)")
        b = tokenizer.bos_token_id if bos else None
        return cls(b, f, k, v, nd, template(query), stop_ids[0], tuple(split))

    def fill(self, template, key, values) -> tuple[list[int], int]:
        """Template ids with the placeholders filled -> (ids, index of the first value token or -1)."""
        out, at = [], -1
        for t in template:
            if t == self.KEY:
                out.append(int(key))
            elif t == self.VALUE:
                at = len(out) if at < 0 else at
                out += [int(v) for v in values]
            else:
                out.append(int(t))
        return out, at

    @property
    def n_fixed(self) -> int:
        """Prompt tokens that are not filler, for a one-value needle (BOS, needle, query)."""
        return (self.bos is not None) + len(self.needle) + len(self.query)


@dataclasses.dataclass
class Needles:
    """A set of needle prompts: token ids (ragged), needle value spans [a, b), answers, and the grid cell."""

    prompts: list  # of int32 [P_i]
    spans: np.ndarray  # int [N, 2]: prompt[a:b] is the value span
    answers: list  # of int32 [n_values + 1]: the values then the stop token
    length: np.ndarray  # int [N] prompt length
    depth: np.ndarray  # float [N] needle depth in [0, 1]
    stop: int

    def __len__(self):
        return len(self.prompts)


def prompt(rng: np.random.Generator, vocab: Vocab, length: int, depth: float, n_values: int = 3, n_distractors: int = 0):
    """One prompt of `length` tokens with the needle at `depth` of the filler -> (ids, (a, b), answer).

    n_distractors: other needles (other keys, other values) placed at random depths."""
    key, *others = rng.choice(vocab.keys, size=1 + n_distractors, replace=False)
    vals = rng.choice(vocab.values, size=n_values, replace=False)
    needle, at = vocab.fill(vocab.needle, key, vals)
    query, _ = vocab.fill(vocab.query, key, vals)
    extra = []
    for k in others:
        extra.append(vocab.fill(vocab.needle, k, rng.choice(np.setdiff1d(vocab.values, vals), n_values, replace=False))[0])
    head = [vocab.bos] if vocab.bos is not None else []
    n_fill = length - len(head) - len(needle) - len(query) - sum(map(len, extra))
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for the needle and the query ({length - n_fill} tokens)")
    filler = list(rng.choice(vocab.filler, size=n_fill))
    cut = int(round(depth * n_fill))
    pieces = [(cut, needle, True)] + [(int(rng.integers(0, n_fill + 1)), e, False) for e in extra]
    pieces.sort(key=lambda p: (p[0], not p[2]))
    ids, prev, a = list(head), 0, -1
    for c, piece, is_needle in pieces:
        ids += filler[prev:c]
        prev = c
        if is_needle:
            a = len(ids) + at
        ids += piece
    ids += filler[prev:] + query
    answer = np.asarray([*vals, vocab.stop], np.int32)
    return np.asarray(ids, np.int32), (a, a + n_values), answer


def grid(vocab: Vocab, lengths, depths, n_per_cell: int = 4, *, n_values: int = 3, n_distractors: int = 0, seed: int = 0) -> Needles:
    """Prompts over context lengths x needle depths, n_per_cell each (fresh keys and values per prompt)."""
    rng = np.random.default_rng(seed)
    out = dict(prompts=[], spans=[], answers=[], length=[], depth=[])
    for n in lengths:
        for d in depths:
            for _ in range(n_per_cell):
                ids, span, ans = prompt(rng, vocab, int(n), float(d), n_values, n_distractors)
                for k, v in zip(out, (ids, span, ans, int(n), float(d))):
                    out[k].append(v)
    return Needles(out["prompts"], np.asarray(out["spans"], np.int64).reshape(-1, 2), out["answers"],
                   np.asarray(out["length"]), np.asarray(out["depth"], float), vocab.stop)


def training_batch(rng: np.random.Generator, vocab: Vocab, batch: int, seq_len: int, *, max_needles: int = 4,
                   n_values=(2, 4), query_all: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Training rows [batch, seq_len] and loss weights [batch, seq_len - 1] (1 on predicting answer tokens).

    Each row: BOS, filler with 1..max_needles needles (distinct keys, n_values[0]..n_values[1] values
    each) at uniformly random depths, then queries for a random non-empty subset of them in random
    order (all of them when `query_all`), each followed by its answer (values then the stop token).
    Only answers are weighted.
    """
    toks = np.zeros((batch, seq_len), np.int32)
    w = np.zeros((batch, seq_len - 1), np.float32)
    for r in range(batch):
        m = int(rng.integers(1, max_needles + 1))
        keys = rng.choice(vocab.keys, size=m, replace=False)
        needles, tail, wt = [], [], []
        for k in keys:
            vals = rng.choice(vocab.values, size=int(rng.integers(n_values[0], n_values[1] + 1)), replace=False)
            needles.append((vocab.fill(vocab.needle, k, vals)[0], vals))
        for i in rng.permutation(m)[: m if query_all else int(rng.integers(1, m + 1))]:
            q = vocab.fill(vocab.query, keys[i], needles[i][1])[0]
            ans = [*map(int, needles[i][1]), vocab.stop]
            tail += q + ans
            wt += [0] * len(q) + [1] * len(ans)
        head = [vocab.bos] if vocab.bos is not None else []
        n_fill = seq_len - len(head) - sum(len(n) for n, _ in needles) - len(tail)
        if n_fill < 0:
            raise ValueError(f"seq_len {seq_len} is too short for {m} needles and their queries")
        filler = list(rng.choice(vocab.filler, size=n_fill))
        cuts = np.sort(rng.integers(0, n_fill + 1, size=m))
        ids, prev = list(head), 0
        for c, (nd, _) in zip(cuts, needles):
            ids += filler[prev:c] + nd
            prev = c
        ids += filler[prev:]
        start = len(ids)
        ids += tail
        toks[r] = ids
        w[r, start - 1:] = wt  # weight[t - 1] is the loss of predicting token t
    return toks, w


def left_pad(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> (int32 tokens [N, P] left-padded, bool attention mask [N, P]), as generate wants."""
    P = max(len(p) for p in prompts)
    toks = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        toks[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    return toks, mask


def recall(generated, answer, stop: int | None = None) -> float:
    """ROUGE-1 recall of the answer's tokens (stop token excluded) in the generation, cut at the stop token."""
    g = np.asarray(generated)
    if stop is not None:
        hit = np.flatnonzero(g == stop)
        g = g[: hit[0]] if len(hit) else g
        answer = np.asarray(answer)[np.asarray(answer) != stop]
    from collections import Counter

    gc, rc = Counter(g.tolist()), Counter(np.asarray(answer).tolist())
    return sum(min(n, gc[t]) for t, n in rc.items()) / max(1, sum(rc.values()))
