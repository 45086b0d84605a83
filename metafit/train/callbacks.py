"""Trainer callbacks: what a method does between steps, with its state checkpointed with the run.

A :class:`Callback` is called by :func:`metafit.train.fit` at every multiple of ``every`` steps
(chunk boundaries are aligned to it) and when the stage ends. It receives a :class:`StepInfo`
(step, parameters, optimiser state, the latest train metrics) and its own state, and returns its
new state and metrics to log::

    def fit_gmm(info, state):                      # CleaR: per-epoch clean probabilities
        prob = estimate_clean_prob(info.params)
        return state._replace(clean_prob=prob), {"clean_auroc": auroc(prob)}

    gmm = Callback("gmm", fit_gmm, every=steps_per_epoch, init=EpochState(...))
    result = fit(loss, params, StatefulData(batch_at), config, key=key, callbacks=[gmm])
    result.callback_states["gmm"]

The state is a pytree of arrays with a **fixed structure and shapes** (like a ``lax.scan``
carry): it is saved in the same Orbax checkpoint as the parameters, so a resumed run restores it
with them and never re-runs a finished call. Its metrics are written to ``metrics.jsonl`` with
``split`` = the callback's name.

Host data that depends on callback state (CleaR serves each epoch's batches with that epoch's
clean probabilities) is wrapped in :class:`StatefulData`: ``fn(step, states)`` with ``states`` =
``{callback name: state}`` as of the last call before ``step``.

``info.params`` and ``info.opt_state`` are the trainer's live buffers: the next chunk donates
them, so a callback that keeps parameters keeps a copy (see :func:`param_snapshots`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from metafit.train.metrics import MetricsWriter


class StepInfo(NamedTuple):
    """What a callback sees.

    Attributes:
      step: steps completed so far.
      params: the full parameters (trainable and frozen) after ``step`` steps.
      opt_state: the optimiser state.
      metrics: the train metrics logged at ``step`` (means since the previous log point);
        empty when ``step`` is not a log point.
      final: whether the stage ends at ``step``.
      stage: the stage name given to ``fit``.
    """

    step: int
    params: Any
    opt_state: Any
    metrics: Mapping[str, float]
    final: bool
    stage: str


CallbackFn = Callable[[StepInfo, Any], tuple[Any, Mapping[str, float]]]


@dataclasses.dataclass(frozen=True)
class Callback:
    """A named hook called by :func:`metafit.train.fit`.

    Attributes:
      name: unique among a fit call's callbacks; the ``split`` of its lines in ``metrics.jsonl``
        and its key in ``FitResult.callback_states``.
      fn: ``(info, state) -> (new_state, metrics)``.
      every: call at every multiple of this many steps (0: only when the stage ends).
      init: the initial state, a pytree of arrays whose structure and shapes never change.
      at_end: also call when the stage ends (if the last step is not a multiple of ``every``).
    """

    name: str
    fn: CallbackFn
    every: int = 0
    init: Any = None
    at_end: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"callback '{self.name}': every must be >= 0, got {self.every}")

    def due(self, step: int, final: bool) -> bool:
        """Whether the callback runs after ``step`` steps."""
        return bool(self.every and step % self.every == 0) or (final and self.at_end)


@dataclasses.dataclass(frozen=True)
class StatefulData:
    """Host batches that read callback state: ``fn(step, states) -> batch``.

    ``states`` maps each callback's name to its state as of the last call at or before ``step``
    (restored from the checkpoint after a resume), so the batch stays a pure function of
    ``(step, checkpointed state)`` and resume stays exact.
    """

    fn: Callable[[int, Mapping[str, Any]], Any]


def check_callbacks(callbacks: tuple[Callback, ...]) -> None:
    """Raises ValueError on duplicate names or objects that are not :class:`Callback`."""
    names = []
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must be metafit.train.Callback objects, got {type(callback).__name__}")
        names.append(callback.name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"callback names must be unique; repeated: {', '.join(duplicates)}")


def call_due(callbacks: Sequence[Callback], info: StepInfo, states: dict[str, Any],
             records: dict[str, list[dict[str, float]]], log: "MetricsWriter | None" = None) -> None:
    """Runs the callbacks due at ``info.step``, updating ``states`` and ``records`` in place.

    Each callback's metrics become a record ``{"step": step, name: float}`` appended to
    ``records[callback.name]`` and, with ``log``, a ``metrics.jsonl`` line with ``stage`` =
    ``info.stage`` and ``split`` = the callback's name (what :func:`logged_records` reads back).
    """
    for callback in callbacks:
        if not callback.due(info.step, info.final):
            continue
        states[callback.name], metrics = callback.fn(info, states[callback.name])
        if metrics:
            record = {"step": info.step, **{k: float(v) for k, v in dict(metrics).items()}}
            if log is not None:
                log.write({"stage": info.stage, "split": callback.name, **record})
            records[callback.name].append(record)


def logged_records(log: "MetricsWriter", stage: str, splits: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The records of ``stage`` already in ``log``, by split (a resumed run continues its history).

    A resumed stage reads its callbacks' records of the finished steps from here instead of
    calling them again; the caller first truncates the log to the restored step.
    """
    strip = lambda r: {k: v for k, v in r.items() if k not in ("stage", "split")}
    lines = log.read(stage)
    return {split: [strip(r) for r in lines if r.get("split") == split] for split in splits}


class Snapshots(NamedTuple):
    """State of :func:`param_snapshots`: ``params`` stacked ``[count, ...]`` and how many were taken."""

    params: Any
    taken: jax.Array


def param_snapshots(params_like: Any, *, every: int, count: int, name: str = "snapshots",
                    select: Callable[[Any], Any] = lambda p: p) -> Callback:
    """A callback keeping a copy of (a part of) the parameters every ``every`` steps.

    Args:
      params_like: the parameters (or any pytree with the shapes of ``select(params)``).
      every: steps between snapshots.
      count: snapshots kept (the stage's ``steps // every``); further calls keep the last ones.
      name: the callback's name.
      select: which part of the parameters to keep (e.g. the trainable adapters only).

    Returns:
      A :class:`Callback` whose final state is a :class:`Snapshots`; :func:`unstack` lists them.
    """
    # Zeros made on the host and a jitted take/unstack: eagerly, each of their few ops compiled once per
    # leaf shape (a small GPT-2's expert snapshots: ~50 programs, about 2 s of CPU, against 2 programs).
    zeros = jax.tree.map(lambda x: jax.device_put(np.zeros((count, *np.shape(x)), jnp.asarray(x).dtype)),
                         select(params_like))

    def take(info: StepInfo, state: Snapshots) -> tuple[Snapshots, dict]:
        return _take_snapshot(state, select(info.params)), {}

    return Callback(name, take, every=every, init=Snapshots(zeros, jnp.zeros((), jnp.int32)), at_end=False)


@jax.jit
def _take_snapshot(state: Snapshots, params: Any) -> Snapshots:
    """``params`` written to the next free slot; once all ``count`` are taken, the oldest is dropped."""
    buffers = jax.tree.leaves(state.params)
    count = buffers[0].shape[0] if buffers else 1
    slot = jnp.minimum(state.taken, count - 1)
    shifted = jax.tree.map(lambda buf: jnp.where(state.taken >= count, jnp.roll(buf, -1, axis=0), buf), state.params)
    stacked = jax.tree.map(lambda buf, x: buf.at[slot].set(x), shifted, params)
    return Snapshots(stacked, state.taken + 1)


def unstack(snapshots: Snapshots) -> list[Any]:
    """The snapshots of a :func:`param_snapshots` state, oldest first."""
    n = min(int(snapshots.taken), jax.tree.leaves(snapshots.params)[0].shape[0])
    return _unstack(snapshots.params, n)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(stacked: Any, n: int) -> list[Any]:
    return [jax.tree.map(lambda buf: buf[i], stacked) for i in range(n)]
