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

Fine-tuning goes through :func:`metafit.train.fit` (see :func:`fit_finetune`;
:func:`one_shot_snapshots` keeps a copy every epoch through a trainer callback, so one run per
task serves every budget of the one-shot baselines); aggregation is any merge preset, e.g.
``lambda base, fts: ties(base, fts, 0.2, 1.0)``. What happens after a round (scoring the merge)
is a trainer :class:`~metafit.train.Callback`, its state checkpointed with the round.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from metafit.merge.methods import merge, task_arithmetic
from metafit.train import Callback, FitResult, StepInfo, TrainConfig, fit, param_snapshots, unstack
from metafit.train.callbacks import call_due, check_callbacks, logged_records
from metafit.train.checkpoint import Checkpointer
from metafit.train.metrics import MetricsWriter

PyTree = Any
Finetune = Callable[[PyTree, int, int, jax.Array], PyTree]  # (params, task, round, key) -> params
Aggregate = Callable[[PyTree, Sequence[PyTree]], PyTree]  # (base, finetuned) -> merged


class ATMResult(NamedTuple):
    """What :func:`atm` returns.

    Attributes:
      params: the final merge θᴷ.
      rounds: the merge after each round (θ¹..θᴷ).
      callback_states: each callback's final state, by name.
      callback_records: each callback's metrics, one dict per call (with ``step`` = the round), by name.
    """

    params: PyTree
    rounds: list[PyTree]
    callback_states: dict[str, Any]
    callback_records: dict[str, list[dict[str, float]]]


def mean_aggregate(base: PyTree, finetuned: Sequence[PyTree]) -> PyTree:
    """ATM's default aggregation ``θ + mean_t τ_t`` (task arithmetic with scale 1/T)."""
    return task_arithmetic(base, finetuned, 1.0 / len(finetuned))


def preset_aggregate(method: str, key: jax.Array | None = None, **params: Any) -> Aggregate:
    """An aggregation from a merge preset name and its parameters (e.g. ``('ties', density=0.2)``)."""
    return lambda base, finetuned: merge(method, base, finetuned, key=key, **params)


def atm(params: PyTree, finetune: Finetune, num_tasks: int, rounds: int, *, key: jax.Array,
        aggregate: Aggregate = mean_aggregate,
        aggregate_takes_key: bool = False,
        callbacks: Sequence[Callback] = (),
        checkpoint_dir: str | Path | None = None,
        log: MetricsWriter | None = None,
        name: str = "atm") -> ATMResult:
    """Runs ``rounds`` rounds of alternating per-task fine-tuning and merging.

    Args:
      params: the starting point θ⁰ (pre-trained model for PA-ATM, a merge for PH-ATM).
      finetune: ``(params, task, round, key) -> params`` fine-tunes one task from ``params``.
      num_tasks: T.
      rounds: K.
      key: PRNG key; task ``t`` in round ``k`` uses ``fold_in(fold_in(key, k), t)``.
      aggregate: ``(θ^{k−1}, [θ_t]) -> θ^k``.
      aggregate_takes_key: call ``aggregate(θ^{k−1}, [θ_t], key_k)`` with a fresh key each round
        (``fold_in(fold_in(key, k), T)``), for random aggregations such as DARE: a fixed key would
        drop the same entries in every round, so most weights would never move.
      callbacks: trainer callbacks (:class:`metafit.train.Callback`) run after the rounds they are
        due at (``every`` counts rounds), e.g. scoring each merge. They see a
        :class:`~metafit.train.StepInfo` with ``step`` = k, ``params`` = θ^k, no optimiser state and
        ``stage`` = ``name``; their states are checkpointed with θ^k.
      checkpoint_dir: if given, θ^k (and the callback states, when any callback keeps state) is
        saved there (Orbax, one folder per round) after each round, and a rerun restores the
        finished rounds and continues after the last one, without calling the callbacks of finished
        rounds again: their records are read back from ``log`` (pass it when callbacks report metrics). Every round is a pure function of (θ^{k−1}, key, k), so a resumed run
        ends where an uninterrupted one does.
      log: metrics writer; callback metrics are written with ``stage`` = ``name`` and ``split`` =
        the callback's name.
      name: the stage name of the callbacks' records.
    Returns:
      :class:`ATMResult`.
    Raises:
      ValueError: ``checkpoint_dir`` holds more rounds than ``rounds`` (a different run).
      CheckpointMismatchError: ``checkpoint_dir`` holds rounds of another structure.
    """
    callbacks = tuple(callbacks)
    check_callbacks(callbacks)
    states = {c.name: c.init for c in callbacks}
    records = {c.name: [] for c in callbacks}
    # A round's checkpoint is θ^k, with the callback states beside it when any callback keeps one.
    stateful = bool(jax.tree.leaves(states))
    pack = lambda p, s: (p, s) if stateful else p
    unpack = lambda saved: saved if stateful else (saved, states)
    checkpointer = Checkpointer(checkpoint_dir, keep=max(rounds, 1)) if checkpoint_dir is not None else None
    history = []
    try:
        if checkpointer is not None:
            restored = [unpack(saved) for saved in _restore_rounds(checkpointer, pack(params, states), rounds)]
            if restored:
                history = [p for p, _ in restored]
                params, states = restored[-1]
            if log is not None:
                log.truncate(name, len(history))
                records = logged_records(log, name, list(records))
        for k in range(len(history) + 1, rounds + 1):
            round_key = jax.random.fold_in(key, k)
            finetuned = [finetune(params, t, k, jax.random.fold_in(round_key, t)) for t in range(num_tasks)]
            params = (aggregate(params, finetuned, jax.random.fold_in(round_key, num_tasks)) if aggregate_takes_key
                      else aggregate(params, finetuned))
            history.append(params)
            call_due(callbacks, StepInfo(k, params, None, {}, k == rounds, name), states, records, log)
            if checkpointer is not None:
                checkpointer.save(k, pack(params, states))
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return ATMResult(params, history, states, records)


def _restore_rounds(checkpointer: Checkpointer, like: PyTree, rounds: int) -> list[PyTree]:
    """The checkpoints of rounds 1..k of an interrupted run (k = the newest readable round)."""
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


def fit_finetune(specs: Sequence[FinetuneSpec], config: TrainConfig, *, trainable: PyTree | None = None) -> Finetune:
    """A :data:`Finetune` that runs :func:`metafit.train.fit` on task ``t``'s loss and data.

    Args:
      specs: one :class:`FinetuneSpec` per task (``steps`` overrides ``config.steps``).
      config: a :class:`metafit.train.TrainConfig` (optimiser, lr, batch size, clipping).
      trainable: optional trainable mask (e.g. freeze the heads).
    """
    return lambda params, task, round_index, key: _fit_task(specs[task], config, params, task, round_index, key,
                                                            trainable).params


def one_shot_snapshots(params: PyTree, specs: Sequence[FinetuneSpec], config: TrainConfig, *, every: int,
                       key: jax.Array, trainable: PyTree | None = None) -> list[list[PyTree]]:
    """The budget-matched baselines of every budget from one fine-tune per task.

    Task ``t`` is fine-tuned once from ``params`` for ``specs[t].steps`` steps (as by
    :func:`one_shot` with :func:`fit_finetune`), keeping its parameters every ``every`` steps
    through a :func:`metafit.train.param_snapshots` callback; with ``every`` = one epoch,
    snapshot ``k − 1`` is the K = k epoch fine-tune.

    Returns:
      ``[task][j]``: task ``t``'s parameters after ``(j + 1) * every`` steps.
    """
    def finetune(p, task, round_index, task_key):
        snapshots = param_snapshots(p, every=every, count=specs[task].steps // every)
        result = _fit_task(specs[task], config, p, task, round_index, task_key, trainable, snapshots)
        return unstack(result.callback_states[snapshots.name])

    return one_shot(params, finetune, len(specs), key=key)


def _fit_task(spec: FinetuneSpec, config: TrainConfig, params: PyTree, task: int, round_index: int, key: jax.Array,
              trainable: PyTree | None, *callbacks: Callback) -> FitResult:
    run_config = dataclasses.replace(config, steps=spec.steps, log_every=spec.steps, eval_every=0, ckpt_every=0)
    return fit(spec.loss_fn, params, spec.data, run_config, key=key, trainable=trainable, callbacks=callbacks,
               progress=False, name=f"task{task}_round{round_index}")


def full_batch(arrays: Any) -> Callable[[int], Any]:
    """A data stream that returns the same full batch at every step."""
    arrays = jax.tree.map(np.asarray, arrays)
    return lambda step: arrays
