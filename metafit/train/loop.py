"""The one training loop: a jitted, fused, donated train step around any loss.

``fit`` owns checkpointing, exact resume, metrics, progress, the non-finite-loss
guard, gradient accumulation, mixed precision and sharding, so methods only
supply a loss (and, where needed, a data stream or a gradient rule).

Design notes (why it looks like this):
* the per-step key is ``fold_in(key, step)`` and host data is a function of the
  step, so restoring ``(step, trainable params, optimiser state)`` restores
  everything: a resumed run ends bit-identical to an uninterrupted one;
* several steps run per dispatch under ``lax.scan``; chunk boundaries sit at
  absolute multiples of the logging/eval/checkpoint periods so a resumed run
  executes exactly the same compiled programs on the same data;
* a non-finite loss or gradient leaves the parameters at their last good value
  and records the first bad step on device; the host checks it at each sync
  point and stops with an error before anything bad is checkpointed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from metafit.parallel.mesh import batch_sharding, replicated, shard_batch, shard_params, to_global, to_host
from metafit.train.callbacks import Callback, StatefulData, StepInfo, call_due, check_callbacks, logged_records
from metafit.train.checkpoint import Checkpointer
from metafit.train.config import TrainConfig
from metafit.train.metrics import MetricsWriter, Progress
from metafit.train.optim import make_optimizer, traceable_hyperparameters

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
GradFn = Callable[[Any, Any, jax.Array], tuple[tuple[jax.Array, dict[str, jax.Array]], Any]]
GUARDED = ("loss", "grad_norm", "updated parameters")


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class DeviceSampler:
    """Data sampled inside the jitted step (e.g. synthetic or few-shot tasks).

    Attributes:
      fn: ``fn(key) -> batch``, or ``fn(key, data) -> batch`` when ``data`` is given.
      data: optional pytree of arrays the sampler draws from (a dataset's images, say). It is
        passed to the compiled step as an argument: arrays a sampler closes over instead are
        baked into the program as constants (slow compiles, a copy per program) and a new
        dataset would need a new function and so a new compilation.
    """

    fn: Callable[..., Any]
    data: Any = None


class TrainState(NamedTuple):
    step: jax.Array
    trainable: Any
    opt_state: Any
    first_bad_step: jax.Array  # -1 while every loss and gradient so far was finite
    bad_metric: jax.Array  # index into GUARDED of the first non-finite quantity


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      params: final parameters (same structure as the ``params`` given).
      step: the step reached (``config.steps``, or ``stop_at`` when the run was paused).
      history: logged training metrics, one dict per log step (with ``step``).
      evals: eval results, one dict per eval (with ``step``).
      eval: the final eval dict (empty without ``eval_fn`` or when paused).
      resumed_from: the checkpoint step this call resumed from, or None.
      steps_run: optimiser steps this call executed (0 when it resumed a finished stage).
      complete: whether the stage reached ``config.steps``.
      callback_states: each callback's final state, by name.
      callback_records: each callback's logged metrics (with ``step``), by name.
      timing: ``seconds`` (wall time of the call), ``first_dispatch_seconds`` (the first chunk,
        compilation included), ``step_seconds`` (mean wall time per optimiser step after the first
        chunk, evals/callbacks/checkpoints excluded; NaN when there was no second chunk).
    """

    params: Any
    step: int
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    eval: dict[str, float]
    resumed_from: int | None = None
    steps_run: int = 0
    complete: bool = True
    callback_states: dict[str, Any] = dataclasses.field(default_factory=dict)
    callback_records: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)
    timing: dict[str, float] = dataclasses.field(default_factory=dict)


def partition(params: Any, mask: Any | None) -> tuple[Any, Any]:
    """Splits ``params`` into (trainable, frozen) trees, ``None`` where the other one holds the leaf."""
    if mask is None:
        return params, jax.tree.map(lambda _: None, params)
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def fresh_rng_streams(tree: Any, key: jax.Array) -> Any:
    """``tree`` with ``key`` folded into every NNX random stream key (``nnx.RngKey``) it holds.

    A model's random streams (LoRA and model dropout) live in its state, and the trainer's step
    returns only the trainable leaves, so a stream's counter never advances from one step to the
    next: without this, every step would draw the same dropout masks. Folding in the step's key
    gives each step (and each accumulated micro-batch) its own masks, still a pure function of
    ``(key, step)``, so a resumed run draws what an uninterrupted one draws.
    """
    from flax import nnx

    data = jax.random.bits(key, (), jnp.uint32)

    def rekey(leaf):
        if isinstance(leaf, nnx.RngKey):
            return leaf.replace(jax.random.fold_in(leaf.get_value(), data))
        return leaf

    return jax.tree.map(rekey, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`partition`."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)


def fit(
    loss_fn: LossFn,
    params: Any,
    data: Callable[[int], Any] | DeviceSampler | StatefulData,
    config: TrainConfig,
    *,
    key: jax.Array,
    workdir: str | Path | None = None,
    eval_fn: Callable[..., dict[str, float]] | None = None,
    callbacks: tuple[Callback, ...] | list[Callback] = (),
    stop_at: int | None = None,
    grad_fn: GradFn | None = None,
    trainable: Any | None = None,
    mesh: Mesh | None = None,
    param_rules: tuple[tuple[str, tuple], ...] = (),
    name: str = "train",
    progress: bool = True,
    log: MetricsWriter | None = None,
) -> FitResult:
    """Minimises ``loss_fn`` over ``params`` with the optimiser of ``config``.

    Args:
      loss_fn: ``(params, batch, key) -> (loss, metrics)``, pure and jittable.
      params: any pytree of arrays (e.g. an ``nnx.State``).
      data: ``batch_at(step) -> batch`` (host numpy pytree, the *global* batch, a
        pure function of ``step`` so resume is exact), a :class:`DeviceSampler`, or a
        :class:`~metafit.train.StatefulData` (host batches that read callback state).
      config: the :class:`TrainConfig`.
      key: base PRNG key; step ``s`` uses ``fold_in(key, s)``.
      workdir: checkpoint folder; when it holds checkpoints, training resumes from
        the newest readable one. ``None`` disables checkpoints.
      eval_fn: ``params -> {name: float}`` or ``(params, step) -> {name: float}``, run every
        ``config.eval_every`` steps and at the end (``step`` = steps completed).
      callbacks: :class:`~metafit.train.Callback` hooks run at their ``every`` steps and at the
        end; their states are checkpointed with the run (see :mod:`metafit.train.callbacks`).
      stop_at: pause after this many steps (checkpointing there); a later call with the same
        config resumes to ``config.steps`` on the same schedule, ending where an uninterrupted
        run ends. Outside the config on purpose: pausing must not change the run's identity.
      grad_fn: optional ``(params, batch, key) -> ((loss, metrics), grads)`` replacing
        ``jax.value_and_grad(loss_fn, has_aux=True)`` (custom update rules).
      trainable: optional pytree of bools like ``params``; only True leaves are
        optimised (and get optimiser state); the others stay bit-identical.
      mesh: device mesh; batches are split over its ``data``/``fsdp`` axes.
      param_rules: sharding rules for parameters (see :func:`metafit.parallel.param_shardings`).
      name: stage name used in metrics and progress.
      progress: show a progress bar / progress lines.
      log: metrics writer (``metrics.jsonl``); lines after a resumed step are dropped.

    Returns:
      A :class:`FitResult`.

    Raises:
      NonFiniteLossError: naming the step and quantity that became non-finite.
      CheckpointMismatchError: ``workdir`` holds a checkpoint of another state structure.
    """
    callbacks = tuple(callbacks)
    check_callbacks(callbacks)
    if stop_at is not None and not 0 < stop_at <= config.steps:
        raise ValueError(f"stop_at must be in [1, train.steps={config.steps}], got {stop_at}")
    end = config.steps if stop_at is None else stop_at
    wall_start = time.perf_counter()
    if mesh is not None:
        params = shard_params(params, mesh, param_rules)
    trainable_params, frozen = partition(params, trainable)
    state = _initial_state(trainable_params, config, mesh)
    callback_states = {c.name: c.init for c in callbacks}

    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints) if workdir is not None else None
    start, resumed_from = 0, None
    if checkpointer is not None:
        try:
            restored = checkpointer.restore_latest({"train": state, "callbacks": callback_states})
        except BaseException:
            checkpointer.close()
            raise
        if restored is not None:
            start, saved = restored
            if mesh is None:
                state = _placed_like(saved["train"], state)
            else:
                state = saved["train"]
            callback_states = saved["callbacks"]
            resumed_from = start
    if start > end:
        raise ValueError(f"stop_at={stop_at} is before the checkpoint restored at step {start}")
    history, evals, callback_records = [], [], {c.name: [] for c in callbacks}
    if log is not None:
        log.truncate(name, start)
        history, evals, callback_records = _previous_records(log, name, callbacks)

    sampler = batches_of = None
    if isinstance(data, DeviceSampler):
        sampler = (data.fn, data.data is not None)
        sampler_data = _sampler_data(data, mesh)
        batches_of = lambda step, n: sampler_data
    elif isinstance(data, StatefulData):
        batches_of = lambda step, n: _host_batches(lambda s: data.fn(s, callback_states), step, n, mesh)
    else:
        batches_of = lambda step, n: _host_batches(data, step, n, mesh)
    run_chunk = _compiled_chunk(loss_fn, grad_fn, config, sampler, mesh)
    hyperparameters = _traced_hyperparameters(config)
    progress_bar = Progress(config.steps, name, start=start, enabled=progress)
    clock = _Clock()
    pending = []
    step = start
    try:
        while step < end:
            n = _chunk_length(step, config, callbacks, stop_at)
            state, metrics = run_chunk(state, frozen, batches_of(step, n), key, n, hyperparameters)
            clock.chunk_dispatched(state, n)
            pending.append(metrics)
            step += n
            final = step == config.steps
            record = {}
            if step % config.log_every == 0 or final:
                _raise_if_bad(state, checkpointer)
                record = {"step": step, **_mean_metrics(pending)}
                pending = []
                history.append(record)
                progress_bar.update(step, record)
                if log is not None:
                    log.write({"stage": name, "split": "train", **record})
            with clock.paused(state):
                if eval_fn is not None and config.eval_every and step % config.eval_every == 0 and not final:
                    evals.append(_evaluate(eval_fn, combine(state.trainable, frozen), step, name, log))
                if any(c.due(step, final) for c in callbacks):
                    _raise_if_bad(state, checkpointer)
                    info = StepInfo(step, combine(state.trainable, frozen), state.opt_state,
                                    {k: v for k, v in record.items() if k != "step"}, final, name)
                    call_due(callbacks, info, callback_states, callback_records, log)
                if checkpointer is not None and (
                    (config.ckpt_every and step % config.ckpt_every == 0) or final or step == stop_at
                ):
                    _raise_if_bad(state, checkpointer)
                    checkpointer.save(step, {"train": state, "callbacks": callback_states})
        _raise_if_bad(state, checkpointer)
    finally:
        progress_bar.close()
        if checkpointer is not None:
            checkpointer.close()
    final_params = combine(state.trainable, frozen)
    final_eval = {}
    complete = step == config.steps
    if not complete:
        pass  # paused: the final eval belongs to the call that finishes the stage
    elif evals and evals[-1]["step"] == step:  # resumed a finished stage: its final eval is logged already
        final_eval = evals[-1]
    elif eval_fn is not None:
        final_eval = _evaluate(eval_fn, final_params, step, name, log)
        evals.append(final_eval)
    timing = clock.summary(time.perf_counter() - wall_start)
    return FitResult(final_params, step, history, evals, final_eval, resumed_from, step - start, complete,
                     dict(callback_states), callback_records, timing)


def _initial_state(trainable_params: Any, config: TrainConfig, mesh: Mesh | None) -> TrainState:
    optimizer = make_optimizer(config)
    # A copy, because donation must not consume the caller's arrays; an explicit dtype drops weak types,
    # which would otherwise make every call with Python-scalar-built params compile anew.
    trainable_params = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype, copy=True), trainable_params)
    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        trainable=trainable_params,
        opt_state=optimizer.init(trainable_params),
        first_bad_step=jnp.asarray(-1, jnp.int32),
        bad_metric=jnp.asarray(-1, jnp.int32),
    )
    if mesh is None:
        committed = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array) and x.committed]
        if committed:  # parameters placed on a device by the caller (or read by Orbax)
            # One committed input commits every output of the step, so the second chunk would see other
            # argument placements than the first and compile the step again: commit the whole state.
            state = jax.device_put(state, committed[0].sharding)
        return state
    return state._replace(
        opt_state=_replicate_unplaced(state.opt_state, mesh),
        step=to_global(np.int32(0), replicated(mesh)),
        first_bad_step=to_global(np.int32(-1), replicated(mesh)),
        bad_metric=to_global(np.int32(-1), replicated(mesh)),
    )


def _placed_like(restored: Any, fresh: Any) -> Any:
    """``restored`` placed as ``fresh`` (the state a new run starts from) is.

    Orbax restores arrays committed to their device, and ``jax.jit`` compiles a program anew when
    an argument's committedness changes: a run resumed in the process that compiled the step (a
    paused stage, a retried run) would otherwise compile the same step twice. ``_initial_state``
    leaves ``fresh`` all committed to one device or all uncommitted, so its step counter says which.
    """
    if fresh.step.committed:
        return jax.device_put(restored, fresh.step.sharding)
    return jax.tree.map(_uncommitted, restored)  # device_put without a device keeps an array committed


def _uncommitted(leaf: Any) -> Any:
    """An uncommitted copy of a committed array (via the host), anything else as it is."""
    if not isinstance(leaf, jax.Array) or not leaf.committed:
        return leaf
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # no host copy of a key: via its data
        return jax.random.wrap_key_data(jax.device_put(np.asarray(jax.random.key_data(leaf))),
                                        impl=jax.random.key_impl(leaf))
    return jax.device_put(np.asarray(leaf))


class _Clock:
    """Wall time per optimiser step, without a host sync per step.

    The first chunk (compilation included) is timed on its own with one extra sync; after it,
    time spent in evals, callbacks and checkpoints (each starts by waiting for the pending
    chunk) is subtracted, so ``step_seconds`` is the training compute alone.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.excluded = 0.0
        self.steps_after_first = 0
        self.last_sync = None

    def chunk_dispatched(self, state, n: int) -> None:
        if self.first is None:
            jax.block_until_ready(state.step)
            self.first = time.perf_counter() - self.start
            self.last_sync = time.perf_counter()
        else:
            self.steps_after_first += n

    @contextlib.contextmanager
    def paused(self, state):
        jax.block_until_ready(state.step)  # the chunk's compute belongs to training, not to what follows
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - begin

    def summary(self, seconds: float) -> dict[str, float]:
        trained = (time.perf_counter() - self.last_sync - self.excluded) if self.last_sync else float("nan")
        per_step = trained / self.steps_after_first if self.steps_after_first else float("nan")
        return {"seconds": seconds, "first_dispatch_seconds": self.first if self.first is not None else float("nan"),
                "step_seconds": per_step}


def _replicate_unplaced(tree: Any, mesh: Mesh) -> Any:
    """Replicates over ``mesh`` the leaves not laid out on it yet (optimiser step counts).

    The compiled step returns every leaf on the mesh; an input leaf on a single device would
    make the second call's input shardings differ from the first's and compile the step twice.
    """
    placed = lambda x: isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
    return jax.tree.map(lambda x: x if placed(x) else to_global(np.asarray(x), replicated(mesh)), tree)


def _chunk_length(step: int, config: TrainConfig, callbacks: tuple[Callback, ...] = (),
                  stop_at: int | None = None) -> int:
    """Steps until the next boundary (a multiple of any period, a pause, or the end)."""
    periods = [config.steps_per_dispatch, config.log_every, config.eval_every, config.ckpt_every]
    periods += [c.every for c in callbacks]
    next_stops = [(step // p + 1) * p for p in periods if p] + [config.steps]
    if stop_at is not None and stop_at > step:
        next_stops.append(stop_at)
    return min(next_stops) - step


def _sampler_data(data: DeviceSampler, mesh: Mesh | None):
    """The sampler's arrays on device once (replicated over the mesh), not copied at every chunk."""
    if data.data is None:
        return None
    if mesh is None:
        return jax.tree.map(jnp.asarray, data.data)
    return _replicate_unplaced(data.data, mesh)


def _host_batches(data, step: int, n: int, mesh: Mesh | None):
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[data(s) for s in range(step, step + n)])
    if mesh is not None:
        return shard_batch(stacked, mesh, leading=1)
    return stacked


def _step_config(config: TrainConfig) -> TrainConfig:
    """``config`` with the fields the compiled step never reads as constants set to fixed values.

    The step reads the optimiser fields, ``precision`` and ``grad_accum``; logging, evaluation and
    checkpoint cadences only steer the host loop, and ``steps`` only shapes a decaying or warm-up
    schedule. The learning rate and weight decay of optax's optimisers arrive as arguments
    (:func:`_traced_hyperparameters`). Two stages differing only there (a short and a long run,
    another ``log_every``, a learning-rate sweep) then share one compiled step, in this process and
    in JAX's persistent compilation cache.
    """
    loop_only = dict(eval_every=0, log_every=1, ckpt_every=0, keep_checkpoints=1, steps_per_dispatch=1)
    if config.schedule == "constant" and config.warmup_steps == 0:
        loop_only["steps"] = 1
    if traceable_hyperparameters(config):
        loop_only.update(lr=1.0, weight_decay=0.0)  # placeholders: the step reads the values passed to it
    return dataclasses.replace(config, **loop_only)


def _traced_hyperparameters(config: TrainConfig) -> dict[str, jax.Array]:
    """The step's ``lr`` and ``weight_decay`` arguments (none for an optimiser that keeps them constant).

    Weakly typed, like the Python floats they replace, so bfloat16 updates stay bfloat16.
    """
    if not traceable_hyperparameters(config):
        return {}
    # float(): a YAML ``lr: 1`` (an int) would otherwise be an int32 argument, another program
    return {"lr": jnp.asarray(float(config.lr)), "weight_decay": jnp.asarray(float(config.weight_decay))}


def _compiled_chunk(loss_fn, grad_fn, config: TrainConfig, sampler, mesh):
    """The jitted fused step for one (loss, gradient rule, config, sampler, mesh).

    ``sampler`` is ``(fn, takes_data)`` for a :class:`DeviceSampler`, else None; the sampler's
    data then arrives in place of the host batches.

    Cached so that methods calling :func:`fit` many times with the same loss
    function object (ATM rounds, CleaR epochs) compile once, not once per call; configs that
    differ only in fields the step never reads share the entry (:func:`_step_config`).
    """
    return _jitted_chunk(loss_fn, grad_fn, _step_config(config), sampler, mesh)


@functools.lru_cache(maxsize=64)
def _jitted_chunk(loss_fn, grad_fn, config: TrainConfig, sampler, mesh):
    """:func:`_compiled_chunk` for a config already reduced by :func:`_step_config`."""
    compute_dtype = jnp.bfloat16 if config.precision == "bfloat16" else None

    def cast(tree):
        if compute_dtype is None:
            return tree
        return jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    from metafit.models.remat import remat_policy  # the models read it while the loss is traced
    from metafit.peft.core import dropout_enabled

    def micro_grads(trainable, frozen, batch, k):
        frozen = fresh_rng_streams(frozen, k)

        def loss_of_trainable(t):
            with remat_policy(config.remat, config.scan_layers), dropout_enabled():
                loss, metrics = loss_fn(cast(combine(t, frozen)), cast(batch), k)
            return loss.astype(jnp.float32), metrics

        if grad_fn is None:
            return jax.value_and_grad(loss_of_trainable, has_aux=True)(trainable)
        with dropout_enabled():
            (loss, metrics), grads = grad_fn(combine(trainable, frozen), batch, k)
        grads_trainable, _ = partition(grads, jax.tree.map(lambda x: x is not None, trainable, is_leaf=lambda x: x is None))
        return (loss, metrics), grads_trainable

    def accumulated_grads(trainable, frozen, batch, k):
        if config.grad_accum == 1:
            return micro_grads(trainable, frozen, batch, k)
        micro = jax.tree.map(lambda x: x.reshape(config.grad_accum, -1, *x.shape[1:]), batch)

        def body(carry, inputs):
            i, mb = inputs
            (loss, metrics), grads = micro_grads(trainable, frozen, mb, jax.random.fold_in(k, i))
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        (_, m0), g0 = jax.eval_shape(lambda: micro_grads(trainable, frozen, jax.tree.map(lambda x: x[0], micro), k))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (jnp.zeros((), jnp.float32), m0, g0))
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(config.grad_accum), micro))
        scale = 1.0 / config.grad_accum
        return (loss * scale, jax.tree.map(lambda m: m * scale, metrics)), jax.tree.map(lambda g: g * scale, grads)

    def one_step(state: TrainState, frozen, batch, key, hyper):
        step_key = jax.random.fold_in(key, state.step)
        if sampler is not None:
            sample_fn, takes_data = sampler
            sample_key = jax.random.fold_in(step_key, 0)
            batch = sample_fn(sample_key, batch) if takes_data else sample_fn(sample_key)
            if mesh is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))
        (loss, metrics), grads = accumulated_grads(state.trainable, frozen, batch, jax.random.fold_in(step_key, 1))
        grad_norm = optax.global_norm(grads)
        optimizer = make_optimizer(config, **hyper)  # hyper is empty where the config keeps them constant
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new_trainable = optax.apply_updates(state.trainable, updates)
        # The parameters too: a finite loss and gradient can still give non-finite parameters (an
        # overflowing update), and a checkpoint of them must never be called good.
        finite = jnp.array([jnp.isfinite(loss), jnp.isfinite(grad_norm),
                            jnp.isfinite(optax.global_norm(new_trainable))])
        ok = finite.all()
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        first_bad = jnp.where((state.first_bad_step < 0) & ~ok, state.step + 1, state.first_bad_step)
        bad_metric = jnp.where((state.first_bad_step < 0) & ~ok, jnp.argmin(finite), state.bad_metric)
        new_state = TrainState(
            step=state.step + 1,
            trainable=keep(new_trainable, state.trainable),
            opt_state=keep(new_opt_state, state.opt_state),
            first_bad_step=first_bad.astype(jnp.int32),
            bad_metric=bad_metric.astype(jnp.int32),
        )
        scalars = {"loss": loss, "grad_norm": grad_norm, **{k: jnp.mean(v) for k, v in metrics.items()}}
        return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), scalars)

    def chunk(state, frozen, batches, key, n, hyper):
        if n == 1:
            # No loop for a single step: XLA's CPU backend runs convolutions inside a while loop through a
            # slow path (jax-ml/jax#12868; a Conv4 step: 1.0 s alone, 9.6 s as a scan of length 1), and
            # it keeps a loop of one trip. Same ops, same numbers, a leading step axis of 1 as the scan's.
            batch = batches if sampler is not None else jax.tree.map(lambda x: x[0], batches)
            new_state, scalars = one_step(state, frozen, batch, key, hyper)
            return new_state, jax.tree.map(lambda x: x[None], scalars)
        if sampler is not None:  # ``batches`` is the sampler's data (or None), the same at every step
            return jax.lax.scan(lambda s, _: one_step(s, frozen, batches, key, hyper), state, None, length=n)
        return jax.lax.scan(lambda s, b: one_step(s, frozen, b, key, hyper), state, batches)

    return jax.jit(chunk, static_argnums=4, donate_argnums=0)


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
    stacked = {k: np.concatenate([to_host(m[k]) for m in pending]) for k in pending[0]}
    return {k: float(v.mean()) for k, v in stacked.items()}


def _raise_if_bad(state: TrainState, checkpointer: Checkpointer | None = None) -> None:
    first_bad = int(to_host(state.first_bad_step))
    if first_bad >= 0:
        metric = GUARDED[int(to_host(state.bad_metric))]
        if checkpointer is not None:
            checkpointer.wait()  # a save still in flight counts once it is complete
        steps = checkpointer.steps() if checkpointer is not None else []
        if steps:
            resumable = (f"The last checkpoint (step {steps[-1]}) was written before it and is resumable: fix "
                         "the cause and rerun the same command.")
        else:
            resumable = "No checkpoint was written before it, so the run restarts from step 0 when rerun."
        raise NonFiniteLossError(
            f"non-finite {metric} at step {first_bad}; training stopped. Parameters were not updated from "
            f"that step on and no checkpoint was written after it. {resumable} Lower the learning rate, "
            f"enable train.clip_norm, or check the data."
        )


def _previous_records(log: MetricsWriter, name: str, callbacks: tuple[Callback, ...]):
    """Train, eval and callback lines already logged for this stage (a resumed run continues its history)."""
    records = logged_records(log, name, ["train", "eval", *(c.name for c in callbacks)])
    return records["train"], records["eval"], {c.name: records[c.name] for c in callbacks}


def _takes_step(eval_fn) -> bool:
    """Whether ``eval_fn`` has a second positional parameter (``(params, step)``)."""
    try:
        parameters = inspect.signature(eval_fn).parameters.values()
    except (TypeError, ValueError):  # builtins and some callables have no signature: the plain form
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _evaluate(eval_fn, params, step: int, name: str, log: MetricsWriter | None) -> dict[str, float]:
    values = eval_fn(params, step) if _takes_step(eval_fn) else eval_fn(params)
    result = {"step": step, **{k: float(v) for k, v in values.items()}}
    if log is not None:
        log.write({"stage": name, "split": "eval", **result})
    return result
