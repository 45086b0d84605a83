"""A generated instruction-tuning set with exact answers, and its SFT encoding.

No dataset download is possible here, so metafit generates instructions whose
answers are unambiguous strings (exact match is a fair metric): arithmetic,
word reversal, upper-casing, counting letters, successor numbers, sorting
letters. Examples are a pure function of ``(seed, index)``.

:func:`encode_sft` applies the tokenizer's chat template, masks the loss to the
response tokens only, and pads every example to the smallest of a few bucket
lengths so a jitted step compiles once per bucket, not once per length.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Callable, Sequence

import numpy as np

from metafit.registry import Registry

INSTRUCTION_TASKS: Registry[Callable[[np.random.Generator], tuple[str, str]]] = Registry("instruction-task")
_WORDS = (
    "apple river stone cloud garden silver pencil window rocket forest candle mirror planet bridge "
    "yellow orange marble copper violin tiger dragon winter summer island castle "
    "thunder lantern harbor meadow crystal"
).split()


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction with its exact expected response."""

    task: str
    prompt: str
    response: str


@INSTRUCTION_TASKS.register("add")
def _add(rng):
    a, b = rng.integers(10, 100, size=2)
    return f"Add {a} and {b}. Reply with the number only.", str(a + b)


@INSTRUCTION_TASKS.register("reverse")
def _reverse(rng):
    word = _WORDS[rng.integers(len(_WORDS))]
    return f"Reverse the letters of the word '{word}'. Reply with the reversed word only.", word[::-1]


@INSTRUCTION_TASKS.register("upper")
def _upper(rng):
    word = _WORDS[rng.integers(len(_WORDS))]
    return f"Write '{word}' in capital letters. Reply with the word only.", word.upper()


@INSTRUCTION_TASKS.register("count")
def _count(rng):
    word = _WORDS[rng.integers(len(_WORDS))]
    return f"How many letters are in the word '{word}'? Reply with the number only.", str(len(word))


@INSTRUCTION_TASKS.register("successor")
def _successor(rng):
    n = int(rng.integers(100, 1000))
    return f"What number comes right after {n}? Reply with the number only.", str(n + 1)


@INSTRUCTION_TASKS.register("sort")
def _sort(rng):
    letters = rng.choice(list(string.ascii_lowercase), size=4, replace=False)
    return (f"Sort the letters {' '.join(letters)} alphabetically. Reply with the letters separated by spaces.",
            " ".join(sorted(letters)))


def make_instructions(n: int, *, seed: int, tasks: Sequence[str] | None = None, offset: int = 0) -> list[Instruction]:
    """``n`` instructions cycling over ``tasks``; example ``i`` depends only on ``(seed, offset + i)``."""
    names = list(tasks or INSTRUCTION_TASKS.names())
    makers = [INSTRUCTION_TASKS.get(name) for name in names]
    out = []
    for i in range(offset, offset + n):
        rng = np.random.default_rng([seed, i])
        task = names[i % len(names)]
        prompt, response = makers[i % len(names)](rng)
        out.append(Instruction(task, prompt, response))
    return out


def chat_prompt(tokenizer, prompt: str) -> str:
    """The chat-formatted user turn, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"User: {prompt}\nAssistant: "


def encode_sft(tokenizer, examples: Sequence[Instruction], buckets: Sequence[int] = (64, 128),
               pad_id: int | None = None) -> dict[str, np.ndarray]:
    """Tokenises chat-formatted examples for next-token SFT with the loss on response tokens only.

    Returns ``input_ids``, ``attention_mask`` and ``loss_mask`` (1 where the *target*
    token at position t+1 is part of the response, incl. the end-of-turn token),
    all ``[n, L]`` with ``L`` the smallest bucket that fits the longest example.

    Raises:
      ValueError: if an example is longer than the largest bucket.
    """
    eos = tokenizer.eos_token or ""
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    pad_id = 0 if pad_id is None else pad_id
    rows = []
    for ex in examples:
        prompt_ids = tokenizer(chat_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(ex.response + eos, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, response_ids))
    longest = max(len(p) + len(r) for p, r in rows)
    fitting = [b for b in sorted(buckets) if b >= longest]
    if not fitting:
        raise ValueError(f"an example has {longest} tokens, more than the largest bucket {max(buckets)}; "
                         "add a larger bucket or shorten the examples")
    length = fitting[0]
    ids = np.full((len(rows), length), pad_id, np.int32)
    attention = np.zeros((len(rows), length), np.int32)
    loss_mask = np.zeros((len(rows), length), np.float32)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = p + r
        attention[i, : len(p) + len(r)] = 1
        loss_mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0  # position t predicts token t+1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
