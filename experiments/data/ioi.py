"""Indirect-object-identification (IOI) prompts, for any Hugging Face tokenizer.

Wang et al. (2023) study sentences like

    When Mary and John went to the store, John gave a drink to  ->  " Mary"

Two names appear in the first clause; one of them (the subject, S) appears again, and the
answer is the other (the indirect object, IO). The templates are the paper's fifteen BABA
templates (Easy-Transformer's `BABA_TEMPLATES`, App. E) and their ABBA swaps ([B] is S, [A] is
IO; ABBA swaps the first [B] and [A]). p_ABC, the paper's reference distribution, puts three
unrelated names at IO, S1 and S2 (the places and objects stay).

    gen = IOIGenerator(tokenizer)                     # checks every filler is one token
    b = gen.sample(np.random.default_rng(0), 64)      # mixed templates, right-padded
    b.tokens, b.corrupted   # [n, P] int32: BOS + prompt (ending at END), padded on the right
    b.answers               # [n, 2]: (IO, S) token ids
    b.io, b.s1, b.s2, b.end # [n] positions in b.tokens
    b.template, b.abba      # [n] template id (0..14) and word order

Every name, place and object must be a single token when preceded by a space (" Mary" for
GPT-2); `IOIGenerator` raises `SplitWordError` naming the words that split (or are unknown to
the tokenizer) otherwise. A template is tokenized once; examples are made by substituting filler
token ids at the slot positions (checked at construction against tokenizing a second filling),
so every example of a template has the same length. Mixed-template batches are padded on the
right with the tokenizer's pad (or BOS/EOS) id: under causal attention nothing at or before END
sees the padding, so no attention mask is needed for metrics read at END.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# Easy-Transformer `ioi_dataset.BABA_TEMPLATES` (the paper's App. E); the final " [A]" is the answer.
BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)


def abba(template: str) -> str:
    """The ABBA swap of a BABA template: the first [B] and the first [A] trade places."""
    return template.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)


# Names that are single GPT-2 tokens with a leading space (a subset of Easy-Transformer's NAMES).
NAMES = (
    "Mary John Tom James Dan Sid Martin Amy Michael Jessica Sarah David Paul Kevin Laura Lisa Mark Ryan Scott "
    "Steven Thomas Richard Rachel Eric Adam Kelly Emily Jacob Patrick Sean Kyle Tyler Alex Max Luke Jack Rose "
    "Anna Kate George"
).split()
PLACES = "store garden restaurant school hospital office house station".split()
OBJECTS = "ring kiss bone basketball computer necklace drink snack".split()


def single_token_ids(tokenizer, words, error=None) -> dict:
    """word -> its one token id (with a leading space), or `error` (default SplitWordError) naming
    every word that splits or is unknown to the tokenizer."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids, split = {}, []
    for w in dict.fromkeys(words):
        t = list(tokenizer(" " + w, add_special_tokens=False)["input_ids"])
        if len(t) != 1 or (unk is not None and t[0] == unk):
            split.append(w)
        else:
            ids[w] = t[0]
    if split:
        raise (error or SplitWordError)(split, getattr(tokenizer, "name_or_path", ""))
    return ids


class SplitWordError(ValueError):
    """Some filler words are not single tokens for this tokenizer."""

    NEEDS = "IOI needs every name, place and object to be one token; pass names=/places=/objects= lists without them"

    def __init__(self, words, tokenizer_name=""):
        self.words = list(words)
        super().__init__(
            f"these words are not single tokens{' for ' + tokenizer_name if tokenizer_name else ''} "
            f"(with a leading space): {', '.join(repr(w) for w in self.words)}. {self.NEEDS}"
        )


@dataclasses.dataclass
class IOIBatch:
    """IOI prompts; positions index `tokens` (BOS included when the generator prepends it)."""

    tokens: np.ndarray      # [n, P] int32, clean prompts ending at END, right-padded
    corrupted: np.ndarray   # [n, P] p_ABC: three unrelated names at IO, S1, S2
    answers: np.ndarray     # [n, 2] (IO, S) token ids
    io: np.ndarray          # [n] position of IO in the first clause
    s1: np.ndarray          # [n] position of S in the first clause
    s2: np.ndarray          # [n] position of S's repetition
    end: np.ndarray         # [n] the last prompt token ("to"), where the answer is predicted
    template: np.ndarray    # [n] template id 0..14
    abba: np.ndarray        # [n] bool: ABBA word order (IO first)
    names: np.ndarray       # [n, 2] (IO, S) name indices into the generator's names
    abc_names: np.ndarray   # [n, 3] name indices put at IO, S1, S2 in `corrupted`

    def __len__(self):
        return len(self.tokens)

    @property
    def positions(self) -> dict:
        return {"IO": self.io, "S1": self.s1, "S2": self.s2, "END": self.end}

    def subset(self, idx) -> "IOIBatch":
        return IOIBatch(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


@dataclasses.dataclass
class _Template:
    text: str       # with slots, prompt only (the final " [A]" removed)
    ids: np.ndarray  # token ids of a reference filling (BOS included)
    slots: dict     # slot name -> positions in ids


_SLOT = re.compile(r"\[(A|B|PLACE|OBJECT)\]")


class IOIGenerator:
    """Makes IOI batches for `tokenizer` (a Hugging Face tokenizer).

    names / places / objects: filler words, each written after a space (" Mary") and required to
    be a single known token. prepend_bos: put the tokenizer's BOS (or EOS) id first.
    """

    def __init__(self, tokenizer, *, names=NAMES, places=PLACES, objects=OBJECTS, templates=BABA_TEMPLATES,
                 prepend_bos: bool = True):
        self.tokenizer = tokenizer
        self.names, self.places, self.objects = list(names), list(places), list(objects)
        if len(set(self.names)) < 5:
            raise ValueError("IOI needs at least 5 distinct names (2 for the prompt, 3 for p_ABC)")
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prepend_bos = prepend_bos and self.bos is not None
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.bos if self.bos is not None else 0)
        ids = single_token_ids(tokenizer, self.names + self.places + self.objects)
        self.name_ids = np.array([ids[w] for w in self.names], np.int32)
        self.place_ids = np.array([ids[w] for w in self.places], np.int32)
        self.object_ids = np.array([ids[w] for w in self.objects], np.int32)
        # templates[2 t + k]: BABA template t (k = 0) and its ABBA swap (k = 1)
        self.templates = []
        for t in templates:
            for text in (t, abba(t)):
                assert text.endswith(" [A]"), text
                self.templates.append(self._compile(text[: -len(" [A]")]))
        self.n_templates = len(templates)

    def _encode(self, text):
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fill(self, text, fill):
        return _SLOT.sub(lambda m: fill[m.group(1)], text)

    def _compile(self, text) -> _Template:
        fills = [dict(A=self.names[0], B=self.names[1], PLACE=self.places[0], OBJECT=self.objects[0]),
                 dict(A=self.names[2], B=self.names[3], PLACE=self.places[-1], OBJECT=self.objects[-1])]
        bos = [self.bos] if self.prepend_bos else []
        ids = np.array(bos + self._encode(self._fill(text, fills[0])), np.int32)
        slots = {}
        for m in _SLOT.finditer(text):
            n = len(bos) + len(self._encode(self._fill(text[: m.end()], fills[0]))) - 1
            slots.setdefault(m.group(1), []).append(n)
        # substituting ids at the slots must equal tokenizing another filling
        other = np.array(bos + self._encode(self._fill(text, fills[1])), np.int32)
        sub = ids.copy()
        for k, pos in slots.items():
            w = fills[1][k]
            sub[pos] = self._encode(" " + w)[0]
        if sub.shape != other.shape or (sub != other).any():
            raise ValueError(f"template {text!r} does not tokenize word by word with this tokenizer")
        return _Template(text, ids, {k: np.array(v) for k, v in slots.items()})

    @property
    def template_lengths(self) -> np.ndarray:
        """Prompt length (BOS included) of each BABA template (its ABBA swap has the same)."""
        return np.array([len(self.templates[2 * t].ids) for t in range(self.n_templates)])

    def sample(self, rng: np.random.Generator, n: int, *, templates=None, order: str = "mixed",
               pad_to: int | None = None) -> IOIBatch:
        """n examples; template ids drawn uniformly from `templates` (default all), word order
        "BABA", "ABBA" or "mixed" (each with probability 1/2). Right-padded to the longest prompt
        (or to pad_to)."""
        tids = np.arange(self.n_templates) if templates is None else np.atleast_1d(np.asarray(templates))
        template = rng.choice(tids, size=n)
        ab = {"BABA": np.zeros(n, bool), "ABBA": np.ones(n, bool)}.get(order)
        if ab is None:
            if order != "mixed":
                raise ValueError(f"order must be 'BABA', 'ABBA' or 'mixed', got {order!r}")
            ab = rng.random(n) < 0.5
        N = len(self.names)
        # five distinct names per example: IO, S, then three for p_ABC (distinct from IO and S)
        perm = np.argsort(rng.random((n, N)), axis=1)[:, :5]
        io_n, s_n, abc = perm[:, 0], perm[:, 1], perm[:, 2:5]
        place = rng.integers(0, len(self.places), n)
        obj = rng.integers(0, len(self.objects), n)
        lens = np.array([len(self.templates[2 * t + a].ids) for t, a in zip(template, ab)])
        P = int(lens.max()) if pad_to is None else int(pad_to)
        if P < lens.max():
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({lens.max()})")
        tokens = np.full((n, P), self.pad, np.int32)
        corrupted = tokens.copy()
        pos = {k: np.zeros(n, np.int32) for k in ("io", "s1", "s2", "end")}
        for i, (t, a) in enumerate(zip(template, ab)):
            tp = self.templates[2 * t + a]
            row = tp.ids.copy()
            if "PLACE" in tp.slots:
                row[tp.slots["PLACE"]] = self.place_ids[place[i]]
            if "OBJECT" in tp.slots:
                row[tp.slots["OBJECT"]] = self.object_ids[obj[i]]
            a_pos, b_pos = tp.slots["A"], tp.slots["B"]  # A: IO (one slot); B: S (two slots)
            io_p, s1_p, s2_p = int(a_pos[0]), int(b_pos[0]), int(b_pos[1])
            row[io_p] = self.name_ids[io_n[i]]
            row[[s1_p, s2_p]] = self.name_ids[s_n[i]]
            tokens[i, : len(row)] = row
            crow = row.copy()
            crow[[io_p, s1_p, s2_p]] = self.name_ids[abc[i]]
            corrupted[i, : len(row)] = crow
            pos["io"][i], pos["s1"][i], pos["s2"][i], pos["end"][i] = io_p, s1_p, s2_p, len(row) - 1
        answers = np.stack([self.name_ids[io_n], self.name_ids[s_n]], 1).astype(np.int32)
        return IOIBatch(tokens, corrupted, answers, pos["io"], pos["s1"], pos["s2"], pos["end"], template.astype(np.int32),
                        ab, np.stack([io_n, s_n], 1), abc)

    def text(self, batch: IOIBatch, i: int, corrupted: bool = False) -> str:
        """Example i as text (no BOS, no padding), by decoding its ids."""
        row = (batch.corrupted if corrupted else batch.tokens)[i, int(self.prepend_bos): batch.end[i] + 1]
        return self.tokenizer.decode(row.tolist())


def template_means(values: np.ndarray, template: np.ndarray, abba: np.ndarray | None = None, axis: int = 0) -> np.ndarray:
    """Per-example means over examples of the same template: out[b] = mean of values[b'] over b'
    with template[b'] == template[b] (and the same word order when `abba` is given, so positions
    line up). `axis` is the example axis."""
    v = np.moveaxis(np.asarray(values), axis, 0)
    key = np.asarray(template) * 2 + (np.asarray(abba, int) if abba is not None else 0)
    out = np.empty_like(v, dtype=np.result_type(v.dtype, np.float32))
    for k in np.unique(key):
        m = key == k
        out[m] = v[m].mean(0, keepdims=True)
    return np.moveaxis(out, 0, axis)


def role_swap(batch: IOIBatch) -> tuple[np.ndarray, np.ndarray]:
    """Sources for DAS pairs: each prompt with its IO and S names exchanged everywhere, and the
    counterfactual label (the base's S: the name the source repeats is the base's IO)."""
    io, s = batch.answers[:, 0:1], batch.answers[:, 1:2]
    src = np.where(batch.tokens == io, s, np.where(batch.tokens == s, io, batch.tokens))
    return src.astype(batch.tokens.dtype), batch.answers[:, 1].copy()
