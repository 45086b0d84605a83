"""Multi-task LoRA fine-tuning for one server of many tasks (:mod:`metafit.serve.multitask`).

One experiment, three arms (``args.arm``), each a run folder holding a LoRA adapter in the HF
PEFT format (``adapter/``) that the server and ``metafit export`` load:

* ``single`` -- one task (``args.task``) alone;
* ``naive`` -- every task, mixed in proportion to its size;
* ``three_stage`` -- stage 1 filters tasks (brief joint training vs the single-task runs named by
  ``args.single_runs``, and gradient cosines; ``filtering.json``), stage 2 trains on the kept
  high-resource tasks, stage 3 on every kept task with temperature sampling.

Results: held-out exact match and response loss per task (``<task>_em``, ``<task>_loss``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import jax
from flax import nnx

from metafit import peft
from metafit.data.task_suite import DEFAULT_SIZES
from metafit.experiments import RunConfig, experiment, plot_curves
from metafit.parallel import make_mesh
from metafit.runs import RunDir
from metafit.serve import multitask as mt


@dataclass(frozen=True)
class MultitaskArgs:
    """Options of multi-task fine-tuning.

    Attributes:
      arm: ``single``, ``naive`` or ``three_stage``.
      task: the task of arm ``single``.
      model: embedded name, HF folder or GGUF file (see :func:`metafit.models.load`).
      lora: the LoRA settings (rank, alpha, target modules).
      sizes: task -> training examples (:mod:`metafit.data.task_suite`; 3 large, 8 small by default).
      n_held_out: held-out examples per task for exact match.
      bucket: padded sequence length of every example (one compilation).
      max_new_tokens: generation budget for exact match.
      high_resource: how many of the largest tasks are high-resource (stage 2; always kept).
      temperature: T of stage 3's (and the probe's) sampling ``p_t ~ n_t^(1/T)``.
      delta: stage 1 drops a low-resource task whose exact match under joint training is more than
        this below its single-task result.
      cos_threshold: stage 1 drops a low-resource task whose gradient cosine with a task at least as
        large is below this.
      probe_steps: steps of stage 1's brief joint training.
      stage2_steps: steps of stage 2.
      stage3_steps: steps of stage 3.
      cosine_rows: training rows per task in the gradients of the cosines.
      single_runs: the single-task run folders stage 1 compares with (``{task}`` is replaced).
    """

    arm: str = "naive"
    task: str = ""
    model: str = "metafit-small-lm"
    lora: peft.LoraConfig = field(default_factory=lambda: peft.LoraConfig(
        rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")))
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    n_held_out: int = 32
    bucket: int = 48
    max_new_tokens: int = 8
    high_resource: int = 3
    temperature: float = 3.0
    delta: float = 0.1
    cos_threshold: float = 0.0
    probe_steps: int = 80
    stage2_steps: int = 120
    stage3_steps: int = 280
    cosine_rows: int = 32
    single_runs: str = "runs/mt_server/single/{task}"


@experiment("multitask", config=MultitaskArgs, validate=lambda cfg: mt.check_arm(
    cfg.args.arm, cfg.args.task, cfg.args.sizes, cfg.args.single_runs))
def multitask(cfg: RunConfig, run: RunDir) -> dict:
    """One arm: train, score each task held out, export ``adapter/`` (and ``filtering.json`` for three_stage)."""
    args, mesh = cfg.args, make_mesh(cfg.mesh)
    setup = mt.prepare(args.model, args.lora, args.sizes, n_held_out=args.n_held_out, bucket=args.bucket, seed=cfg.seed)
    score = dict(bucket=args.bucket, max_new_tokens=args.max_new_tokens)
    fit_args = dict(seed=cfg.seed, trainable=setup.trainable, log=run.metrics, mesh=mesh)
    tasks, results, stages = list(args.sizes), {}, []
    if args.arm in ("single", "naive"):
        chosen = [args.task] if args.arm == "single" else tasks
        stages = [mt.Stage(args.arm, tuple(chosen), tuple(mt.temperature_probs([args.sizes[t] for t in chosen], 1.0)),
                           cfg.train.steps)]
    else:
        probe = mt.Stage("probe", tuple(tasks), tuple(mt.temperature_probs(list(args.sizes.values()), args.temperature)),
                         args.probe_steps)
        probed = mt.train_on_mixture(setup.loss_fn, setup.params, setup.arrays, probe, cfg.train,
                                     workdir=run.checkpoint_dir("probe"), **fit_args)
        results["probe"] = mt.scores_of(setup, probed.params, tasks, **score)
        cosines = mt.gradient_cosines(setup.loss_fn, probed.params, [jax.tree.map(
            lambda a: a[:args.cosine_rows], setup.arrays[t]) for t in tasks], setup.trainable)
        large = mt.high_resource_tasks(args.sizes, args.high_resource)
        decisions = mt.filter_tasks(args.sizes, mt.single_task_metrics(args.single_runs, tasks),
                                    {t: results["probe"][f"{t}_em"] for t in tasks}, cosines, high_resource=large,
                                    delta=args.delta, cos_threshold=args.cos_threshold)
        (run.path / "filtering.json").write_text(json.dumps(
            {"decisions": mt.as_jsonable(decisions), "tasks": tasks, "cosines": cosines.tolist()}, indent=1))
        stages = mt.three_stage_plan(args.sizes, [t for t in tasks if decisions[t].kept], large,
                                     temperature=args.temperature, stage2_steps=args.stage2_steps,
                                     stage3_steps=args.stage3_steps)
    params, curves = setup.params, {}
    for stage in stages:
        trained = mt.train_on_mixture(setup.loss_fn, params, setup.arrays, stage, cfg.train,
                                      workdir=run.checkpoint_dir(stage.name), **fit_args)
        params = trained.params
        curves[f"{stage.name} loss"] = ([h["step"] for h in trained.history], [h["loss"] for h in trained.history])
    results[args.arm] = mt.scores_of(setup, params, stages[-1].tasks if args.arm == "single" else tasks, **score)
    nnx.update(setup.model, params)
    peft.export_hf_peft(setup.model, run.path / "adapter", base_model_name_or_path=args.model)
    plot_curves(run.plot_path("train_loss"), curves, xlabel="step in stage", ylabel="response-token cross-entropy",
                title=f"multi-task LoRA ({args.arm})")
    metrics = {"train_steps": sum(s.steps for s in stages), "tasks_served": len(stages[-1].tasks)}
    return {"methods": results, "metrics": metrics}
