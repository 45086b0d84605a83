"""Fine-tuning tasks of the meta-dataset and their declared meta-features.

A task is a list of training and held-out :class:`~metafit.data.instructions.Instruction` rows
(prompt -> exact response) for SFT with the loss on response tokens. The suite mixes
instruction families (:data:`metafit.data.instructions.INSTRUCTION_TASKS`, one family per task)
and text classification from the offline corpora of :mod:`metafit.data.text` (the response is
the class name; texts are cut to their first words so sequences stay short).

Meta-features (what the surrogates know about a task, computed from its data and the base model):

================== ==========================================================================
``log_n_train``    ``log(number of training rows)``
``prompt_tokens``  mean prompt length in tokens (chat template included)
``response_tokens`` mean response length in tokens (end-of-turn token included)
``response_entropy`` Shannon entropy (nats) of the empirical distribution of response strings
``token_entropy``  Shannon entropy (nats) of the response tokens' unigram distribution
``zero_shot_loss`` the base model's response-token cross-entropy on the held-out rows
================== ==========================================================================
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Sequence

import numpy as np

from metafit.data.instructions import Instruction, chat_prompt, make_instructions

META_FEATURES = ("log_n_train", "prompt_tokens", "response_tokens", "response_entropy", "token_entropy",
                 "zero_shot_loss")
TEXT_WORDS = 8  # words of a text kept in a classification prompt (short sequences keep runs cheap)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning task: ``source`` is ``instructions:<family>[+<family>...]`` or ``text:<dataset>``."""

    name: str
    source: str
    n_train: int = 256
    n_eval: int = 32


SUITE: tuple[TaskSpec, ...] = (
    TaskSpec("add", "instructions:add", 256),
    TaskSpec("reverse", "instructions:reverse", 192),
    TaskSpec("upper", "instructions:upper", 128),
    TaskSpec("count", "instructions:count", 256),
    TaskSpec("successor", "instructions:successor", 128),
    TaskSpec("sort", "instructions:sort", 192),
    TaskSpec("sentiment", "text:rotten_tomatoes", 256),
    TaskSpec("topic", "text:bbc_news", 192),
)


def suite_task(name: str) -> TaskSpec:
    names = [t.name for t in SUITE]
    if name not in names:
        raise ValueError(f"unknown task {name!r}; the suite holds {names}")
    return SUITE[names.index(name)]


def task_rows(spec: TaskSpec, seed: int = 0) -> tuple[list[Instruction], list[Instruction]]:
    """``(train, eval)`` rows of a task; a pure function of ``(spec, seed)``."""
    kind, _, what = spec.source.partition(":")
    if kind == "instructions":
        families = what.split("+")
        train = make_instructions(spec.n_train, seed=seed, tasks=families)
        return train, make_instructions(spec.n_eval, seed=seed, tasks=families, offset=spec.n_train)
    if kind == "text":
        rows = _classification_rows(what, spec.n_train + spec.n_eval, seed)
        return rows[: spec.n_train], rows[spec.n_train:]
    raise ValueError(f"task {spec.name}: source {spec.source!r} must be instructions:<family> or text:<dataset>")


def _classification_rows(dataset: str, n: int, seed: int) -> list[Instruction]:
    from metafit.data.text import keyword_corpus, load_text_dataset

    data = keyword_corpus(max(n, 600), seed=seed) if dataset == "keywords" else load_text_dataset(dataset)
    names = data.class_names
    order = np.random.default_rng(seed).permutation(len(data.texts))[:n]
    rows = []
    for i in order:
        words = " ".join(data.texts[i].split()[:TEXT_WORDS])
        prompt = f"Which of {', '.join(names)} fits: {words}? Reply with the class only."
        rows.append(Instruction(dataset, prompt, str(names[int(data.labels[i])])))
    return rows


def entropy(values: Sequence) -> float:
    """Shannon entropy (nats) of the empirical distribution of ``values``: ``-sum_v p_v log p_v``."""
    counts = np.asarray(list(Counter(values).values()), np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def text_meta_features(tokenizer, train: Sequence[Instruction]) -> dict[str, float]:
    """The meta-features a task's training rows give without a model (all but ``zero_shot_loss``).

    Raises:
      ValueError: no rows, or a row with an empty response (no response token to learn or score).
    """
    if not train:
        raise ValueError("a task with no training rows has no meta-features; give it data")
    empty = [r.prompt for r in train if not r.response.strip()]
    if empty:
        raise ValueError(f"{len(empty)} rows have an empty response (first prompt: {empty[0][:60]!r}); "
                         "the response-token meta-features and losses need a response")
    prompt_ids = [tokenizer(chat_prompt(tokenizer, r.prompt), add_special_tokens=False)["input_ids"] for r in train]
    eos = tokenizer.eos_token or ""
    response_ids = [tokenizer(r.response + eos, add_special_tokens=False)["input_ids"] for r in train]
    return {"log_n_train": float(np.log(len(train))),
            "prompt_tokens": float(np.mean([len(p) for p in prompt_ids])),
            "response_tokens": float(np.mean([len(r) for r in response_ids])),
            "response_entropy": entropy([r.response for r in train]),
            "token_entropy": entropy([t for ids in response_ids for t in ids])}


def check_meta_features(features: dict[str, float], where: str = "task") -> np.ndarray:
    """The meta-feature vector in :data:`META_FEATURES` order; a missing or non-finite one is an error."""
    missing = [f for f in META_FEATURES if f not in features]
    if missing:
        raise ValueError(f"{where} has no meta-features {missing}; the surrogates need all of {list(META_FEATURES)}")
    values = np.asarray([features[f] for f in META_FEATURES], np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{where}: non-finite meta-features {features}")
    return values
