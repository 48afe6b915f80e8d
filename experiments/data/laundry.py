"""The Laundry List task: a list of N items, then all but one of them again; recall the one left out.

Talking Heads (Merullo et al. 2024; methods.md section 2) call "Laundry List" a synthetic task that
"requires recall from a list" and whose accuracy falls as the list grows. Its template is not in the
paper's abstract and the code is not released, so this is our reading (methods.md marks it [M]): the
IOI mechanism (an item said twice is inhibited, the mover copies the one said once) stretched to N
items, N - 1 of which are repeated in a shuffled order:

    packed sock hat cup bag . took cup sock bag . left      -> hat

Word lists, one token per word (any tokenizer that has these words as single tokens):

    BOS packed i_1 .. i_N . took j_1 .. j_{N-1} . left      answer: the i_k not among the j
    positions: items 2 .. N+1, repeats N+4 .. 2N+2, END (the "left" token) 2N+4; length 2N+5

    task = LaundryList()                                   # the 24 items below
    vocab = Vocab(tokenizer)                               # every word must be one token
    batch = task.sample(np.random.default_rng(0), n=64, n_items=5)
    tokens = vocab.ids(batch.words())                      # [64, 15]; answers vocab.item_ids(...)
"""

from __future__ import annotations

import dataclasses

import numpy as np

ITEMS = ("shirt", "sock", "hat", "cup", "bag", "pen", "key", "box", "coat", "shoe", "book", "lamp", "fork", "mug", "ring",
         "belt", "vase", "bowl", "comb", "drum", "kite", "rope", "soap", "tent")
TEMPLATE_WORDS = ("packed", ".", "took", "left")
MIN_ITEMS = 2
FIRST_SLOT = 2  # position of the first item (after BOS and "packed"), whatever the length


class MissingWordError(ValueError):
    pass


class ListTooLongError(ValueError):
    pass


def prompt_length(n_items: int) -> int:
    """Tokens in a prompt of n_items items, BOS included (the answer not included)."""
    return 2 * n_items + 5


def positions(n_items: int) -> dict:
    """Where things are in a prompt of n_items items: item slots [N], repeat slots [N - 1], END."""
    N = n_items
    return dict(items=np.arange(2, N + 2), repeats=np.arange(N + 4, 2 * N + 3), end=2 * N + 4)


@dataclasses.dataclass(frozen=True)
class Batch:
    """items [n, N] (indices into the item list), order [n, N - 1] (indices into each row's items, in
    the order they are repeated), target [n] (the index into the row of the item left out)."""

    item_words: tuple
    items: np.ndarray
    order: np.ndarray
    target: np.ndarray

    @property
    def n_items(self) -> int:
        return self.items.shape[1]

    @property
    def answer(self) -> np.ndarray:
        """Item index (into the item list) of each row's answer."""
        return self.items[np.arange(len(self.items)), self.target]

    def words(self) -> list[list[str]]:
        out = []
        for it, od in zip(self.items, self.order):
            names = [self.item_words[i] for i in it]
            out.append(["packed", *names, ".", "took", *(names[j] for j in od), ".", "left"])
        return out


@dataclasses.dataclass(frozen=True)
class LaundryList:
    item_words: tuple = ITEMS
    max_items: int | None = None  # the longest list a model supports (None: as many as there are items)

    def check(self, n_items: int) -> None:
        top = len(self.item_words) if self.max_items is None else min(self.max_items, len(self.item_words))
        if not MIN_ITEMS <= n_items <= top:
            raise ListTooLongError(
                f"a list of {n_items} items is not supported: lists hold {MIN_ITEMS} to {top} items here (the model's "
                f"positions and the item vocabulary of {len(self.item_words)} words set the limit); use fewer items or a "
                "model trained on longer lists")

    def sample(self, rng: np.random.Generator, n: int, n_items: int, target=None) -> Batch:
        """n prompts of n_items distinct items each; the item left out is at list index `target`
        (an int or [n]; default uniform)."""
        self.check(n_items)
        V = len(self.item_words)
        items = np.stack([rng.choice(V, n_items, replace=False) for _ in range(n)]) if n else np.zeros((0, n_items), int)
        tgt = rng.integers(n_items, size=n) if target is None else np.broadcast_to(np.asarray(target), (n,)).copy()
        if np.any((tgt < 0) | (tgt >= n_items)):
            raise ValueError(f"target must be a list index in 0..{n_items - 1}")
        order = np.stack([rng.permutation(np.delete(np.arange(n_items), t)) for t in tgt]) if n else np.zeros((0, n_items - 1), int)
        return Batch(tuple(self.item_words), items, order, tgt)

    @property
    def words(self) -> tuple:
        return TEMPLATE_WORDS + tuple(self.item_words)


class Vocab:
    """Word lists to token ids: every word must be one token, after a space (a word-level vocabulary
    like the organism's, or a BPE one like GPT-2's "Ġsock") or bare; else MissingWordError names
    the words."""

    def __init__(self, tokenizer, task: LaundryList = LaundryList()):
        words = task.words
        unk = tokenizer.unk_token_id
        ids = []
        for w in words:  # the word after a space (a BPE vocabulary: GPT-2's "Ġsock"), else the bare token
            enc = tokenizer.encode(" " + w, add_special_tokens=False)
            i = enc[0] if len(enc) == 1 else tokenizer.convert_tokens_to_ids(w)
            ids.append(None if i is None or (unk is not None and i == unk) else int(i))
        missing = [w for w, i in zip(words, ids) if i is None]
        if missing:
            raise MissingWordError(
                f"{len(missing)} words of the Laundry List task are not single tokens of this tokenizer: {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}; use the organism's word-level tokenizer (models/list-recall-2l), "
                "or a LaundryList(item_words=...) whose items are single tokens of this tokenizer")
        if tokenizer.bos_token_id is None:
            raise MissingWordError("the tokenizer has no BOS token; the prompts start with BOS")
        self.id = dict(zip(words, ids))
        self.bos = tokenizer.bos_token_id
        self.task = task

    def ids(self, word_lists) -> np.ndarray:
        """[n, 1 + len]: BOS + the words (all lists the same length)."""
        lens = {len(w) for w in word_lists}
        if len(lens) > 1:
            raise ValueError(f"word lists of different lengths {sorted(lens)}; batch each list length separately")
        return np.array([[self.bos] + [self.id[w] for w in ws] for ws in word_lists], np.int32).reshape(len(word_lists), -1)

    def item_ids(self, idx) -> np.ndarray:
        return np.array([self.id[self.task.item_words[i]] for i in np.atleast_1d(idx)], np.int32)


def training_batch(task: LaundryList, vocab: Vocab, rng: np.random.Generator, n: int, n_ctx: int, n_range):
    """(tokens [n, n_ctx], weights [n, n_ctx - 1]): prompts with a list length drawn uniformly from
    n_range (lo, hi inclusive), each followed by its answer and EOS, right-padded with BOS; loss
    weight 1 on the answer and on the EOS after it."""
    lo, hi = n_range
    if prompt_length(hi) + 2 > n_ctx:
        raise ValueError(f"n_ctx {n_ctx} is too short for lists of {hi} items (needs {prompt_length(hi) + 2})")
    tokens = np.full((n, n_ctx), vocab.bos, np.int32)
    weights = np.zeros((n, n_ctx - 1), np.float32)
    sizes = rng.integers(lo, hi + 1, size=n)
    for N in np.unique(sizes):
        rows = np.flatnonzero(sizes == N)
        b = task.sample(rng, len(rows), int(N))
        P = prompt_length(int(N))
        tokens[rows, :P] = vocab.ids(b.words())
        tokens[rows, P] = vocab.item_ids(b.answer)
        weights[rows, P - 1 : P + 1] = 1.0  # predicting the answer (at END) and the EOS after it
    return tokens, weights
