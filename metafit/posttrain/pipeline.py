"""The data pipeline of post-training: deduplicate, categorise, balance, three candidates, score, select.

Stages (each a function; :func:`run_pipeline` chains them and keeps each stage's output as a
file of the run folder, so a rerun reuses finished stages -- the teacher is slow on a CPU):

1. :func:`deduplicate` -- simhash fingerprints (64-bit, Charikar) of each instruction, compared
   by Hamming distance through the ``simhash`` package's ``SimhashIndex`` (``max_distance`` bits);
   the first of each near-duplicate group is kept. ``simhash`` lower-cases the text and drops
   non-word characters before hashing 4-character shingles, so spacing, case and punctuation
   variants hash alike.
2. :func:`categorise` -- zero-shot labels from the teacher: the category whose name has the
   highest log-likelihood after ``"<instruction>\\nTopic:"``,
   :math:`\\arg\\max_c \\log p_{teacher}(\\text{name}_c \\mid x)`.
3. :func:`drop_rare_and_balance` -- labels with fewer than ``min_label_count`` examples are
   dropped, then every label is down-sampled to the smallest remaining count.
4. :func:`candidates` -- three responses per instruction: the dataset's original, the teacher's
   and the student's greedy answers.
5. :func:`score_candidates` -- correctness against the checkable gold answer, the rule-based
   safety filter (:func:`metafit.posttrain.data.is_safe`), and teacher perplexity
   :math:`\\exp(-\\log p_{teacher}(y \\mid x) / |y|)`.
6. :func:`select` -- responses ranked by (correct, safe, -perplexity): best = desirable (SFT
   target, DPO chosen), worst = undesirable (DPO rejected) when it ranks strictly lower.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import nnx

from metafit.posttrain.data import CATEGORIES, Example, is_correct, is_safe, make_pool
from metafit.posttrain.reference import reference_logprobs
from metafit.train.lm_eval import greedy_answers

SOURCES = ("original", "teacher", "student")
DEFAULT_CATEGORY_NAMES = (("math", "math"), ("string", "spelling"), ("extraction", "city"),
                          ("classification", "sentiment"), ("unsafe", "crime"))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of the data pipeline.

    Attributes:
      n_pool: distinct collected instructions (before near-duplicates are added).
      noise: probability that an original response is wrong.
      duplicate_fraction: near-duplicates injected, as a share of ``n_pool``.
      max_distance: simhash Hamming distance (bits of 64) at or below which two instructions are duplicates.
      category_names: ``[[category, name the teacher scores], ...]``, one per category.
      min_label_count: teacher labels with fewer examples are dropped (rare labels).
      max_new_tokens: generation budget of the teacher's and student's candidates.
      bucket: token length prompts are padded to (one compilation).
      chunk: rows per teacher forward/generation call.
    """

    n_pool: int = 120
    noise: float = 0.3
    duplicate_fraction: float = 0.2
    max_distance: int = 3
    category_names: tuple[tuple[str, str], ...] = DEFAULT_CATEGORY_NAMES
    min_label_count: int = 8
    max_new_tokens: int = 12
    bucket: int = 48
    chunk: int = 32

    def __post_init__(self):
        if self.n_pool < 2:
            raise ValueError(f"n_pool must be >= 2 (deduplication needs data), got {self.n_pool}")
        if not 0 <= self.max_distance < 16:
            raise ValueError(f"max_distance must be in [0, 15] bits, got {self.max_distance}")
        unknown = [c for c, _ in self.category_names if c not in CATEGORIES.names()]
        if unknown or len({c for c, _ in self.category_names}) != len(self.category_names):
            raise ValueError(f"category_names must name each category once from {CATEGORIES.names()}; "
                             f"got {[c for c, _ in self.category_names]}")
        if self.min_label_count < 1 or self.max_new_tokens < 1 or self.bucket < 1 or self.chunk < 1:
            raise ValueError("min_label_count, max_new_tokens, bucket and chunk must be >= 1")


def deduplicate(examples: Sequence[Example], *, max_distance: int = 3) -> tuple[list[Example], dict[str, int]]:
    """Drops instructions whose simhash is within ``max_distance`` bits of an earlier kept one.

    Returns:
      ``(kept, {"input", "kept", "removed"})``.

    Raises:
      ValueError: on an empty dataset, or when fewer than two distinct instructions remain.
    """
    from simhash import Simhash, SimhashIndex  # optional extra: pip install simhash

    if not examples:
        raise ValueError("the dataset is empty: nothing to deduplicate (raise n_pool)")
    index = SimhashIndex([], k=max_distance)
    kept = []
    for i, example in enumerate(examples):
        fingerprint = Simhash(example.prompt)
        if not index.get_near_dups(fingerprint):
            index.add(str(i), fingerprint)
            kept.append(example)
    if len(kept) < 2:
        raise ValueError(f"all {len(examples)} instructions are near-duplicates of {len(kept)} one(s) "
                         f"(simhash distance <= {max_distance}); there is nothing to train on")
    return kept, {"input": len(examples), "kept": len(kept), "removed": len(examples) - len(kept)}


def encode_continuations(tokenizer, prefixes: Sequence[str], continuations: Sequence[str], length: int) -> dict:
    """Plain-text ``prefix + continuation`` rows (no chat template) with the loss mask on the continuation.

    The layout of :func:`metafit.data.instructions.encode_sft` (``input_ids``, ``attention_mask``,
    ``loss_mask``), padded to ``max(length, longest row rounded up to a multiple of 16)``.
    """
    rows = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"])
            for p, c in zip(prefixes, continuations)]
    width = max(length, -(-max(len(p) + len(c) for p, c in rows) // 16) * 16)  # multiples of 16: few compilations
    pad = tokenizer.pad_token_id or 0
    out = {"input_ids": np.full((len(rows), width), pad, np.int32), "attention_mask": np.zeros((len(rows), width), np.int32),
           "loss_mask": np.zeros((len(rows), width), np.float32)}
    for i, (p, c) in enumerate(rows):
        out["input_ids"][i, :len(p) + len(c)] = p + c
        out["attention_mask"][i, :len(p) + len(c)] = 1
        out["loss_mask"][i, len(p) - 1:len(p) + len(c) - 1] = 1.0
    return out


def continuation_logprobs(model, tokenizer, prefixes, continuations, *, length: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(log p(continuation | prefix) [n], continuation token counts [n])`` under ``model``."""
    arrays = encode_continuations(tokenizer, prefixes, continuations, length)
    graphdef, params = nnx.split(model)
    return reference_logprobs(graphdef, params, arrays, chunk=chunk), arrays["loss_mask"].sum(-1)


def categorise(model, tokenizer, prompts: Sequence[str], names: Mapping[str, str], *, length: int = 16,
               chunk: int = 32) -> tuple[list[str], np.ndarray]:
    """Zero-shot labels: for each prompt the category whose name the model finds most likely, calibrated.

    .. math::  \hat c(x) = \arg\max_c \; \log p(\text{name}_c \mid x) - \log p(\text{name}_c \mid \varnothing)

    The second term, the name's log-likelihood after a content-free prompt, removes the model's
    prior for short common names (uncalibrated, a small teacher labels nearly everything with
    the most frequent word; Zhao et al. 2021, "Calibrate before use").

    Returns:
      ``(labels, calibrated log-likelihoods [n, categories])`` with categories in the order of ``names``.
    """
    categories = list(names)
    prefixes = [f"{p.strip()}\nTopic:" for p in [*prompts, "N/A"] for _ in categories]
    continuations = [f" {names[c]}" for _ in range(len(prompts) + 1) for c in categories]
    logp, _ = continuation_logprobs(model, tokenizer, prefixes, continuations, length=length, chunk=chunk)
    scores = logp.reshape(len(prompts) + 1, len(categories))
    scores = scores[:-1] - scores[-1:]
    return [categories[i] for i in scores.argmax(1)], scores


def drop_rare_and_balance(examples: Sequence[Example], labels: Sequence[str], *, min_label_count: int,
                          seed: int) -> tuple[list[Example], list[str], dict[str, int]]:
    """Drops labels with fewer than ``min_label_count`` examples, then down-samples each label to the rarest kept one.

    Raises:
      ValueError: when no label has ``min_label_count`` examples (balancing would empty the data).
    """
    counts = {label: labels.count(label) for label in sorted(set(labels))}
    kept_labels = [label for label, count in counts.items() if count >= min_label_count]
    if not kept_labels:
        raise ValueError(f"no teacher label has min_label_count={min_label_count} examples (counts {counts}); "
                         "balancing would leave nothing: lower min_label_count or collect more data")
    size = min(counts[label] for label in kept_labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in kept_labels:
        rows = [i for i, l in enumerate(labels) if l == label]
        chosen += sorted(rng.choice(rows, size=size, replace=False).tolist())
    chosen.sort()
    return [examples[i] for i in chosen], [labels[i] for i in chosen], counts


def candidates(examples: Sequence[Example], teacher, teacher_tokenizer, student, student_tokenizer, *,
               max_new_tokens: int, bucket: int, chunk: int) -> list[dict[str, str]]:
    """``[{"original", "teacher", "student"}]``: the dataset's response and each model's greedy answer."""
    prompts = [ex.prompt for ex in examples]
    teacher_answers = greedy_answers(teacher, teacher_tokenizer, prompts, max_new_tokens, bucket, chunk)
    student_answers = greedy_answers(student, student_tokenizer, prompts, max_new_tokens, bucket, chunk)
    return [{"original": ex.original, "teacher": t, "student": s}
            for ex, t, s in zip(examples, teacher_answers, student_answers)]


def score_candidates(examples: Sequence[Example], responses: Sequence[Mapping[str, str]], teacher, teacher_tokenizer, *,
                     length: int, chunk: int) -> list[dict[str, dict[str, Any]]]:
    """Per example and source: ``correct``, ``safe`` and the teacher's ``perplexity`` of the response."""
    prefixes = [f"Question: {ex.prompt.strip()}\nAnswer:" for ex in examples for _ in SOURCES]
    texts = [f" {r[source]}" for r in responses for source in SOURCES]
    logp, tokens = continuation_logprobs(teacher, teacher_tokenizer, prefixes, texts, length=length, chunk=chunk)
    perplexity = np.exp(-logp / np.maximum(tokens, 1)).reshape(len(examples), len(SOURCES))
    return [{source: {"response": r[source], "correct": is_correct(ex, r[source]), "safe": is_safe(ex.prompt, r[source]),
                      "perplexity": float(perplexity[i, j])} for j, source in enumerate(SOURCES)}
            for i, (ex, r) in enumerate(zip(examples, responses))]


def rank_key(score: Mapping[str, Any]) -> tuple:
    """Higher is better: correct first, then safe, then lower teacher perplexity."""
    return (bool(score["correct"]), bool(score["safe"]), -float(score["perplexity"]))


def select(scored: Mapping[str, Mapping[str, Any]]) -> tuple[str, str | None]:
    """``(best source, worst source or None)``; the worst only when it ranks strictly below the best on
    correctness or safety and its response differs (else there is no undesirable example)."""
    ordered = sorted(SOURCES, key=lambda s: rank_key(scored[s]), reverse=True)
    best, worst = ordered[0], ordered[-1]
    strictly_worse = rank_key(scored[worst])[:2] < rank_key(scored[best])[:2]
    differs = scored[worst]["response"] != scored[best]["response"]
    return best, worst if strictly_worse and differs else None


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON at ``path``, or ``compute()`` written there first (a rerun skips finished stages).

    The files belong to the run folder's config (``metafit run`` refuses a folder of another config);
    after a code change that alters the pool, start a new folder (``--force-new``).
    """
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
    return value


def run_pipeline(config: PipelineConfig, folder: str | Path, *, seed: int, load_teacher: Callable[[], tuple],
                 load_student: Callable[[], tuple]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every stage, each kept as a JSON file in ``folder``; returns ``(records, summary)``.

    A record is ``{"category", "label", "prompt", "answer", "scores": {source: ...}, "best", "worst"}``
    (``label`` = the teacher's category, ``category`` = the true one). Models are loaded lazily:
    a rerun whose stages are all on disk loads none.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pool = make_pool(config.n_pool, seed=seed, categories=[c for c, _ in config.category_names], noise=config.noise,
                     duplicate_fraction=config.duplicate_fraction)
    kept, dedup_stats = deduplicate(pool, max_distance=config.max_distance)
    injected = len(pool) - config.n_pool
    models: dict[str, tuple] = {}
    model = lambda role: models.setdefault(role, (load_teacher if role == "teacher" else load_student)())

    def labels():
        teacher, tokenizer = model("teacher")
        found, scores = categorise(teacher, tokenizer, [ex.prompt for ex in kept], dict(config.category_names),
                                   length=config.bucket, chunk=config.chunk)
        return {"labels": found, "loglik": scores.tolist()}

    teacher_labels = _cached(folder / "categories.json", labels)["labels"]
    balanced, balanced_labels, label_counts = drop_rare_and_balance(kept, teacher_labels,
                                                                    min_label_count=config.min_label_count, seed=seed)

    def responses():
        return candidates(balanced, *model("teacher"), *model("student"), max_new_tokens=config.max_new_tokens,
                          bucket=config.bucket, chunk=config.chunk)

    answers = _cached(folder / "candidates.json", responses)
    scored = _cached(folder / "scores.json", lambda: score_candidates(balanced, answers, *model("teacher"),
                                                                      length=config.bucket + config.max_new_tokens,
                                                                      chunk=config.chunk))
    records = []
    for ex, label, score in zip(balanced, balanced_labels, scored):
        best, worst = select(score)
        records.append({"category": ex.category, "label": label, "prompt": ex.prompt, "answer": ex.answer,
                        "scores": score, "best": best, "worst": worst})
    summary = pipeline_summary(records, dedup_stats, injected, kept, teacher_labels, label_counts)
    return records, summary


def pipeline_summary(records, dedup_stats, injected, kept, teacher_labels, label_counts) -> dict[str, Any]:
    """What each stage did: counts, teacher-label accuracy, candidate quality by source, selection."""
    summary: dict[str, Any] = {f"dedup_{k}": v for k, v in dedup_stats.items()}
    summary["injected_near_duplicates"] = injected
    summary["teacher_label_accuracy"] = float(np.mean([l == ex.category for l, ex in zip(teacher_labels, kept)]))
    summary.update({f"label_count_{k}": v for k, v in label_counts.items()})
    summary["balanced"] = len(records)
    for source in SOURCES:
        summary[f"{source}_correct"] = float(np.mean([r["scores"][source]["correct"] for r in records]))
        summary[f"{source}_safe"] = float(np.mean([r["scores"][source]["safe"] for r in records]))
        summary[f"{source}_best"] = float(np.mean([r["best"] == source for r in records]))
    summary["best_correct"] = float(np.mean([r["scores"][r["best"]]["correct"] for r in records]))
    summary["with_undesirable"] = int(sum(r["worst"] is not None for r in records))
    return summary
