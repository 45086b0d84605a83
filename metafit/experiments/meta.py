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
from typing import Any, Literal, Optional

import jax
import numpy as np

from metafit.data.tasks import get_tasksets
from metafit.experiments import RunConfig, experiment, plot_curves
from metafit.meta import adapted_predictions, learner_config
from metafit.meta.training import meta_train
from metafit.runs import RunDir


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
      task_batching: ``vmap`` (default; what a mesh shards) or ``unroll``: the meta-batch traced task by
        task and evaluations mapped one task at a time. ``unroll`` is for MAML-family learners on Conv4
        on a CPU, where per-task weights make a vmapped convolution a grouped one: 1.1 s instead of 14.8 s
        per meta-gradient (``benchmarks/meta_task_batching.py``); compilation grows with the meta-batch.
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
    task_batching: Literal["vmap", "unroll"] = "vmap"

    def __post_init__(self):
        learner_config(self.learner, self.learner_args, path="args.learner_args")  # fail before any compute
        for name in ("eval_tasks", "val_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"args.{name} must be >= 1, got {getattr(self, name)}")


@experiment("meta", config=MetaArgs)
def run_meta(cfg: RunConfig, run: RunDir) -> dict:
    """Meta-trains one learner on one task set; reports held-out query metrics and cost."""
    args = cfg.args
    trained = meta_train(cfg, args, args.learner, args.learner_args, run, stage="meta")
    steps = [h["step"] for h in trained.history]
    plot_curves(run.plot_path("meta_loss"), {"train meta-loss": (steps, trained.losses)}, xlabel="meta-iteration",
                ylabel="query loss", title=f"{args.learner} on {args.taskset}", logy=trained.tasks.kind == "regression")
    return {"metrics": trained.metrics}


@dataclasses.dataclass(frozen=True)
class MetaCompareArgs:
    """Options of the ``meta_compare`` experiment: several learners, one task set, the same held-out tasks.

    Attributes:
      taskset: a regression task set (``sinusoid`` or ``sinusoid_hetero``): the fits are plotted.
      shots: support points per task (K).
      queries: query points per task during meta-training.
      taskset_options: family options, e.g. ``{outlier_fraction: 0.25}``.
      widths: MLP hidden sizes (the same backbone and initialisation for every learner).
      learners: ``{learner name: its learner_args}`` (names in ``META_LEARNERS``), trained in turn.
      eval_tasks: held-out test tasks for the final numbers (the same for every learner).
      val_tasks: validation tasks used every ``train.eval_every`` steps.
      eval_seed: seed of the held-out task keys.
      plot_points: query points of the held-out task drawn in ``fits.png``.
    """

    taskset: str = "sinusoid"
    shots: int = 10
    queries: int = 10
    taskset_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    widths: tuple[int, ...] = (40, 40)
    learners: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {
        "maml": {"inner_lr": 0.01, "inner_steps": 1}, "r2d2": {"ridge": 1.0, "learn_ridge": True}})
    eval_tasks: int = 600
    val_tasks: int = 100
    eval_seed: int = 1234
    plot_points: int = 200

    def __post_init__(self):
        if not self.learners:
            raise ValueError("args.learners is empty; name at least one learner, e.g. {maml: {}, r2d2: {}}")
        for name, options in self.learners.items():
            learner_config(name, options, path=f"args.learners.{name}")  # fail before any compute
        if self.taskset not in ("sinusoid", "sinusoid_hetero"):
            raise ValueError(f"args.taskset must be a regression task set (sinusoid, sinusoid_hetero), got "
                             f"'{self.taskset}'; for classification compare learners with `experiment: meta` runs")
        for name in ("eval_tasks", "val_tasks", "plot_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"args.{name} must be >= 1, got {getattr(self, name)}")


@experiment("meta_compare", config=MetaCompareArgs)
def meta_compare(cfg: RunConfig, run: RunDir) -> dict:
    """Meta-trains each learner of ``args.learners`` on the same tasks; compares held-out error and K-shot fits."""
    args = cfg.args
    plot_task = get_tasksets(args.taskset, None, args.shots, args.plot_points, **args.taskset_options).test.sample_batch(
        jax.random.fold_in(jax.random.key(args.eval_seed), 5), 1)
    plot_task = jax.tree.map(lambda leaf: leaf[0], plot_task)
    order = np.argsort(np.asarray(plot_task.query[0][:, 0]))
    x = np.asarray(plot_task.query[0][order, 0])
    methods, curves, fits = {}, {}, {"true function": (x, np.asarray(plot_task.query[1][order, 0]))}
    for name, options in args.learners.items():
        trained = meta_train(cfg, args, name, options, run, stage=name)
        methods[name] = trained.metrics
        curves[name] = ([h["step"] for h in trained.history], trained.losses)
        predictions = adapted_predictions(trained.learner, trained.params, plot_task, jax.random.key(0))
        fits[f"{name} (held-out MSE {trained.metrics['query_mse']:.2f})"] = (x, predictions[order, 0])
    plot_curves(run.plot_path("meta_loss"), curves, xlabel="meta-iteration", ylabel="training query MSE",
                title=f"meta-training on {args.taskset}, K={args.shots}", logy=True)
    plot_curves(run.plot_path("fits"), fits, xlabel="x", ylabel="y", points={
        f"{args.shots} support points": (np.asarray(plot_task.support[0][:, 0]), np.asarray(plot_task.support[1][:, 0]))},
        title=f"a held-out task after adapting on K={args.shots} points")
    return {"methods": methods}
