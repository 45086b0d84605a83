"""A suite of eleven instruction tasks of very different sizes, for multi-task fine-tuning and serving.

Every task has an exact answer (so greedy exact match is its validation metric) and is a pure
function of ``(seed, index)``; one of them is real data (Rotten Tomatoes review snippets), the
others are generated (the word tasks ask about pairs of the 30 words of\n:mod:`metafit.data.instructions`, which metafit's small LM was pretrained on; pairs, so that\nthere are enough unseen prompts). Three are high-resource, eight low-resource, and one (``pick_flipped``)
conflicts with another: it asks the same questions as ``pick`` and expects the other
answer, so no single model can serve both (negative transfer by construction).

==============  =====  =======================================================================
task            size   prompt -> answer
==============  =====  =======================================================================
sentiment       1600   a review snippet + "Fresh or rotten?" -> ``fresh`` / ``rotten`` (Rotten Tomatoes)
pick            1200   "Choose one: 'river' or 'stone'." -> ``river`` (the first)
swap            1000   "Swap the words 'river' and 'stone'." -> ``stone river``
first_letters    160   "What are the first letters of 'river' and 'stone'?" -> ``r s``
last_letters     120   "What are the last letters of 'river' and 'stone'?" -> ``r e``
append_s         100   "Add the letter s to the end of 'river' and 'stone'." -> ``rivers stones``
repeat            80   "Write 'river stone' twice." -> ``river stone river stone``
parity            80   "Is 417 odd or even?" -> ``odd``
double            60   "Double 34." -> ``68``
pick_flipped      60   the prompts of ``pick`` -> the *second* word (the conflict)
compare           40   "Which is larger, 417 or 392?" -> ``417``
==============  =====  =======================================================================

:func:`task_suite` returns each task's training and held-out examples
(:class:`~metafit.data.instructions.Instruction`, encoded by
:func:`~metafit.data.instructions.encode_sft`). Held-out prompts never occur in the task's
training set.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import numpy as np

from metafit.data.instructions import _WORDS, Instruction
from metafit.registry import Registry

SUITE_TASKS: Registry[Callable[[np.random.Generator], tuple[str, str]]] = Registry("suite-task")

# Default training-set sizes: 3 high-resource tasks, 8 low-resource ones (a 40x spread).
DEFAULT_SIZES: Mapping[str, int] = {
    "sentiment": 1600, "pick": 1200, "swap": 1000,
    "first_letters": 160, "last_letters": 120, "append_s": 100, "repeat": 80, "parity": 80,
    "double": 60, "pick_flipped": 60, "compare": 40,
}
REVIEW_CHARS = 40  # review snippets are cut (at a word boundary) to this many characters: every prompt fits 48 tokens
_HELD_OUT_OFFSET = 1_000_000  # held-out examples draw indices far from the training ones


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task's training and held-out examples."""

    name: str
    train: tuple[Instruction, ...]
    held_out: tuple[Instruction, ...]


@functools.lru_cache(maxsize=1)
def _reviews() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from metafit.data.text import load_text_dataset

    data = load_text_dataset("rotten_tomatoes")
    texts = tuple(t if len(t) <= REVIEW_CHARS else t[:REVIEW_CHARS].rsplit(" ", 1)[0] for t in data.texts)
    return texts, tuple(data.class_names[int(y)] for y in data.labels)


@SUITE_TASKS.register("sentiment")
def _sentiment(rng):
    texts, labels = _reviews()
    i = int(rng.integers(len(texts)))
    return f"Review: {texts[i]}\nFresh or rotten?", labels[i]


@SUITE_TASKS.register("compare")
def _compare(rng):
    a, b = rng.choice(np.arange(100, 1000), size=2, replace=False)
    return f"Which is larger, {a} or {b}? Reply with the number only.", str(max(a, b))


@SUITE_TASKS.register("parity")
def _parity(rng):
    n = int(rng.integers(100, 1000))
    return f"Is {n} odd or even? Reply with one word.", "even" if n % 2 == 0 else "odd"


def _pick_question(rng) -> tuple[str, str, str]:
    first, second = _pair(rng)
    return f"Choose one: '{first}' or '{second}'. Reply with the word only.", first, second


@SUITE_TASKS.register("pick")
def _pick(rng):
    prompt, first, _ = _pick_question(rng)
    return prompt, first


@SUITE_TASKS.register("pick_flipped")
def _pick_flipped(rng):
    prompt, _, second = _pick_question(rng)
    return prompt, second


def _pair(rng) -> tuple[str, str]:
    """Two different words of the instruction vocabulary (the words metafit's small LM was pretrained on)."""
    first, second = rng.choice(len(_WORDS), size=2, replace=False)
    return _WORDS[first], _WORDS[second]


def _register_pair_task(name: str, question: str, answer: Callable[[str, str], str]) -> None:
    """Registers a task asking ``question`` (with ``{a}``, ``{b}``) about a word pair, answered by ``answer(a, b)``."""

    def make(rng):
        a, b = _pair(rng)
        return question.format(a=a, b=b), answer(a, b)

    SUITE_TASKS.register(name)(make)


for _name, _question, _answer in (
    ("swap", "Swap the words '{a}' and '{b}'. Reply with the words only.", lambda a, b: f"{b} {a}"),
    ("first_letters", "What are the first letters of '{a}' and '{b}'? Reply with the letters only.",
     lambda a, b: f"{a[0]} {b[0]}"),
    ("last_letters", "What are the last letters of '{a}' and '{b}'? Reply with the letters only.",
     lambda a, b: f"{a[-1]} {b[-1]}"),
    ("append_s", "Add the letter s to the end of '{a}' and '{b}'. Reply with the words only.",
     lambda a, b: f"{a}s {b}s"),
    ("repeat", "Write '{a} {b}' twice. Reply with the words only.", lambda a, b: f"{a} {b} {a} {b}"),
):
    _register_pair_task(_name, _question, _answer)


@SUITE_TASKS.register("double")
def _double(rng):
    n = int(rng.integers(10, 250))
    return f"Double {n}. Reply with the number only.", str(2 * n)


def task_examples(task: str, n: int, *, seed: int, offset: int = 0) -> list[Instruction]:
    """``n`` examples of ``task``; example ``i`` depends only on ``(seed, task, offset + i)``."""
    make = SUITE_TASKS.get(task)
    salt = sum(map(ord, task))  # tasks sharing a question (pick, pick_flipped) still draw different rows
    return [Instruction(task, *make(np.random.default_rng([seed, salt, i]))) for i in range(offset, offset + n)]


def task_suite(sizes: Mapping[str, int] | None = None, *, n_held_out: int, seed: int) -> dict[str, TaskData]:
    """Training and held-out examples of each task (``sizes``: task -> training examples).

    Held-out examples whose prompt is in the task's training set are skipped, so the metric
    measures answers to unseen prompts; ``n_held_out`` is the same for every task so one
    compiled evaluation serves them all.

    Raises:
      ValueError: an unknown task, a size below 1, or a task that cannot produce ``n_held_out``
        unseen prompts (its prompt space is too small for the training size).
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    for task, n in sizes.items():
        SUITE_TASKS.get(task)  # unknown names raise with the valid ones
        if n < 1:
            raise ValueError(f"task '{task}' needs at least 1 training example, got {n}")
    return {task: _task_data(task, n, n_held_out, seed) for task, n in sizes.items()}


def _task_data(task: str, n: int, n_held_out: int, seed: int) -> TaskData:
    train = task_examples(task, n, seed=seed)
    seen = {ex.prompt for ex in train}
    held_out: list[Instruction] = []
    candidates = task_examples(task, 20 * n_held_out, seed=seed, offset=_HELD_OUT_OFFSET)
    for ex in candidates:
        if ex.prompt not in seen:
            held_out.append(ex)
            seen.add(ex.prompt)
        if len(held_out) == n_held_out:
            return TaskData(task, tuple(train), tuple(held_out))
    raise ValueError(f"task '{task}' has only {len(held_out)} unseen prompts beside {n} training examples, "
                     f"fewer than n_held_out={n_held_out}; lower its size or n_held_out")


def suite_task_names() -> Sequence[str]:
    """The registered task names, in registration order."""
    return SUITE_TASKS.names()
