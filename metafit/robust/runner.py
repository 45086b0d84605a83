"""Training on noisy labels through the one trainer, with per-epoch clean-probability estimates.

:func:`train_noisy` runs a :class:`~metafit.robust.methods.NoisyMethod` for ``epochs``
epochs as ONE :func:`metafit.train.fit` call (one compilation, one optimiser state and
schedule across epochs). Epoch boundaries are ``fit``'s eval points
(``eval_every = steps_per_epoch``); there, the boundary hook

1. evaluates (test / val accuracy; memorisation = train accuracy on the corrupted
   samples w.r.t. their noisy labels);
2. if the method needs it before the next epoch: runs the per-sample pass over the
   training set (jitted, fixed-size chunks), smooths the losses with an EMA, fits the
   2-component GMM (scikit-learn) and stores clean probabilities + logits q̂;
3. saves that per-sample state to ``workdir/robust_state/epoch_<e>.npz``.

``batch_at(step)`` then serves each batch with the state of its epoch, so the loss stays
a pure function of ``(params, batch, key)``. Resuming from a checkpoint at an epoch
boundary reloads the saved state: a resumed run ends with the same numbers.
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

from metafit.data.noise import NoisyLabels
from metafit.robust.classifier import TextClassifier
from metafit.robust.clean_prob import ema_losses, gmm_clean_probability
from metafit.robust.losses import cross_entropy
from metafit.robust.methods import NoisyMethod
from metafit.robust.metrics import accuracy, clean_auroc, memorisation, peak_and_last
from metafit.train import TrainConfig, fit

FIT_KEY = jax.random.key(0)  # see loss_fn in train_noisy


class EncodedSplit(NamedTuple):
    """Tokenised texts with labels: ``input_ids``/``attention_mask`` int32 ``[n, L]``, ``labels`` ``[n]``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    @property
    def size(self) -> int:
        return len(self.labels)


class NoisyTask(NamedTuple):
    """A noisy-label classification task: noisy train set, clean val/test sets.

    ``train.labels`` are the *noisy* labels; ``noise`` holds the truth.
    """

    train: EncodedSplit
    noise: NoisyLabels
    val: EncodedSplit
    test: EncodedSplit
    num_classes: int


class EpochState(NamedTuple):
    """Per-sample state served with the batches of one epoch."""

    clean_prob: np.ndarray  # [n] float32
    stored_logits: np.ndarray  # [n, C] float32
    ema_losses: np.ndarray | None  # [n] float32 or None before the first pass


class NoisyRunResult(NamedTuple):
    """What :func:`train_noisy` returns.

    Attributes:
      params: final parameters.
      curve: one dict per epoch end (``epoch``, ``test_accuracy``, ``val_accuracy``,
        ``memorisation``, ``clean_auroc`` when the method estimated clean probabilities).
      summary: ``peak_test_accuracy``, ``last_test_accuracy``, ``last_memorisation``, ...
      clean_prob: the last clean-probability estimate (None if the method made none).
      history: the trainer's logged training metrics.
      timing: ``train_epochs`` (seconds of training between epoch boundaries, the first
        including compilation), ``pass_epochs`` (per-sample pass + GMM, per estimate) and
        ``eval`` (total seconds evaluating).
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
        (``epochs · steps_per_epoch``, one epoch, one epoch); ``log_every`` becomes one epoch
        unless it divides the epoch, and ``steps_per_dispatch`` is cut to divide ``log_every``.
      epochs: number of passes over the training set (the last partial batch is dropped).
      key: all randomness (init, data order, routing, evaluation gates) derives from it.
      workdir: checkpoints and per-epoch state (None: nothing is written, no resume).
      eval_batch_size: chunk size of evaluation / per-sample passes.
      track_memorisation: also predict on the training set at each epoch end.
      evaluate_every_epoch: evaluate at every epoch end (False: only at the end, e.g. benchmarks).
      gmm_seed: ``random_state`` of the GMM fits.
      name: the stage name in ``metrics.jsonl`` and progress.
      log: a :class:`metafit.train.MetricsWriter` (per-epoch evals are read back from it on resume).
    """
    n = task.train.size
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n} training samples")
    init_key, loss_key, data_key, eval_key = jax.random.split(key, 4)
    params, trainable = method.init(classifiers, init_key)
    # Periods that divide each other give every dispatched chunk the same length, so the
    # fused train step compiles once (fit compiles one program per distinct chunk length).
    log_every = config.log_every if steps_per_epoch % config.log_every == 0 else steps_per_epoch
    fit_config = dataclasses.replace(
        config, steps=epochs * steps_per_epoch, log_every=log_every,
        steps_per_dispatch=math.gcd(config.steps_per_dispatch, log_every),
        eval_every=steps_per_epoch,  # the epoch-boundary hook (it evaluates only when asked)
        ckpt_every=steps_per_epoch if workdir is not None else 0)
    state_dir = Path(workdir) / "robust_state" if workdir is not None else None
    ckpt_dir = Path(workdir) / "checkpoints" if workdir is not None else None

    jit_logits = jax.jit(method.logits)
    jit_pass = jax.jit(method.pass_logits) if method.pass_logits is not None else None
    if method.needs_pass(0):
        raise ValueError("the method needs a clean-probability estimate before the first epoch; "
                         "give it at least one warm-up epoch")
    # Before the first estimate every sample counts as clean and has no stored prediction.
    default_state = EpochState(np.ones(n, np.float32), np.zeros((n, task.num_classes), np.float32), None)
    states: dict[int, EpochState] = {}
    timing: dict[str, Any] = {"train_epochs": [], "pass_epochs": [], "eval": 0.0}
    tracker = {"curve": [], "t0": time.perf_counter()}
    orders: dict[int, np.ndarray] = {}
    loss_key_data = np.asarray(jax.random.key_data(loss_key))

    def epoch_state(epoch: int) -> EpochState:
        if not method.needs_pass(epoch):
            return default_state
        if epoch not in states:  # after a resume: the hook ran before the checkpoint was written
            path = state_dir / f"epoch_{epoch}.npz" if state_dir is not None else None
            if path is None or not path.exists():
                raise RuntimeError(f"no per-sample state for epoch {epoch}: the epoch-boundary hook did not run")
            states[epoch] = _load_state(path)
        return states[epoch]

    def batch_at(step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders[epoch] = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n))
        rows = orders[epoch][index * config.batch_size:(index + 1) * config.batch_size]
        state = epoch_state(epoch)
        size = len(rows)
        return {
            "loss_key": np.broadcast_to(loss_key_data, (size, *loss_key_data.shape)),
            "input_ids": task.train.input_ids[rows],
            "attention_mask": task.train.attention_mask[rows],
            "labels": task.train.labels[rows],
            "clean_prob": state.clean_prob[rows],
            "stored_logits": state.stored_logits[rows],
            "phase": np.full(size, float(epoch >= method.warmup_epochs), np.float32),
            "epoch": np.full(size, float(epoch), np.float32),
        }

    def boundary(params, step: int) -> dict[str, float]:
        jax.block_until_ready(params)  # dispatch is async: charge the training compute to training
        epoch = step // steps_per_epoch  # epochs completed so far
        timing["train_epochs"].append(time.perf_counter() - tracker["t0"])
        metrics: dict[str, float] = {"epoch": float(epoch)}
        if evaluate_every_epoch or step == fit_config.steps:
            start = time.perf_counter()
            metrics.update(_evaluate(jit_logits, params, task, jax.random.fold_in(eval_key, epoch),
                                     eval_batch_size, track_memorisation))
            timing["eval"] += time.perf_counter() - start
        if step < fit_config.steps and method.needs_pass(epoch):
            start = time.perf_counter()
            previous = states.get(epoch - 1) or _load_if_exists(state_dir, epoch - 1)
            new_state, pass_metrics = _clean_state(
                jit_pass, params, task, previous, method.loss_momentum,
                jax.random.fold_in(eval_key, 10_000 + epoch), eval_batch_size, gmm_seed)
            states[epoch] = new_state
            metrics.update(pass_metrics)
            if state_dir is not None:
                _save_state(state_dir / f"epoch_{epoch}.npz", new_state)
            timing["pass_epochs"].append(time.perf_counter() - start)
        tracker["curve"].append(metrics)
        tracker["t0"] = time.perf_counter()
        return metrics

    def loss_fn(params, batch, step_key):
        # The run's randomness enters through the batch, not fit's key. This dates from when fit
        # baked its key into the compiled program (it is an argument now); it is kept because the
        # published CleaR tables were produced with these key streams.
        run_key = jax.random.wrap_key_data(batch["loss_key"][0])
        batch = {k: v for k, v in batch.items() if k != "loss_key"}
        return method.loss(params, batch, jax.random.fold_in(run_key, jax.random.key_data(step_key)[-1]))

    result = fit(loss_fn, params, batch_at, fit_config, key=FIT_KEY, workdir=ckpt_dir,
                 eval_fn=boundary,
                 trainable=trainable, name=name, progress=progress, log=log)
    curve = _full_curve(tracker["curve"], log, name, result.resumed_from, fit_config.steps)
    last_prob = states[max(states)].clean_prob if states else None
    return NoisyRunResult(result.params, curve, summarise(curve), last_prob, result.history, timing)


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


def _clean_state(jit_pass, params, task: NoisyTask, previous: EpochState | None, momentum: float, key,
                 batch_size: int, gmm_seed: int) -> tuple[EpochState, dict[str, float]]:
    """The per-sample loss pass + EMA + GMM: the clean-probability estimate for the next epoch."""
    logits = batched_apply(jit_pass, params, task.train, key, batch_size).astype(np.float32)
    losses = np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(task.train.labels)))
    smoothed = ema_losses(previous.ema_losses if previous is not None else None, losses, momentum)
    estimate = gmm_clean_probability(smoothed, seed=gmm_seed)
    metrics = {"clean_auroc": clean_auroc(estimate.prob, task.noise.is_noisy),
               "predicted_clean_fraction": float((estimate.prob > 0.5).mean())}
    return EpochState(estimate.prob, logits, smoothed), metrics


def _load_if_exists(state_dir: Path | None, epoch: int) -> EpochState | None:
    """A saved epoch state (the loss EMA's previous value after a resume), or None."""
    if state_dir is None or not (state_dir / f"epoch_{epoch}.npz").exists():
        return None
    return _load_state(state_dir / f"epoch_{epoch}.npz")


def _save_state(path: Path, state: EpochState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, clean_prob=state.clean_prob, stored_logits=state.stored_logits,
             ema_losses=state.ema_losses if state.ema_losses is not None else np.zeros(0, np.float32))
    tmp.replace(path)  # atomic: a crash never leaves a half-written state


def _load_state(path: Path) -> EpochState:
    with np.load(path) as data:
        ema = data["ema_losses"]
        return EpochState(data["clean_prob"], data["stored_logits"], ema if ema.size else None)


def _full_curve(live: list[dict[str, float]], log: Any, name: str, resumed_from: int | None,
                final_step: int) -> list[dict[str, float]]:
    """Per-epoch evals: after a resume the earlier ones come back from ``metrics.jsonl``.

    ``fit`` keeps the log lines up to the restored step; the evals after it are live (a run
    resumed from its final checkpoint re-runs only the final eval, which replaces the logged one).
    """
    if resumed_from is None or log is None:
        return live
    last_kept = resumed_from if resumed_from < final_step else final_step - 1
    earlier = [{k: v for k, v in r.items() if k not in ("stage", "split", "step")}
               for r in log.read(name) if r.get("split") == "eval" and r.get("step", 0) <= last_kept]
    return earlier + live


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
