"""Instruction families metafit's small LM never saw in pretraining, with exact answers.

:mod:`metafit.data.instructions` registers the families that build the pretraining corpus of
``metafit-small-lm`` (every name in ``INSTRUCTION_TASKS`` goes into it), so the small LM already
answers those as well as it ever will and fine-tuning on them measures nothing. The families here
live in their own registry, :data:`UNSEEN_TASKS`, which pretraining never reads (and which is not
part of the small LM's cache key): a data-selection or fine-tuning study on them starts from a model
that has not seen the answers and can learn them from a few dozen examples.

Every family has its own answer format (a word from a small fact table, a bracketed word, a word
said twice, a "yes"/"no"), so a same-family example is what helps in context and in training:

========  =====================================================  ======================  =========
family    prompt (one of two phrasings)                          answer                  keys
========  =====================================================  ======================  =========
opposite  ``What is the opposite of 'hot'?``                     ``cold``                8 words
capital   ``Name the capital city of France.``                   ``Paris``               8 countries
sound     ``What sound does a cow make?``                        ``moo``                 6 animals
colour    ``What colour is snow?``                               ``white``               6 things
bracket   ``Put the word 'apple' in square brackets.``           ``[apple]``             30 words
twice     ``Say the word 'apple' twice.``                        ``apple apple``         30 words
========  =====================================================  ======================  =========

The first four are fact tables (memorised: an example teaches one key); ``bracket`` and ``twice``
are format rules over the pretraining word list (an example teaches the rule for every word).
Each family has two phrasings of its prompt, so a pool holds exact and near duplicates.

Example ``i`` is a pure function of ``(seed, i)``. With ``mix`` (one weight per family) the family
of example ``i`` is drawn with those probabilities, an uneven pool; without it the families cycle.

Example:
    >>> pairs = make_unseen(4, seed=0, tasks=("opposite", "bracket"))
    >>> [p.task for p in pairs]
    ['opposite', 'bracket', 'opposite', 'bracket']
    >>> pairs[1].response == "[" + pairs[1].prompt.split("'")[1] + "]"
    True
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from metafit.data.instructions import _WORDS, INSTRUCTION_TASKS, Instruction
from metafit.registry import Registry

UNSEEN_TASKS: Registry[Callable[[np.random.Generator], tuple[str, str]]] = Registry("unseen-instruction-task")
# Keeps example i's draws apart from example i of make_instructions at the same seed.
_UNSEEN_STREAM = 0x554E5345

OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "left": "right",
             "open": "shut", "early": "late"}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo"}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot"}
COLOURS = {"snow": "white", "grass": "green", "the sky": "blue", "coal": "black", "blood": "red",
           "a banana": "yellow"}


def _fact(table: dict[str, str], phrasings: tuple[str, str]):
    """A family asking for ``table[key]`` with one of two phrasings of the question."""
    keys = list(table)

    def make(rng: np.random.Generator) -> tuple[str, str]:
        key = keys[rng.integers(len(keys))]
        return phrasings[rng.integers(2)].format(key=key), table[key]

    return make


def _word_rule(rule: Callable[[str], str], phrasings: tuple[str, str]):
    """A family applying ``rule`` to a word of the pretraining word list."""

    def make(rng: np.random.Generator) -> tuple[str, str]:
        word = _WORDS[rng.integers(len(_WORDS))]
        return phrasings[rng.integers(2)].format(word=word), rule(word)

    return make


UNSEEN_TASKS.register("opposite", _fact(OPPOSITES, ("What is the opposite of '{key}'?",
                                                    "Give the word opposite in meaning to '{key}'.")))
UNSEEN_TASKS.register("capital", _fact(CAPITALS, ("Name the capital city of {key}.",
                                                  "Which city is the capital of {key}?")))
UNSEEN_TASKS.register("sound", _fact(SOUNDS, ("What sound does a {key} make?", "Which noise does a {key} make?")))
UNSEEN_TASKS.register("colour", _fact(COLOURS, ("What colour is {key}?", "Name the colour of {key}.")))
UNSEEN_TASKS.register("bracket", _word_rule(lambda w: f"[{w}]", ("Put the word '{word}' in square brackets.",
                                                                  "Wrap '{word}' in square brackets.")))
UNSEEN_TASKS.register("twice", _word_rule(lambda w: f"{w} {w}", ("Say the word '{word}' twice.",
                                                                  "Repeat '{word}' two times.")))

if set(UNSEEN_TASKS.names()) & set(INSTRUCTION_TASKS.names()):  # a shared name would blur which the LM saw
    raise RuntimeError("unseen instruction families must not share a name with the pretraining families")


def make_unseen(n: int, *, seed: int, tasks: Sequence[str] | None = None, mix: Sequence[float] | None = None,
                offset: int = 0) -> list[Instruction]:
    """Instructions ``offset .. offset + n`` of the families ``tasks`` (default: all of :data:`UNSEEN_TASKS`).

    Args:
      n: number of instructions.
      seed: with the index, the only source of randomness: example ``i`` depends on ``(seed, i)`` only.
      tasks: family names of :data:`UNSEEN_TASKS`.
      mix: one non-negative weight per family (normalised): the family of example ``i`` is drawn
        with these probabilities. None: the families cycle (``tasks[i % len(tasks)]``).
      offset: index of the first example (disjoint offsets give disjoint draws).

    Raises:
      UnknownNameError: a family that is not registered here (e.g. a pretraining family).
      ValueError: ``mix`` of the wrong length, negative, or summing to zero.
    """
    names = list(tasks or UNSEEN_TASKS.names())
    makers = [UNSEEN_TASKS.get(name) for name in names]
    probabilities = None
    if mix is not None:
        weights = np.asarray(mix, np.float64)
        if weights.shape != (len(names),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mix needs {len(names)} non-negative weights (one per family {names}) with a "
                             f"positive sum, got {list(mix)}")
        probabilities = weights / weights.sum()
    out = []
    for i in range(offset, offset + n):
        rng = np.random.default_rng([seed, i, _UNSEEN_STREAM])
        family = i % len(names) if probabilities is None else int(rng.choice(len(names), p=probabilities))
        prompt, response = makers[family](rng)
        out.append(Instruction(names[family], prompt, response))
    return out
