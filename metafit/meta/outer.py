"""The outer loop as pure functions: meta-loss, (weighted) meta-gradient, held-out evaluation.

For a batch of ``T`` tasks (a :class:`metafit.data.Task` with a leading task axis)::

    L(theta) = 1/T sum_i L_query_i(adapt(theta, support_i))          (uniform)
    g        = sum_i w_i grad_theta L_query_i(adapt(theta, support_i))  (weighted)

The uniform case is one ``jax.value_and_grad`` of the mean (``vmap`` over tasks);
a weighting computes per-task gradients (``vmap`` of ``value_and_grad``), weights
them (:mod:`metafit.meta.weighting`) and combines them. Both plug into
:func:`metafit.train.fit`: ``batch_meta_loss`` is the ``loss_fn`` and
``meta_value_and_grad`` the ``grad_fn`` (see ``metafit.experiments.meta``). This
module does not import the trainer, keeping ``metafit.meta`` below it.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metafit.data.tasks import Task
from metafit.meta.kernels import warn_if_jittered
from metafit.meta.learners import KernelAdapted, MetaLearner
from metafit.meta.weighting import combine_task_grads, uniform

Params = Any
_DEFAULT = object()


def meta_loss(learner: MetaLearner, meta_params: Params, task: Task, key: jax.Array):
    """Query loss after adapting on the support set: ``(loss, {"query_<metric>": ...})``.

    Closed-form learners add ``kernel_jitter`` (0 unless the solve was ill-conditioned).
    """
    adapted = learner.adapt(meta_params, task.support, key=key)
    value, metrics = learner.loss(learner.predict(meta_params, adapted, task.query[0]), task.query[1])
    metrics = {f"query_{k}": v for k, v in metrics.items()}
    if isinstance(adapted, KernelAdapted):
        metrics["kernel_jitter"] = jax.lax.stop_gradient(adapted.jitter)
    return value, metrics


def adapted_predictions(learner: MetaLearner, meta_params: Params, task: Task, key: jax.Array) -> np.ndarray:
    """The learner's outputs at the query inputs after adapting on the support set (one task).

    The same adaptation :func:`meta_loss` scores: ``predict(adapt(support), x_query)``.
    """
    return np.asarray(_adapted_predictions_jit(learner, meta_params, task, key))


@functools.partial(jax.jit, static_argnums=0)
def _adapted_predictions_jit(learner, meta_params, task, key):
    # one compiled program (the learner static, as in _evaluate_jit): eagerly, every op of the
    # inner loop or closed-form solve would compile on its own
    adapted = learner.adapt(meta_params, task.support, key=key)
    return learner.predict(meta_params, adapted, task.query[0])


def over_tasks(fn, tasks: Task, keys: jax.Array, batching: str = "vmap"):
    """``fn(task, key)`` for every task of a batch, stacked along a leading task axis.

    ``batching="vmap"`` vmaps over the batch (best on accelerators, and what a mesh shards).
    ``"unroll"`` traces ``fn`` once per task (a Python loop inside the compiled program; compilation
    grows with the batch). On XLA's CPU backend the adapted weights of MAML-family learners make a
    vmapped convolution a grouped one, and a ``lax.map`` over tasks is no better under
    differentiation (a convolution inside a loop takes a slow path there, jax-ml/jax#12868): second-order
    MAML on Conv4 (32 filters, 8 glyph tasks) took 14.8 s per meta-gradient vmapped and 1.1 s unrolled
    (``benchmarks/meta_task_batching.py``; 6.5 s under ``lax.map`` in a scratch measurement).
    """
    if batching == "vmap":
        return jax.vmap(fn)(tasks, keys)
    if batching != "unroll":
        raise ValueError(f"task batching must be 'vmap' or 'unroll', got {batching!r}")
    outs = [fn(jax.tree.map(lambda a: a[i], tasks), keys[i]) for i in range(_num_tasks(tasks))]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)


def batch_meta_loss(learner: MetaLearner, meta_params: Params, tasks: Task, key: jax.Array, *,
                    batching: str = "vmap"):
    """Mean :func:`meta_loss` over a batch of tasks (:func:`over_tasks`); metrics are task means."""
    keys = jax.random.split(key, _num_tasks(tasks))
    values, metrics = over_tasks(lambda task, k: meta_loss(learner, meta_params, task, k), tasks, keys, batching)
    return values.mean(), _reduce_metrics(metrics)


def task_value_and_grad(learner: MetaLearner, meta_params: Params, task: Task, key: jax.Array):
    """``((loss, metrics), grads)`` of one task: the learner's own rule or ``grad`` of :func:`meta_loss`."""
    if learner.task_grad is not None:
        (value, metrics), grads = learner.task_grad(meta_params, task, key)
        return (value, {f"query_{k}": v for k, v in metrics.items()}), grads
    return jax.value_and_grad(lambda p: meta_loss(learner, p, task, key), has_aux=True)(meta_params)


def meta_value_and_grad(learner: MetaLearner, meta_params: Params, tasks: Task, key: jax.Array,
                        *, weighting: Any = _DEFAULT, batching: str = "vmap"):
    """The meta-gradient of a task batch, weighted by ``weighting`` (default: the learner's).

    Args:
      learner: a :class:`MetaLearner`.
      meta_params: its meta-parameters.
      tasks: a batch of tasks.
      key: PRNG key (split per task exactly as in :func:`batch_meta_loss`).
      weighting: ``per_task_grads -> weights``; ``None`` = plain mean (fused path).
      batching: ``"vmap"`` or ``"unroll"`` over the tasks (:func:`over_tasks`).

    Returns:
      ``((mean query loss, metrics), meta_grads)``; with a weighting the metrics also
      hold ``weight_min``, ``weight_max`` and ``weight_negative`` (share of negative weights).
    """
    weighting = learner.weighting if weighting is _DEFAULT else weighting
    if weighting is None and learner.task_grad is None:
        return jax.value_and_grad(lambda p: batch_meta_loss(learner, p, tasks, key, batching=batching),
                                  has_aux=True)(meta_params)
    keys = jax.random.split(key, _num_tasks(tasks))
    (values, metrics), grads = over_tasks(lambda task, k: task_value_and_grad(learner, meta_params, task, k),
                                          tasks, keys, batching)
    weights = jax.lax.stop_gradient(uniform(grads) if weighting is None else weighting(grads))
    metrics = _reduce_metrics(metrics)
    if weighting is not None:
        metrics.update(weight_min=weights.min(), weight_max=weights.max(), weight_negative=jnp.mean(weights < 0))
    return (values.mean(), metrics), combine_task_grads(grads, weights)


def evaluate(learner: MetaLearner, meta_params: Params, tasks: Task, key: jax.Array, *,
             chunk: int = 100) -> dict[str, np.ndarray]:
    """Per-task query loss and metrics on held-out tasks (adaptation included, no meta-update).

    Tasks are processed ``chunk`` at a time (``lax.map`` over ``vmap``) to bound memory; ``chunk=1``
    maps one task at a time (no vmap: see :func:`over_tasks` for when that is faster).

    Returns:
      ``{"query_loss": [N], "query_<metric>": [N], ...}`` as host arrays.
    """
    num = _num_tasks(tasks)
    per_task = _evaluate_jit(learner, meta_params, tasks, jax.random.split(key, num), min(chunk, num))
    return {k: np.asarray(v) for k, v in per_task.items()}


@functools.partial(jax.jit, static_argnums=(0, 4))
def _evaluate_jit(learner, meta_params, tasks, keys, chunk):
    # module level with the learner as a static argument, so repeated evaluations (every
    # eval_every steps) reuse one compiled program instead of tracing a fresh closure each time
    def one(args):
        task, k = args
        value, metrics = meta_loss(learner, meta_params, task, k)
        return {"query_loss": value, **metrics}

    return jax.lax.map(one, (tasks, keys), batch_size=chunk)


def summarize(per_task: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and 95% normal-approximation half-width ``1.96 s / sqrt(N)`` of each per-task metric."""
    out = {}
    for name, values in per_task.items():
        values = np.asarray(values, np.float64)
        out[name] = float(values.mean())
        out[f"{name}_ci95"] = float(1.96 * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return out


def _reduce_metrics(per_task: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Task means, except ``kernel_jitter`` (the batch maximum, warned about once here)."""
    out = {k: v.mean() for k, v in per_task.items() if k != "kernel_jitter"}
    if "kernel_jitter" in per_task:
        out["kernel_jitter"] = per_task["kernel_jitter"].max()
        warn_if_jittered(out["kernel_jitter"])
    return out


def _num_tasks(tasks: Task) -> int:
    return jax.tree.leaves(tasks)[0].shape[0]
