"""Meta-training one learner through the one trainer, and scoring it on held-out tasks.

:func:`meta_train` is what ``experiment: meta`` and ``experiment: meta_compare`` run for each
learner: build the task set and the backbone (seeded by ``cfg.seed``), meta-train with
:func:`metafit.train.fit` (loss = mean query meta-loss, gradient rule =
:func:`~metafit.meta.meta_value_and_grad`, each meta-batch sampled on device from the step
key, so checkpoints resume exactly), then evaluate on ``args.eval_tasks`` held-out tasks of the
*test* split drawn from ``args.eval_seed`` (the same tasks for every learner and seed, so
comparisons are paired). Metrics: the query metric (``query_mse`` for regression,
``query_accuracy`` for classification) with its 95% interval over tasks, the trainer's seconds
per meta-iteration (compilation excluded) and the variance of the logged training meta-loss
over the second half of training.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

from metafit.data.tasks import TaskSet, get_tasksets
from metafit.meta.backbones import build_backbone
from metafit.meta.learners import MetaLearner, learner_config, make_learner
from metafit.meta.outer import batch_meta_loss, evaluate, meta_value_and_grad, summarize
from metafit.parallel import make_mesh
from metafit.train import DeviceSampler, fit


class MetaTrained(NamedTuple):
    """A meta-trained learner: its task set, the learner, meta-parameters, log history and held-out metrics."""

    tasks: TaskSet
    learner: MetaLearner
    params: Any
    history: list
    losses: np.ndarray
    metrics: dict


def meta_train(cfg, args, learner_name: str, learner_args: dict, run, stage: str) -> MetaTrained:
    """Meta-trains ``learner_name`` on ``args.taskset`` into ``run``'s stage ``stage``; returns it scored.

    Args:
      cfg: the run config (``seed``, ``train``, ``mesh``).
      args: task-set and backbone options (``taskset``, ``shots``, ``queries``, ``taskset_options``,
        ``widths``, ``eval_tasks``, ``val_tasks``, ``eval_seed``; optionally ``ways``,
        ``eval_queries``, ``backbone``, ``conv_hidden``, ``conv_norm``).
      learner_name, learner_args: a name in ``META_LEARNERS`` and its config fields.
      run: the :class:`~metafit.runs.RunDir` (checkpoints under ``checkpoints/<stage>``, metrics logged as ``stage``).
    """
    ways, eval_queries = getattr(args, "ways", None), getattr(args, "eval_queries", None)
    tasks = get_tasksets(args.taskset, ways, args.shots, args.queries, **args.taskset_options)
    eval_tasks = tasks if eval_queries in (None, args.queries) else get_tasksets(
        args.taskset, ways, args.shots, eval_queries, **args.taskset_options)
    network, params = build_backbone(getattr(args, "backbone", "mlp"), tasks.input_shape, tasks.output_dim,
                                     seed=cfg.seed, widths=args.widths, conv_hidden=getattr(args, "conv_hidden", 64),
                                     conv_norm=getattr(args, "conv_norm", "batch"))
    loss = "mse" if tasks.kind == "regression" else "xent"
    learner = make_learner(learner_name, network, loss=loss, output_dim=tasks.output_dim,
                           config=learner_config(learner_name, learner_args))
    metric = "query_mse" if loss == "mse" else "query_accuracy"
    batching = getattr(args, "task_batching", "vmap")
    eval_chunk = 100 if batching == "vmap" else 1  # unrolled training: evaluate one task at a time (no vmap)
    eval_key = jax.random.key(args.eval_seed)
    val_batch = eval_tasks.validation.sample_batch(jax.random.fold_in(eval_key, 1), args.val_tasks)

    def eval_fn(p):
        scores = summarize(evaluate(learner, p, val_batch, jax.random.fold_in(eval_key, 2), chunk=eval_chunk))
        return {f"val_{metric}": scores[metric], "val_query_loss": scores["query_loss"]}

    # One device gains nothing from a mesh, so it is used only when there is something to shard over.
    mesh = make_mesh(cfg.mesh) if jax.device_count() > 1 else None
    sampler = DeviceSampler(tasks.train.batch_fn(cfg.train.batch_size), data=tasks.train.data)
    result = fit(lambda p, batch, key: batch_meta_loss(learner, p, batch, key, batching=batching),
                 learner.init(params), sampler, cfg.train, key=jax.random.key(cfg.seed),
                 workdir=run.checkpoint_dir(stage), eval_fn=eval_fn,
                 grad_fn=lambda p, batch, key: meta_value_and_grad(learner, p, batch, key, batching=batching),
                 mesh=mesh, name=stage, log=run.metrics)

    test_batch = eval_tasks.test.sample_batch(jax.random.fold_in(eval_key, 3), args.eval_tasks)
    scores = summarize(evaluate(learner, result.params, test_batch, jax.random.fold_in(eval_key, 4), chunk=eval_chunk))
    losses = np.array([h["loss"] for h in result.history])
    metrics = {
        metric: scores[metric],
        f"{metric}_ci95": scores[f"{metric}_ci95"],
        "query_loss": scores["query_loss"],
        "meta_loss_final": float(losses[-1]),
        "meta_loss_var": float(np.var(losses[len(losses) // 2:])),
        "train_seconds": result.timing["seconds"],
        "steps": result.step,
        "eval_tasks": args.eval_tasks,
    }
    if math.isfinite(result.timing["step_seconds"]):  # NaN when nothing was trained after the first chunk
        metrics["seconds_per_iter"] = result.timing["step_seconds"]
    if "kernel_jitter" in result.history[-1]:
        metrics["kernel_jitter"] = max(h["kernel_jitter"] for h in result.history)
    return MetaTrained(tasks, learner, result.params, result.history, losses, metrics)
