"""A synthetic knowledge graph: single-hop facts, two-hop queries, and context that conflicts with memory.

Entities are made-up two-syllable words ("bavo", "kelu"); each relation maps every entity to another
one. A fact is "the mother of bavo is kelu". The organism that learns this graph (models/kg-6l)
memorises single-hop facts, answers two-hop queries on 90% of the (e1, r1, r2) triples in
training, and is tested on the rest (Hopping Too Late, methods.md section 1); it also sees a
context sentence before a query (PH3, methods.md section 3). Word lists, one token per word:

    hop(r, e)                     the r of e is                          -> table[r, e]
    two_hop(r1, r2, e1)           the r2 of the r1 of e1 is              -> table[r2, table[r1, e1]]
    context(rc, ec, c, r, e)      the rc of ec is c . the r of e is      -> c when (rc, ec) = (r, e)
    identity(a, b, x)             a = a , b = b , x =                     -> x (the Patchscopes target)

Training draws, for a context prompt, one of three cases: the queried pair is *unknown* (never
stated as a bare fact; the answer is the context's object, so the model learns to read context),
the context agrees with memory, or the context is about another pair (a distractor; the answer is
the memorised one). A *conflict* prompt (context about the same known pair, naming another object)
never occurs in training: there the model's memory and its context reading disagree.

    g = Graph.make(seed=0)
    vocab = Vocab(tokenizer)                     # checks every word is one token of the tokenizer
    toks = vocab.ids([g.hop_words(r, e) for r, e in pairs])
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

RELATIONS = ("mother", "boss", "friend", "teacher", "father", "neighbor", "doctor", "rival", "coach", "pupil", "sister", "partner")
TEMPLATE_WORDS = ("the", "of", "is", ".", "=", ",")


def entity_names(n: int, seed: int = 0) -> tuple[str, ...]:
    """n distinct made-up words consonant-vowel-consonant-vowel ("bavo"), drawn with `seed`."""
    cons, vow = "bdfgklmnprstvz", "aeiou"
    words = ["".join(w) for w in itertools.product(cons, vow, cons, vow)]
    if n > len(words):
        raise ValueError(f"at most {len(words)} entities, asked for {n}")
    pick = np.random.default_rng(seed).choice(len(words), n, replace=False)
    return tuple(words[i] for i in sorted(pick))


@dataclasses.dataclass(frozen=True)
class Graph:
    """entities [N], relations [R]; table [R, N]: object index of relation r on entity e (never e
    itself); known [R, N]: the fact is stated in training; train_two_hop [R, R, N]: the two-hop query
    (r1, r2, e1) is in training (only where both hops are known)."""

    entities: tuple
    relations: tuple
    table: np.ndarray
    known: np.ndarray
    train_two_hop: np.ndarray

    @classmethod
    def make(cls, n_entities: int = 30, relations=RELATIONS, known_frac: float = 0.85, train_frac: float = 0.9,
             seed: int = 0) -> "Graph":
        rng = np.random.default_rng(seed)
        R, N = len(relations), n_entities
        table = (np.arange(N)[None] + rng.integers(1, N, (R, N))) % N  # never the entity itself
        known = rng.random((R, N)) < known_frac
        train = _both_known(table, known) & (rng.random((R, R, N)) < train_frac)
        return cls(entity_names(N, seed), tuple(relations), table, known, train)

    @property
    def words(self) -> tuple:
        return TEMPLATE_WORDS + tuple(self.relations) + tuple(self.entities)

    def two_hop_answer(self, r1, r2, e1):
        return self.table[r2, self.table[r1, e1]]

    def held_out_two_hop(self) -> np.ndarray:
        """(r1, r2, e1) [n, 3] with both hops known and the composition never trained on."""
        return np.argwhere(_both_known(self.table, self.known) & ~self.train_two_hop)

    # word lists -------------------------------------------------------------------------
    def hop_words(self, r, e) -> list:
        return ["the", self.relations[r], "of", self.entities[e], "is"]

    def two_hop_words(self, r1, r2, e1) -> list:
        return ["the", self.relations[r2], "of", "the", self.relations[r1], "of", self.entities[e1], "is"]

    def context_words(self, rc, ec, c, r, e) -> list:
        return ["the", self.relations[rc], "of", self.entities[ec], "is", self.entities[c], "."] + self.hop_words(r, e)

    def identity_words(self, a, b, x) -> list:
        A, B = self.entities[a], self.entities[b]
        return [A, "=", A, ",", B, "=", B, ",", self.entities[x], "="]


def _both_known(table, known) -> np.ndarray:
    """[r1, r2, e1]: the fact (r1, e1) and the fact (r2, table[r1, e1]) are both known."""
    return known[:, None, :] & np.stack([known[r2][table] for r2 in range(len(known))], 1)


class MissingWordError(ValueError):
    pass


class Vocab:
    """Word lists to token ids on a word-level tokenizer (the organism's): every word must be one
    known token, else MissingWordError names the words."""

    def __init__(self, tokenizer, words):
        ids = tokenizer.convert_tokens_to_ids(list(words))
        unk = tokenizer.unk_token_id
        missing = [w for w, i in zip(words, ids) if i is None or i == unk]
        if missing:
            raise MissingWordError(
                f"{len(missing)} words of the knowledge graph are not single tokens of this tokenizer: {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}; the kg prompts need the organism's word-level tokenizer "
                "(models/kg-6l), or a dataset built for this model's tokenizer")
        self.id = dict(zip(words, ids))
        self.bos = tokenizer.bos_token_id

    def ids(self, word_lists) -> np.ndarray:
        """[n, 1 + len]: BOS + the words (all lists the same length)."""
        lens = {len(w) for w in word_lists}
        if len(lens) != 1:
            raise ValueError(f"word lists of different lengths {sorted(lens)}; batch each template separately")
        return np.array([[self.bos] + [self.id[w] for w in ws] for ws in word_lists], np.int32)

    def entity_ids(self, graph: Graph, idx) -> np.ndarray:
        return np.array([self.id[graph.entities[i]] for i in np.atleast_1d(idx)], np.int32)


def training_batch(g: Graph, vocab: Vocab, rng: np.random.Generator, n: int, n_ctx: int = 16,
                   mix=(0.35, 0.35, 0.22, 0.08), context_mix=(1 / 3, 1 / 3, 1 / 3)):
    """(tokens [n, n_ctx], weights [n, n_ctx - 1]): a mix of single-hop facts, trained two-hop
    queries, context prompts and identity lines (fractions `mix`), each followed by its answer and
    EOS (right-padded); loss weight 1 on the answer and on the EOS after it, 0 elsewhere. Context
    prompts: an unknown pair, an agreeing context, a distractor (fractions `context_mix`)."""
    R, N = g.table.shape
    kinds = rng.choice(4, n, p=np.asarray(mix) / np.sum(mix))
    known = np.argwhere(g.known)
    unknown = np.argwhere(~g.known)
    train2 = np.argwhere(g.train_two_hop)
    tokens = np.zeros((n, n_ctx), np.int32)
    weights = np.zeros((n, n_ctx - 1), np.float32)
    for i, k in enumerate(kinds):
        if k == 0:
            r, e = known[rng.integers(len(known))]
            words, ans = g.hop_words(r, e), [g.entities[g.table[r, e]]]
        elif k == 1:
            r1, r2, e1 = train2[rng.integers(len(train2))]
            words, ans = g.two_hop_words(r1, r2, e1), [g.entities[g.two_hop_answer(r1, r2, e1)]]
        elif k == 2:
            case = rng.choice(3, p=np.asarray(context_mix) / np.sum(context_mix))
            if case == 0:  # an unknown pair: read the context
                r, e = unknown[rng.integers(len(unknown))]
                c = rng.integers(N)
                words, a = g.context_words(r, e, c, r, e), c
            else:
                r, e = known[rng.integers(len(known))]
                if case == 1:  # context agrees with memory
                    words, a = g.context_words(r, e, g.table[r, e], r, e), g.table[r, e]
                else:  # context about another pair: answer from memory
                    rc, ec = (r, (e + rng.integers(1, N)) % N) if rng.random() < 0.5 else ((r + rng.integers(1, R)) % R, e)
                    words, a = g.context_words(rc, ec, rng.integers(N), r, e), g.table[r, e]
            ans = [g.entities[a]]
        else:
            a, b, x = rng.choice(N, 3, replace=False)
            words, ans = g.identity_words(a, b, x), [g.entities[x]]
        row = [vocab.bos] + [vocab.id[w] for w in words + ans] + [vocab.bos]  # answer, then EOS
        tokens[i, : len(row)] = row
        weights[i, len(row) - 3 : len(row) - 1] = 1.0  # predicting the answer and the EOS after it
    return tokens, weights
