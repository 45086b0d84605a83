"""Character-level copy / map / add / target tasks: two skills and their composition.

Every example is an 11-character string over the 17-symbol alphabet :data:`CHARS`; the answer
follows ``=`` and ends with ``.``:

====  ==========================  =============================================
kind  example                     skill
====  ==========================  =============================================
C     ``C3917=3917.``             copy four digits
M     ``M3917=7351.``             map: each digit d -> (d + 4) mod 10 (:func:`digit_map`)
A     ``A23+45=068.``             add two 2-digit numbers (3 answer digits)
T     ``T23+45=402.``             target: the map of the sum (needs both skills)
====  ==========================  =============================================

Batches use the layout of :func:`metafit.data.instructions.encode_sft` so one next-token loss
(:func:`metafit.train.losses.next_token_loss`) serves both: ``{"input_ids": [n, 11],
"loss_mask": [n, 11]}`` where ``loss_mask[:, t]`` marks whether predicting token ``t + 1``
counts (the answer characters only; the last column is 0). Examples are a pure function of
``(kind, n, seed)``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

CHARS = "0123456789+=.CAMT"
TOKEN = {c: i for i, c in enumerate(CHARS)}
SEQ_LEN = 11  # every task string has 11 characters
ANSWER_FROM = {"C": 6, "M": 6, "A": 7, "T": 7}  # index of the first answer character


def digit_map(digits: np.ndarray) -> np.ndarray:
    """The "map" skill: each digit d -> (d + 4) mod 10."""
    return (digits + 4) % 10


def char_tasks(kind: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` examples of task ``kind`` (one of ``CMAT``): ``{"input_ids": int32 [n, 11], "loss_mask": float32 [n, 11]}``."""
    if kind not in ANSWER_FROM:
        raise ValueError(f"unknown char task kind {kind!r}; one of {', '.join(ANSWER_FROM)}")
    rng = np.random.default_rng(seed)
    if kind in "CM":
        d = rng.integers(0, 10, (n, 4))
        answer = d if kind == "C" else digit_map(d)
        text = [f"{kind}{''.join(map(str, a))}={''.join(map(str, b))}." for a, b in zip(d, answer)]
    else:
        a, b = rng.integers(0, 100, n), rng.integers(0, 100, n)
        total = np.stack([(a + b) // 100, (a + b) // 10 % 10, (a + b) % 10], axis=1)
        answer = total if kind == "A" else digit_map(total)
        text = [f"{kind}{x:02d}+{y:02d}={''.join(map(str, s))}." for x, y, s in zip(a, b, answer)]
    tokens = np.array([[TOKEN[c] for c in t] for t in text], np.int32).reshape(n, SEQ_LEN)
    mask = np.zeros((n, SEQ_LEN), np.float32)
    mask[:, ANSWER_FROM[kind] - 1:SEQ_LEN - 1] = 1.0  # position t predicts token t + 1
    return {"input_ids": tokens, "loss_mask": mask}


def char_stream(kinds: str, batch_size: int, seed: int) -> Callable[[int], dict[str, np.ndarray]]:
    """``batch_at(step)``: a fresh batch mixing the task kinds equally (a pure function of the step).

    Each kind contributes ``batch_size // len(kinds)`` examples, in the order of ``kinds``
    (a kind may repeat to weight it: ``"CCAM"`` is half copy).
    """
    def batch_at(step: int):
        parts = [char_tasks(k, batch_size // len(kinds), seed * 100_003 + step * 7 + i) for i, k in enumerate(kinds)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return batch_at
