"""Batched answering of user prompts (template or not, steered or not, with or without the indicator).

:func:`answer` renders each prompt as one user turn, sorts the prompts by length, left-pads
them to a multiple of ``bucket`` tokens and runs :func:`metafit.models.generate` on batches of
exactly ``batch_size`` rows (short batches are filled with copies of their first row), so there
is one compilation per bucket length and the KV cache serves every step.
:func:`score` applies containment / token F1 / exact match; :func:`nih_heatmap` draws a
lengths x depths recall grid.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from metafit.data.context_tasks import ContextItem, NIHTest, contains, token_f1
from metafit.models import generate
from metafit.runs import atomic_write

from .conversation import encode_conversation, left_pad
from .dependency import with_indicator
from .steering import prompt_attention, retrieval_head


def answer(model, tokenizer, prompts: Sequence[str], *, template: bool = True, alpha: float = 1.0,
           indicator: str | None = None, max_new_tokens: int = 16, batch_size: int = 8,
           bucket: int = 64) -> list[str]:
    """Greedy answers to ``prompts`` (user messages), in the order given.

    Args:
      template: render with the chat template and the assistant header (else the raw prompt).
      alpha: attention steering towards the user tokens (1 = none; see :func:`steering_bias`).
      indicator: appended to every prompt (e.g. ``"[IND]"``) when given.
      max_new_tokens, batch_size, bucket: generation budget, rows per call, padding multiple.
    """
    if alpha != 1.0 and not 0.0 < alpha <= 1.0:
        raise ValueError(f"steering alpha must lie in (0, 1], got {alpha}")
    texts = [with_indicator(p, indicator) if indicator else p for p in prompts]
    encoded = [encode_conversation(tokenizer, [{"role": "user", "content": t}], template=template,
                                   generation_prompt=template) for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    answers: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = -(-max(len(encoded[i].ids) for i in chunk) // bucket) * bucket
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))
        ids, mask = left_pad([encoded[i].ids for i in rows], length, pad)
        user, _ = left_pad([encoded[i].user_mask for i in rows], length)
        steer = (user, alpha) if alpha < 1.0 else None
        out = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, steer=steer))
        decoded = tokenizer.batch_decode(out[:len(chunk), length:], skip_special_tokens=True)
        for i, text in zip(chunk, decoded):
            answers[i] = text.strip()
    return answers


def score(items: Sequence[ContextItem], answers: Sequence[str]) -> dict[str, float]:
    """Containment, token F1 and exact match (case-insensitive) of ``answers`` against the items."""
    hits = [contains(a, it.answer) for a, it in zip(answers, items)]
    return {
        "contains": float(np.mean(hits)),
        "f1": float(np.mean([token_f1(a, it.answer) for a, it in zip(answers, items)])),
        "exact": float(np.mean([a.strip().lower().rstrip(".") == it.answer.lower() for a, it in zip(answers, items)])),
    }


def evaluate_items(model, tokenizer, items: Sequence[ContextItem], **answer_kwargs) -> dict[str, float]:
    """:func:`score` of :func:`answer` on ``items``, with ``seconds`` and ``items_per_s``."""
    start = time.perf_counter()
    answers = answer(model, tokenizer, [it.prompt for it in items], **answer_kwargs)
    seconds = time.perf_counter() - start
    return {**score(items, answers), "seconds": seconds, "items_per_s": len(items) / seconds}


def nih_recall_grid(tests: Sequence[NIHTest], answers: Sequence[str]) -> tuple[np.ndarray, list[int], list[float]]:
    """Recall by containment as a ``[lengths, depths]`` array, with the sorted lengths and depths."""
    lengths = sorted({t.length for t in tests})
    depths = sorted({t.depth for t in tests})
    grid = np.full((len(lengths), len(depths)), np.nan)
    for test, text in zip(tests, answers):
        grid[lengths.index(test.length), depths.index(test.depth)] = float(contains(text, test.answer))
    return grid, lengths, depths


def nih_heatmap(path, grid: np.ndarray, lengths: Sequence[int], depths: Sequence[float], title: str) -> None:
    """Writes a PNG heatmap of recall (rows: depth, columns: context length), as in the paper's figures."""
    from metafit.runs import figure

    fig = figure((3.0 + 0.45 * len(lengths), 2.5 + 0.35 * len(depths)))
    ax = fig.subplots()
    image = ax.imshow(grid.T, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(l) for l in lengths], rotation=90)
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title}: recall {np.nanmean(grid):.2f}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_arm(model, tokenizer, tests: Sequence[NIHTest], sets: dict[str, Sequence[ContextItem]], path, *,
            template: bool = True, alpha: float = 1.0, context_indicator: str | None = None,
            **answer_kwargs) -> dict:
    """One evaluation arm: NIH recall grid and per-set scores, cached in the JSON file ``path``.

    ``context_indicator`` is appended to the context-dependent prompts (NIH and the ``"qa"`` set),
    never to the others. A finished arm's file is read back instead of recomputed (resume).

    Returns ``{"nih_recall", "grid" [lengths, depths], "nih_tests_per_s", "nih_answers", "<set>_<metric>"...}``.
    """
    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())
    kwargs = dict(template=template, alpha=alpha, **answer_kwargs)
    start = time.perf_counter()
    answers = answer(model, tokenizer, [t.prompt for t in tests], indicator=context_indicator, **kwargs)
    seconds = time.perf_counter() - start
    grid, _, _ = nih_recall_grid(tests, answers)
    out = {"nih_recall": float(np.nanmean(grid)), "grid": grid.tolist(), "nih_seconds": seconds,
           "nih_tests_per_s": len(tests) / seconds, "nih_answers": answers}
    for name, items in sets.items():
        indicator = context_indicator if name == "qa" else None
        scores = evaluate_items(model, tokenizer, items, indicator=indicator, **kwargs) if items else {}
        out.update({f"{name}_{k}": v for k, v in scores.items() if k != "seconds"})
    atomic_write(path, json.dumps(out, indent=1))
    return out


def run_diagnosis(model, tokenizer, probes: Sequence[str], path, *, batch_size: int = 8) -> dict:
    """User-token attention mass at the last position (with and without the template) and the retrieval head.

    Cached in the JSON file ``path`` like an arm: a resumed run reads it back instead of recomputing
    it (minutes on SmolLM2). Returns ``{"<template|no_template>_user_attention_mean",
    "..._user_attention_by_layer", "retrieval_layer", "retrieval_head"}``.
    """
    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())
    diagnosis = {}
    for name, template in (("template", True), ("no_template", False)):
        mass = prompt_attention(model, tokenizer, probes, template=template, batch_size=batch_size)
        diagnosis[f"{name}_user_attention_mean"] = float(mass.mean())
        diagnosis[f"{name}_user_attention_by_layer"] = [float(x) for x in mass.mean(1)]
    layer, head = retrieval_head(model, tokenizer, probes)
    diagnosis.update(retrieval_layer=layer, retrieval_head=head)
    atomic_write(path, json.dumps(diagnosis, indent=1))
    return diagnosis
