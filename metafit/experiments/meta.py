"""Meta-learning experiments: any registered learner on any task set, through the one trainer.

``experiment: meta`` meta-trains ``args.learner`` on ``args.taskset`` with
:func:`metafit.train.fit`: the loss is the mean query meta-loss, the gradient rule
is :func:`metafit.meta.meta_value_and_grad` (weighted for O-AMFS/AMFS), and each
step's meta-batch of ``train.batch_size`` tasks is sampled on device from the step
key (the task set's pure sampler wrapped in a :class:`~metafit.train.DeviceSampler`),
so checkpoints resume exactly.

Afterwards it evaluates on ``eval_tasks`` held-out tasks of the *test* split, drawn
from ``eval_seed`` (the same tasks for every learner and seed, so comparisons are
paired), and reports the mean and 95% interval of the query metric (``query_mse``
for regression, ``query_accuracy`` for classification), the seconds per
meta-iteration of the trainer's fused loop (``FitResult.timing["step_seconds"]``:
after the first chunk, so compilation is excluded; evals and checkpoints are not
counted), and the variance of the logged training meta-loss over the second half of
training.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

import jax
import numpy as np

from metafit.data.tasks import get_tasksets
from metafit.experiments import RunConfig, experiment, plot_curves
from metafit.meta import (
    batch_meta_loss,
    build_backbone,
    evaluate,
    learner_config,
    make_learner,
    meta_value_and_grad,
    summarize,
)
from metafit.parallel import make_mesh
from metafit.runs import RunDir
from metafit.train import DeviceSampler, fit


@dataclasses.dataclass(frozen=True)
class MetaArgs:
    """Options of the ``meta`` experiment (meta-batch size = ``train.batch_size``).

    Attributes:
      taskset: a name from ``metafit.data.tasks.list_tasksets()``.
      ways: classes per task (classification; ``null`` = the task set's default).
      shots: support examples per class (per task for regression).
      queries: query examples per class during meta-training.
      eval_queries: query examples per held-out task (``null`` = ``queries``).
      taskset_options: family options, e.g. ``{outlier_fraction: 0.25}``.
      backbone: ``mlp`` or ``conv4``.
      widths: MLP hidden sizes.
      conv_hidden: Conv4 filters per block.
      conv_norm: Conv4 normalisation (``batch`` = transductive, as MAML).
      learner: a name in ``META_LEARNERS``.
      learner_args: the learner's config fields (validated against its dataclass).
      eval_tasks: held-out test tasks for the final numbers.
      val_tasks: validation tasks used every ``train.eval_every`` steps.
      eval_seed: seed of the held-out task keys (shared across learners and seeds).
    """

    taskset: str = "sinusoid"
    ways: Optional[int] = None
    shots: int = 10
    queries: int = 10
    eval_queries: Optional[int] = None
    taskset_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    backbone: Literal["mlp", "conv4"] = "mlp"
    widths: tuple[int, ...] = (40, 40)
    conv_hidden: int = 64
    conv_norm: Literal["batch", "layer", "none"] = "batch"
    learner: str = "maml"
    learner_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_tasks: int = 600
    val_tasks: int = 100
    eval_seed: int = 1234

    def __post_init__(self):
        learner_config(self.learner, self.learner_args, path="args.learner_args")  # fail before any compute
        for name in ("eval_tasks", "val_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"args.{name} must be >= 1, got {getattr(self, name)}")


@experiment("meta", config=MetaArgs)
def run_meta(cfg: RunConfig, run: RunDir) -> dict:
    """Meta-trains one learner on one task set; reports held-out query metrics and cost."""
    args = cfg.args
    tasks = get_tasksets(args.taskset, args.ways, args.shots, args.queries, **args.taskset_options)
    eval_tasks = tasks if args.eval_queries in (None, args.queries) else get_tasksets(
        args.taskset, args.ways, args.shots, args.eval_queries, **args.taskset_options)
    network, params = build_backbone(args.backbone, tasks.input_shape, tasks.output_dim, seed=cfg.seed,
                                     widths=args.widths, conv_hidden=args.conv_hidden, conv_norm=args.conv_norm)
    loss = "mse" if tasks.kind == "regression" else "xent"
    learner = make_learner(args.learner, network, loss=loss, output_dim=tasks.output_dim,
                           config=learner_config(args.learner, args.learner_args))
    meta_params = learner.init(params)
    metric = "query_mse" if loss == "mse" else "query_accuracy"

    def loss_fn(p, batch, key):
        return batch_meta_loss(learner, p, batch, key)

    def grad_fn(p, batch, key):
        return meta_value_and_grad(learner, p, batch, key)

    eval_key = jax.random.key(args.eval_seed)
    val_batch = eval_tasks.validation.sample_batch(jax.random.fold_in(eval_key, 1), args.val_tasks)

    def eval_fn(p):
        scores = summarize(evaluate(learner, p, val_batch, jax.random.fold_in(eval_key, 2)))
        return {f"val_{metric}": scores[metric], "val_query_loss": scores["query_loss"]}

    # One device gains nothing from a mesh, so it is used only when there is something to shard over.
    mesh = make_mesh(cfg.mesh) if jax.device_count() > 1 else None
    sampler = DeviceSampler(tasks.train.batch_fn(cfg.train.batch_size), data=tasks.train.data)
    result = fit(loss_fn, meta_params, sampler, cfg.train, key=jax.random.key(cfg.seed),
                 workdir=run.checkpoint_dir("meta"), eval_fn=eval_fn, grad_fn=grad_fn, mesh=mesh,
                 name="meta", log=run.metrics)

    test_batch = eval_tasks.test.sample_batch(jax.random.fold_in(eval_key, 3), args.eval_tasks)
    scores = summarize(evaluate(learner, result.params, test_batch, jax.random.fold_in(eval_key, 4)))
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
    steps = [h["step"] for h in result.history]
    plot_curves(run.plot_path("meta_loss"), {"train meta-loss": (steps, losses)}, xlabel="meta-iteration",
                ylabel="query loss", title=f"{args.learner} on {args.taskset}", logy=loss == "mse")
    return {"metrics": metrics}
