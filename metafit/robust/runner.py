"""Training on noisy labels through the one trainer, with per-epoch clean-probability estimates.

:func:`train_noisy` runs a :class:`~metafit.robust.methods.NoisyMethod` for ``epochs``
epochs as ONE :func:`metafit.train.fit` call (one compilation, one optimiser state and
schedule across epochs). Epoch boundaries are a trainer :class:`~metafit.train.Callback`
(named :data:`EPOCH_HOOK`, called every ``steps_per_epoch`` steps) that

1. evaluates (test / val accuracy; memorisation = train accuracy on the corrupted
   samples w.r.t. their noisy labels);
2. if the method needs it before the next epoch: runs the per-sample pass over the
   training set (jitted, fixed-size chunks), smooths the losses with an EMA, fits the
   2-component GMM (scikit-learn) and keeps clean probabilities + logits q̂.

Its state, an :class:`EpochState` (clean probabilities ``[n]``, stored logits ``[n, C]``,
loss EMA ``[n]`` and the epoch they were made for), is checkpointed with the parameters,
so a resumed run restores it and never refits a finished epoch's GMM. The batches are a
:class:`~metafit.train.StatefulData`: each is served with the state of its epoch, so the
loss stays a pure function of ``(params, batch, key)``. The per-epoch metrics are the
callback's lines in ``metrics.jsonl`` (``split`` = ``"epoch"``).

Keys: ``init, loss, data, eval = split(key, 4)``. The loss of step ``s`` gets the trainer's
step key, ``fold_in(fold_in(loss, s), 1)`` (see :func:`metafit.train.fit`); epoch ``e``
visits the samples in the order ``permutation(fold_in(data, e))``; the evaluation after
epoch ``e`` uses ``fold_in(eval, e)`` and the per-sample pass before epoch ``e`` uses
``fold_in(eval, 10_000 + e)``. (Until issue 16 the loss key was
``fold_in(loss, key_data(fold_in(fold_in(key(0), s), 1))[-1])``, the run key travelling in
the batch beside a constant trainer key; ``paper_repro/clear`` says which numbers used it.)
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metafit.robust.classifier import TextClassifier
from metafit.robust.clean_prob import ema_losses, gmm_clean_probability
from metafit.robust.losses import cross_entropy
from metafit.robust.methods import NoisyMethod
from metafit.robust.metrics import accuracy, clean_auroc, memorisation, peak_and_last
from metafit.robust.tasks import EncodedSplit, NoisyTask
from metafit.train import Callback, StatefulData, StepInfo, TrainConfig, fit

EPOCH_HOOK = "epoch"  # the epoch-boundary callback's name: its metrics.jsonl lines have split "epoch"


class EpochState(NamedTuple):
    """Per-sample state served with the batches of one epoch (the epoch callback's checkpointed state).

    Attributes:
      clean_prob: float32 ``[n]`` GMM clean probability (1 before any estimate).
      stored_logits: float32 ``[n, C]`` logits of the per-sample pass (CleaR's q̂; 0 before any).
      ema_losses: float32 ``[n]`` smoothed per-sample losses of the last pass (0 before any).
      epoch: int32 scalar, the epoch the estimate was made for (-1: no estimate yet).
    """

    clean_prob: np.ndarray
    stored_logits: np.ndarray
    ema_losses: np.ndarray
    epoch: np.ndarray

    @classmethod
    def initial(cls, n: int, num_classes: int) -> "EpochState":
        """Before the first estimate every sample counts as clean and has no stored prediction."""
        return cls(np.ones(n, np.float32), np.zeros((n, num_classes), np.float32), np.zeros(n, np.float32),
                   np.asarray(-1, np.int32))

    def made_for(self, epoch: int) -> bool:
        """Whether this state is the estimate made at the start of ``epoch``."""
        return int(self.epoch) == epoch


class NoisyRunResult(NamedTuple):
    """What :func:`train_noisy` returns.

    Attributes:
      params: final parameters.
      curve: one dict per epoch end (``epoch``, ``test_accuracy``, ``val_accuracy``,
        ``memorisation``, ``clean_auroc`` when the method estimated clean probabilities).
      summary: ``peak_test_accuracy``, ``last_test_accuracy``, ``last_memorisation``, ...
      clean_prob: the last clean-probability estimate (None if the method made none).
      history: the trainer's logged training metrics.
      timing: ``step_seconds`` (mean training step, compilation excluded: the trainer's
        :attr:`~metafit.train.FitResult.timing`), ``epoch_seconds`` (``step_seconds`` times the
        steps of an epoch), ``first_dispatch_seconds`` (the first fused chunk, compilation
        included), ``pass_seconds`` (per-sample pass + GMM, one entry per estimate made by this
        call) and ``eval_seconds`` (total seconds evaluating in this call).
    """

    params: Any
    curve: list[dict[str, float]]
    summary: dict[str, float]
    clean_prob: np.ndarray | None
    history: list[dict[str, float]]
    timing: dict[str, Any]


def batched_apply(fn: Callable, params: Any, split: EncodedSplit, key: jax.Array, batch_size: int) -> np.ndarray:
    """``fn(params, ids, mask, key_i)`` over ``split`` in fixed-size chunks (last one padded).

    Fixed chunk shapes mean one compilation; chunk ``i`` uses ``fold_in(key, i)``.
    """
    n = split.size
    outputs = []
    for i, start in enumerate(range(0, n, batch_size)):
        ids, mask = split.input_ids[start:start + batch_size], split.attention_mask[start:start + batch_size]
        valid = len(ids)
        if valid < batch_size:  # pad with copies of the first row; their outputs are dropped
            ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - valid, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], batch_size - valid, 0)])
        outputs.append(np.asarray(fn(params, ids, mask, jax.random.fold_in(key, i)))[:valid])
    return np.concatenate(outputs)


def train_noisy(
    method: NoisyMethod,
    classifiers: Callable[[jax.Array], TextClassifier],
    task: NoisyTask,
    config: TrainConfig,
    *,
    epochs: int,
    key: jax.Array,
    workdir: str | Path | None = None,
    eval_batch_size: int = 64,
    track_memorisation: bool = True,
    evaluate_every_epoch: bool = True,
    gmm_seed: int = 0,
    name: str = "train",
    progress: bool = False,
    log: Any = None,
) -> NoisyRunResult:
    """Trains ``method`` on ``task`` for ``epochs`` epochs through :func:`metafit.train.fit`.

    Args:
      method: a :class:`NoisyMethod` (see :func:`metafit.robust.methods.make_method`).
      classifiers: ``key -> TextClassifier`` building a fresh classifier (co-teaching calls it twice).
      task: the noisy train set and clean val/test sets.
      config: trainer settings; ``steps``, ``eval_every`` and ``ckpt_every`` are overridden
        (``epochs · steps_per_epoch``, none, one epoch); ``log_every`` becomes one epoch
        unless it divides the epoch, and ``steps_per_dispatch`` is cut to divide ``log_every``.
      epochs: number of passes over the training set (the last partial batch is dropped).
      key: all randomness (init, data order, routing, evaluation gates) derives from it.
      workdir: checkpoints, with the epoch state in them (None: nothing is written, no resume).
      eval_batch_size: chunk size of evaluation / per-sample passes.
      track_memorisation: also predict on the training set at each epoch end.
      evaluate_every_epoch: evaluate at every epoch end (False: only at the end, e.g. benchmarks).
      gmm_seed: ``random_state`` of the GMM fits.
      name: the stage name in ``metrics.jsonl`` and progress.
      log: a :class:`metafit.train.MetricsWriter` (per-epoch metrics are read back from it on resume).
    """
    n = task.train.size
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n} training samples")
    if method.needs_pass(0):
        raise ValueError("the method needs a clean-probability estimate before the first epoch; "
                         "give it at least one warm-up epoch")
    init_key, loss_key, data_key, eval_key = jax.random.split(key, 4)
    params, trainable = method.init(classifiers, init_key)
    fit_config = epoch_fit_config(config, steps_per_epoch, epochs, checkpoints=workdir is not None)
    timing: dict[str, Any] = {"pass_seconds": [], "eval_seconds": 0.0}
    boundary = epoch_callback(method, task, steps_per_epoch=steps_per_epoch, eval_key=eval_key,
                              eval_batch_size=eval_batch_size, track_memorisation=track_memorisation,
                              evaluate_every_epoch=evaluate_every_epoch, gmm_seed=gmm_seed, timing=timing)
    batches = epoch_batches(method, task, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
                            key=data_key)
    result = fit(method.loss, params, batches, fit_config, key=loss_key,
                 workdir=Path(workdir) / "checkpoints" if workdir is not None else None,
                 callbacks=[boundary], trainable=trainable, name=name, progress=progress, log=log)
    curve = [{k: v for k, v in record.items() if k != "step"} for record in result.callback_records[EPOCH_HOOK]]
    state = result.callback_states[EPOCH_HOOK]
    timing.update(step_seconds=result.timing["step_seconds"],
                  epoch_seconds=result.timing["step_seconds"] * steps_per_epoch,
                  first_dispatch_seconds=result.timing["first_dispatch_seconds"])
    last_prob = np.asarray(state.clean_prob) if int(state.epoch) >= 0 else None
    return NoisyRunResult(result.params, curve, summarise(curve), last_prob, result.history, timing)


def epoch_fit_config(config: TrainConfig, steps_per_epoch: int, epochs: int, *, checkpoints: bool) -> TrainConfig:
    """The trainer settings of an ``epochs``-epoch run: one checkpoint per epoch, periods that nest.

    Periods that divide each other give every dispatched chunk the same length, so the fused
    train step compiles once (``fit`` compiles one program per distinct chunk length).
    """
    log_every = config.log_every if steps_per_epoch % config.log_every == 0 else steps_per_epoch
    return dataclasses.replace(
        config, steps=epochs * steps_per_epoch, log_every=log_every,
        steps_per_dispatch=math.gcd(config.steps_per_dispatch, log_every), eval_every=0,
        ckpt_every=steps_per_epoch if checkpoints else 0)


def epoch_batches(method: NoisyMethod, task: NoisyTask, *, steps_per_epoch: int, batch_size: int,
                  key: jax.Array) -> StatefulData:
    """The training batches: epoch ``e`` visits the samples in the order ``permutation(fold_in(key, e))``.

    Each batch carries, besides the texts and noisy labels, the per-sample state of its epoch
    (:class:`EpochState`, read from the epoch callback's state when the method needs one),
    ``phase`` (1 once the method's warm-up is over) and ``epoch``.
    """
    n = task.train.size
    default = EpochState.initial(n, task.num_classes)
    orders: dict[int, np.ndarray] = {}  # a cache: the order is a pure function of (key, epoch)

    def batch_at(step: int, states: dict[str, EpochState]) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders[epoch] = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        rows = orders[epoch][index * batch_size:(index + 1) * batch_size]
        state = default
        if method.needs_pass(epoch):
            state = states[EPOCH_HOOK]
            if not state.made_for(epoch):
                raise RuntimeError(f"epoch {epoch} needs a clean-probability estimate but the epoch callback's "
                                   f"state is for epoch {int(state.epoch)}")
        size = len(rows)
        return {
            "input_ids": task.train.input_ids[rows],
            "attention_mask": task.train.attention_mask[rows],
            "labels": task.train.labels[rows],
            "clean_prob": np.asarray(state.clean_prob)[rows],
            "stored_logits": np.asarray(state.stored_logits)[rows],
            "phase": np.full(size, float(epoch >= method.warmup_epochs), np.float32),
            "epoch": np.full(size, float(epoch), np.float32),
        }

    return StatefulData(batch_at)


def epoch_callback(method: NoisyMethod, task: NoisyTask, *, steps_per_epoch: int, eval_key: jax.Array,
                   eval_batch_size: int = 64, track_memorisation: bool = True, evaluate_every_epoch: bool = True,
                   gmm_seed: int = 0, timing: dict[str, Any] | None = None) -> Callback:
    """The epoch-boundary :class:`~metafit.train.Callback` (:data:`EPOCH_HOOK`) of :func:`train_noisy`.

    After epoch ``e`` (``e`` epochs completed) it evaluates with key ``fold_in(eval_key, e)`` (at every
    epoch, or only at the end) and, if the method needs an estimate before epoch ``e`` and training
    goes on, refreshes the :class:`EpochState` with the per-sample pass (key
    ``fold_in(eval_key, 10_000 + e)``), the loss EMA and the GMM. ``timing`` (optional) collects
    wall-clock seconds: it is a diagnostic, not state, and is not checkpointed.
    """
    jit_logits = jax.jit(method.logits)
    jit_pass = jax.jit(method.pass_logits) if method.pass_logits is not None else None
    timing = timing if timing is not None else {"pass_seconds": [], "eval_seconds": 0.0}

    def at_boundary(info: StepInfo, state: EpochState) -> tuple[EpochState, dict[str, float]]:
        epoch = info.step // steps_per_epoch
        metrics: dict[str, float] = {"epoch": float(epoch)}
        if evaluate_every_epoch or info.final:
            start = time.perf_counter()
            metrics.update(_evaluate(jit_logits, info.params, task, jax.random.fold_in(eval_key, epoch),
                                     eval_batch_size, track_memorisation))
            timing["eval_seconds"] += time.perf_counter() - start
        if not info.final and method.needs_pass(epoch):
            start = time.perf_counter()
            previous = state.ema_losses if state.made_for(epoch - 1) else None
            state, pass_metrics = _clean_state(jit_pass, info.params, task, previous, method.loss_momentum,
                                               jax.random.fold_in(eval_key, 10_000 + epoch), eval_batch_size,
                                               gmm_seed, epoch)
            metrics.update(pass_metrics)
            timing["pass_seconds"].append(time.perf_counter() - start)
        return state, metrics

    return Callback(EPOCH_HOOK, at_boundary, every=steps_per_epoch,
                    init=EpochState.initial(task.train.size, task.num_classes))


def _evaluate(jit_logits, params, task: NoisyTask, key, batch_size: int, track_memorisation: bool) -> dict[str, float]:
    test_key, val_key, train_key = jax.random.split(key, 3)
    out = {"test_accuracy": accuracy(batched_apply(jit_logits, params, task.test, test_key, batch_size),
                                     task.test.labels)}
    if task.val.size:
        out["val_accuracy"] = accuracy(batched_apply(jit_logits, params, task.val, val_key, batch_size),
                                       task.val.labels)
    if track_memorisation:
        train_logits = batched_apply(jit_logits, params, task.train, train_key, batch_size)
        out["memorisation"] = memorisation(train_logits, task.noise.labels, task.noise.is_noisy)
        out["train_clean_accuracy"] = accuracy(train_logits[~task.noise.is_noisy],
                                               task.noise.clean_labels[~task.noise.is_noisy]) \
            if (~task.noise.is_noisy).any() else float("nan")
    return out


def _clean_state(jit_pass, params, task: NoisyTask, previous_ema: np.ndarray | None, momentum: float, key,
                 batch_size: int, gmm_seed: int, epoch: int) -> tuple[EpochState, dict[str, float]]:
    """The per-sample loss pass + EMA + GMM: the clean-probability estimate for ``epoch``."""
    logits = batched_apply(jit_pass, params, task.train, key, batch_size).astype(np.float32)
    losses = np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(task.train.labels)))
    smoothed = ema_losses(None if previous_ema is None else np.asarray(previous_ema), losses, momentum)
    estimate = gmm_clean_probability(smoothed, seed=gmm_seed)
    metrics = {"clean_auroc": clean_auroc(estimate.prob, task.noise.is_noisy),
               "predicted_clean_fraction": float((estimate.prob > 0.5).mean())}
    return EpochState(estimate.prob, logits, smoothed, np.asarray(epoch, np.int32)), metrics


def summarise(curve: list[dict[str, float]]) -> dict[str, float]:
    """Peak / last test accuracy, last memorisation and clean AUROC of a per-epoch curve."""
    evaluated = [c for c in curve if "test_accuracy" in c]
    if not evaluated:
        return {}
    peak, last = peak_and_last([c["test_accuracy"] for c in evaluated])
    summary = {"peak_test_accuracy": peak, "last_test_accuracy": last}
    if "val_accuracy" in evaluated[-1]:
        best = max(evaluated, key=lambda c: c["val_accuracy"])  # model selection on the clean val set
        summary["val_selected_test_accuracy"] = best["test_accuracy"]
    for key in ("memorisation", "train_clean_accuracy"):
        if key in evaluated[-1]:
            summary[f"last_{key}"] = evaluated[-1][key]
    aurocs = [c["clean_auroc"] for c in curve if "clean_auroc" in c and math.isfinite(c["clean_auroc"])]
    if aurocs:
        summary["last_clean_auroc"] = aurocs[-1]
    return summary
