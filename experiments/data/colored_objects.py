"""Colored-Objects prompts (Ippolito & Callison-Burch 2023; Merullo et al. 2024), for any Hugging Face tokenizer.

Three objects with three colours, and a question about one of them:

    On the table, there is a red pen, a blue cup, and a green book. What color is the cup?  ->  " blue"

The answer is a colour that occurs in the prompt; the other two colours are the multiple-choice
distractors, which `accuracy` compares it with. The queried object occurs twice (in the list and
in the question), as the subject does in IOI. The corrupted ("mindiff") prompt is the same list
with the question about another object of the list, so its answer is another colour in the list
(circuit_reuse `cobjs_mindiff_data_42.json`); the answer pair is (clean colour, corrupted colour).

    gen = ColoredObjectsGenerator(tokenizer)           # checks every colour and object is one token
    b = gen.sample(np.random.default_rng(0), 64)
    b.tokens, b.corrupted   # [n, P] int32: BOS + prompt ending at END ("?"; the object with TEMPLATE_AT_END)
    b.answers               # [n, 2]: (clean colour, corrupted colour) token ids
    b.color_pos, b.object_pos   # [n, 3] positions of the three colours and objects
    b.target, b.target_cf   # [n] which item (0..2) the clean / corrupted question asks about
    b.query, b.end          # [n] position of the object in the question, and of the last token
    b.choices               # [n, 3] the three colour ids (the multiple-choice options)

Not reproduced from the paper's data: its one solved shot before the query and the "Q:/A:" format
with capitalised answers (" Blue"); a model that needs them (GPT-2 medium) sees a zero-shot prompt.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from experiments.data import ioi

TEMPLATE = "On the table, there is a [C1] [O1], a [C2] [O2], and a [C3] [O3]. What color is the [Q]?"
# the question ends at the object: the token to match is END itself (what the ioi-cobjs-4l organism is trained on)
TEMPLATE_AT_END = "On the table, there is a [C1] [O1], a [C2] [O2], and a [C3] [O3]. What color is the [Q]"
COLORS = "red blue green yellow orange purple black white brown pink".split()
OBJECTS = "pen cup book ball hat key box phone lamp shoe bag coat plate bottle chair".split()

_SLOT = re.compile(r"\[(C1|C2|C3|O1|O2|O3|Q)\]")


class SplitWordError(ioi.SplitWordError):
    """Some colours or objects are not single tokens for this tokenizer."""

    NEEDS = "Colored Objects needs every colour and object to be one token; pass colors=/objects= lists without them"


@dataclasses.dataclass
class ColoredObjectsBatch:
    tokens: np.ndarray      # [n, P] int32
    corrupted: np.ndarray   # [n, P] the question about another item of the same list
    answers: np.ndarray     # [n, 2] (clean colour, corrupted colour) ids
    choices: np.ndarray     # [n, 3] the colours of items 0..2 (ids)
    color_pos: np.ndarray   # [n, 3]
    object_pos: np.ndarray  # [n, 3]
    target: np.ndarray      # [n] item asked about (clean)
    target_cf: np.ndarray   # [n] item asked about (corrupted)
    query: np.ndarray       # [n] position of the object in the question
    end: np.ndarray         # [n] last prompt token

    def __len__(self):
        return len(self.tokens)

    def subset(self, idx) -> "ColoredObjectsBatch":
        return ColoredObjectsBatch(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

    def distractor_pos(self) -> np.ndarray:
        """[n, 2] positions of the two incorrect colours (the items not asked about)."""
        others = np.array([[i for i in range(3) if i != t] for t in self.target])
        return np.take_along_axis(self.color_pos, others, 1)


class ColoredObjectsGenerator:
    """Makes Colored-Objects batches for `tokenizer` (every colour and object one token after a space)."""

    def __init__(self, tokenizer, *, colors=COLORS, objects=OBJECTS, template: str = TEMPLATE, prepend_bos: bool = True):
        self.tokenizer = tokenizer
        self.colors, self.objects = list(colors), list(objects)
        if len(set(self.colors)) < 4 or len(set(self.objects)) < 3:
            raise ValueError("Colored Objects needs at least 4 distinct colours and 3 distinct objects")
        if sorted(m.group(1) for m in _SLOT.finditer(template)) != sorted(["C1", "C2", "C3", "O1", "O2", "O3", "Q"]):
            raise ValueError(f"template must have the slots [C1] [O1] [C2] [O2] [C3] [O3] [Q] once each, got {template!r}")
        self.template = template
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prepend_bos = prepend_bos and self.bos is not None
        ids = ioi.single_token_ids(tokenizer, self.colors + self.objects, SplitWordError)
        self.color_ids = np.array([ids[w] for w in self.colors], np.int32)
        self.object_ids = np.array([ids[w] for w in self.objects], np.int32)
        self.ids, self.slots = self._compile()

    def _encode(self, text):
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _compile(self):
        fills = [dict(C1=self.colors[0], C2=self.colors[1], C3=self.colors[2], O1=self.objects[0], O2=self.objects[1],
                      O3=self.objects[2], Q=self.objects[1]),
                 dict(C1=self.colors[-1], C2=self.colors[-2], C3=self.colors[-3], O1=self.objects[-1], O2=self.objects[-2],
                      O3=self.objects[-3], Q=self.objects[-1])]
        fill = lambda text, f: _SLOT.sub(lambda m: f[m.group(1)], text)
        bos = [self.bos] if self.prepend_bos else []
        ids = np.array(bos + self._encode(fill(self.template, fills[0])), np.int32)
        slots = {m.group(1): len(bos) + len(self._encode(fill(self.template[: m.end()], fills[0]))) - 1
                 for m in _SLOT.finditer(self.template)}
        sub = ids.copy()
        for k, p in slots.items():
            sub[p] = self._encode(" " + fills[1][k])[0]
        other = np.array(bos + self._encode(fill(self.template, fills[1])), np.int32)
        if sub.shape != other.shape or (sub != other).any():
            raise ValueError(f"template {self.template!r} does not tokenize word by word with this tokenizer")
        return ids, slots

    @property
    def length(self) -> int:
        return len(self.ids)

    def sample(self, rng: np.random.Generator, n: int, pad_to: int | None = None) -> ColoredObjectsBatch:
        """n prompts: three distinct colours and objects, the question about a uniform item, the
        corrupted question about one of the other two (uniform). Right-padded to pad_to if given."""
        P = self.length if pad_to is None else int(pad_to)
        if P < self.length:
            raise ValueError(f"pad_to={pad_to} is shorter than the prompt ({self.length})")
        col = np.argsort(rng.random((n, len(self.colors))), 1)[:, :3]
        obj = np.argsort(rng.random((n, len(self.objects))), 1)[:, :3]
        target = rng.integers(0, 3, n)
        target_cf = (target + rng.integers(1, 3, n)) % 3
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.bos or 0)
        tokens = np.full((n, P), pad, np.int32)
        tokens[:, : self.length] = self.ids
        cpos = np.array([self.slots[f"C{i + 1}"] for i in range(3)])
        opos = np.array([self.slots[f"O{i + 1}"] for i in range(3)])
        tokens[:, cpos] = self.color_ids[col]
        tokens[:, opos] = self.object_ids[obj]
        rows = np.arange(n)
        q = self.slots["Q"]
        corrupted = tokens.copy()
        tokens[:, q] = self.object_ids[obj[rows, target]]
        corrupted[:, q] = self.object_ids[obj[rows, target_cf]]
        choices = self.color_ids[col]
        answers = np.stack([choices[rows, target], choices[rows, target_cf]], 1).astype(np.int32)
        full = lambda a: np.broadcast_to(a, (n, 3)).astype(np.int32).copy()
        return ColoredObjectsBatch(tokens, corrupted, answers, choices.astype(np.int32), full(cpos), full(opos),
                                   target.astype(np.int32), target_cf.astype(np.int32), np.full(n, q, np.int32),
                                   np.full(n, self.length - 1, np.int32))

    def text(self, batch: ColoredObjectsBatch, i: int, corrupted: bool = False) -> str:
        row = (batch.corrupted if corrupted else batch.tokens)[i, int(self.prepend_bos): batch.end[i] + 1]
        return self.tokenizer.decode(row.tolist())


def accuracy(logits_end: np.ndarray, batch: ColoredObjectsBatch) -> np.ndarray:
    """Per prompt: whether the correct colour has the highest logit among the three in the list
    (multiple choice). logits_end: [n, vocab] at END."""
    lg = np.take_along_axis(np.asarray(logits_end), batch.choices, 1)
    return lg.argmax(1) == batch.target
