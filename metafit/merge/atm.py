"""ATM: alternating tuning and merging (Zhou et al. 2024, arXiv 2411.03055).

With one epoch of full-batch gradient descent at rate η from θ, task ``t``'s task vector is
``τ_t = −η ∇L_t(θ)``, so ``Σ_t τ_t = −η ∇ Σ_t L_t(θ)``: summing task vectors is one step of
multi-task gradient descent, with the merge coefficient playing the learning rate. ATM
iterates that step::

    θ⁰ = θ_pretrained
    for k = 1..K:
        θ_t = finetune_t(θ^{k−1})              for every task t, independently (E epochs)
        θ^k = aggregate(θ^{k−1}, [θ_1..θ_T])   (default: θ^{k−1} + mean_t (θ_t − θ^{k−1}))

Variants (chosen by what ``finetune_t`` trains on and where θ⁰ starts):
  * PA-ATM (pre-aggregation): θ⁰ is the pre-trained model and every round trains on the
    tasks' training splits;
  * PH-ATM (post-hoc): θ⁰ is an existing merge (e.g. task arithmetic of one-shot fine-tunes)
    and every round trains on the tasks' validation splits.
Budget matching: a one-shot baseline fine-tunes each task for K epochs, then merges once
(:func:`one_shot`); ATM with K rounds of one epoch uses the same number of gradient steps.

Fine-tuning goes through :func:`metafit.train.fit` (see :func:`fit_finetune`); aggregation
is any merge preset, e.g. ``lambda base, fts: ties(base, fts, 0.2, 1.0)``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from metafit.merge.methods import merge, task_arithmetic
from metafit.train.checkpoint import Checkpointer

PyTree = Any
Finetune = Callable[[PyTree, int, int, jax.Array], PyTree]  # (params, task, round, key) -> params
Aggregate = Callable[[PyTree, Sequence[PyTree]], PyTree]  # (base, finetuned) -> merged


class ATMResult(NamedTuple):
    """``params``: the final merge; ``rounds``: the merge after each round (θ¹..θᴷ)."""

    params: PyTree
    rounds: list[PyTree]


def mean_aggregate(base: PyTree, finetuned: Sequence[PyTree]) -> PyTree:
    """ATM's default aggregation ``θ + mean_t τ_t`` (task arithmetic with scale 1/T)."""
    return task_arithmetic(base, finetuned, 1.0 / len(finetuned))


def preset_aggregate(method: str, key: jax.Array | None = None, **params: Any) -> Aggregate:
    """An aggregation from a merge preset name and its parameters (e.g. ``('ties', density=0.2)``)."""
    return lambda base, finetuned: merge(method, base, finetuned, key=key, **params)


def atm(params: PyTree, finetune: Finetune, num_tasks: int, rounds: int, *, key: jax.Array,
        aggregate: Aggregate = mean_aggregate,
        on_round: Callable[[int, PyTree], None] | None = None,
        checkpoint_dir: str | Path | None = None) -> ATMResult:
    """Runs ``rounds`` rounds of alternating per-task fine-tuning and merging.

    Args:
      params: the starting point θ⁰ (pre-trained model for PA-ATM, a merge for PH-ATM).
      finetune: ``(params, task, round, key) -> params`` fine-tunes one task from ``params``.
      num_tasks: T.
      rounds: K.
      key: PRNG key; task ``t`` in round ``k`` uses ``fold_in(fold_in(key, k), t)``.
      aggregate: ``(θ^{k−1}, [θ_t]) -> θ^k``.
      on_round: callback ``(k, θ^k)`` after each round (evaluation, logging); it is called for
        rounds restored from ``checkpoint_dir`` too, so callers see every round once.
      checkpoint_dir: if given, θ^k is saved there (Orbax, one folder per round) after each round
        and a rerun restores the finished rounds and continues after the last one. Every round is
        a pure function of (θ^{k−1}, key, k), so a resumed run ends where an uninterrupted one does.
    Returns:
      :class:`ATMResult`.
    Raises:
      ValueError: ``checkpoint_dir`` holds more rounds than ``rounds`` (a different run).
    """
    checkpointer = Checkpointer(checkpoint_dir, keep=max(rounds, 1)) if checkpoint_dir is not None else None
    history = _restore_rounds(checkpointer, params, rounds) if checkpointer is not None else []
    try:
        for k, restored in enumerate(history, start=1):
            if on_round is not None:
                on_round(k, restored)
        if history:
            params = history[-1]
        for k in range(len(history) + 1, rounds + 1):
            round_key = jax.random.fold_in(key, k)
            finetuned = [finetune(params, t, k, jax.random.fold_in(round_key, t)) for t in range(num_tasks)]
            params = aggregate(params, finetuned)
            history.append(params)
            if checkpointer is not None:
                checkpointer.save(k, params)
            if on_round is not None:
                on_round(k, params)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return ATMResult(params, history)


def _restore_rounds(checkpointer: Checkpointer, like: PyTree, rounds: int) -> list[PyTree]:
    """θ¹..θᵏ from the checkpoints of an interrupted run (k = the newest readable round)."""
    latest = checkpointer.restore_latest(like)
    if latest is None:
        return []
    k, newest = latest
    if k > rounds:
        raise ValueError(f"{checkpointer.directory} holds ATM round {k} but this run has {rounds} rounds: "
                         "it belongs to a different run; use another directory or delete it")
    saved = set(checkpointer.steps())
    missing = [j for j in range(1, k) if j not in saved]
    if missing:
        raise ValueError(f"{checkpointer.directory} lacks ATM rounds {missing} before round {k}; "
                         "delete the folder to start the rounds over")
    return [checkpointer.restore(j, like) for j in range(1, k)] + [newest]


def one_shot(params: PyTree, finetune: Finetune, num_tasks: int, *, key: jax.Array) -> list[PyTree]:
    """Budget-matched baseline's fine-tunes: each task once from ``params`` (the caller picks the epochs)."""
    return [finetune(params, t, 0, jax.random.fold_in(key, t)) for t in range(num_tasks)]


def tune_scale(make_merge: Callable[[float], PyTree], scales: Sequence[float],
               score: Callable[[PyTree], float]) -> tuple[float, PyTree, list[float]]:
    """Picks the merge coefficient with the best validation score.

    Args:
      make_merge: ``scale -> merged params``.
      scales: candidate coefficients.
      score: ``params -> float`` on validation data (higher is better).
    Returns:
      (best scale, its merge, all scores).
    """
    scores, best = [], None
    for scale in scales:
        merged = make_merge(scale)
        value = float(score(merged))
        scores.append(value)
        if best is None or value > best[0]:
            best = (value, scale, merged)
    return best[1], best[2], scores


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    """How one task is fine-tuned through the trainer: its loss and data stream."""

    loss_fn: Callable[..., Any]
    data: Callable[[int], Any]
    steps: int


def fit_finetune(specs: Sequence[FinetuneSpec], config, *, trainable: PyTree | None = None) -> Finetune:
    """A :data:`Finetune` that runs :func:`metafit.train.fit` on task ``t``'s loss and data.

    Args:
      specs: one :class:`FinetuneSpec` per task (``steps`` overrides ``config.steps``).
      config: a :class:`metafit.train.TrainConfig` (optimiser, lr, batch size, clipping).
      trainable: optional trainable mask (e.g. freeze the heads).
    """
    from metafit.train import fit

    def finetune(params, task, round_index, key):
        spec = specs[task]
        run_config = dataclasses.replace(config, steps=spec.steps, log_every=spec.steps, eval_every=0, ckpt_every=0)
        result = fit(spec.loss_fn, params, spec.data, run_config, key=key, trainable=trainable,
                     progress=False, name=f"task{task}_round{round_index}")
        return result.params

    return finetune


def full_batch(arrays: Any) -> Callable[[int], Any]:
    """A data stream that returns the same full batch at every step."""
    arrays = jax.tree.map(np.asarray, arrays)
    return lambda step: arrays
