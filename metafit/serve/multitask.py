"""Staged multi-task LoRA fine-tuning for serving many tasks from one model.

A reconstruction, from the abstract only, of the three-stage recipe of Qu et al., "Deploying a
multi-task online server with an LLM" (COLING 2025 Industry, arXiv 2411.03644): one model
fine-tuned on many tasks of very different sizes should match single-task models while one
deployment replaces many. The paper's details (thresholds, step counts, sampling) are not
public; the choices below are metafit's and are stated where made.

**Stage 1: task filtering.** A brief joint training over all tasks (the stage-3 mixture, so the
probe predicts what stage 3 will do) gives each task's validation metric ``m_t^joint``; the
single-task models give ``m_t^single``. Two signals per task:

* negative transfer: :math:`m_t^{single} - m_t^{joint} > \\delta`;
* gradient conflict: at the probe's parameters, the cosine between task gradients
  :math:`\\cos(g_t, g_s) = g_t \\cdot g_s / (\\|g_t\\| \\|g_s\\|)` (over the LoRA weights, each
  on a batch of the task's training rows) is below ``cos_threshold`` for some task ``s`` at least
  as large as ``t``: the larger task keeps priority, because stage 2 is built on the
  high-resource tasks.

High-resource tasks are always kept; a low-resource task with either signal is dropped from the
multi-task model (held out: it is served by its own single-task adapter). The decision and both
signals are written per task (:func:`filter_tasks`).

**Stage 2** trains a fresh LoRA on the kept high-resource tasks, mixed in proportion to their
sizes. **Stage 3** continues on all kept tasks with temperature sampling

.. math::  p_t = \\frac{n_t^{1/T}}{\\sum_s n_s^{1/T}}

(:func:`temperature_probs`): ``T = 1`` is proportional (naive) mixing, ``T -> inf`` uniform, so
low-resource tasks are not drowned by the large ones.

Every stage is one :func:`metafit.train.fit` call on a batch stream that is a pure function of
the step (:func:`mixture_batches`), so each stage checkpoints and resumes exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def temperature_probs(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """Sampling probabilities :math:`p_t \\propto n_t^{1/T}` of tasks with ``sizes`` examples.

    Computed in log space (``exp((log n_t - max_s log n_s) / T)``) so large sizes and small
    temperatures do not overflow.

    Raises:
      ValueError: no sizes, a size below 1, or a temperature that is not positive.
    """
    sizes = np.asarray(sizes, np.float64)
    if sizes.size == 0 or np.any(sizes < 1):
        raise ValueError(f"every task needs at least one example, got sizes {sizes.tolist()}")
    if not temperature > 0:
        raise ValueError(f"the sampling temperature must be > 0, got {temperature}")
    logits = (np.log(sizes) - np.log(sizes).max()) / temperature
    weights = np.exp(logits)
    return weights / weights.sum()


def mixture_batches(task_arrays: Sequence[Mapping[str, np.ndarray]], probs: Sequence[float], batch_size: int,
                    seed: int) -> Callable[[int], dict[str, np.ndarray]]:
    """``batch_at(step)``: each row's task drawn from ``probs``, then one of that task's examples.

    ``task_arrays`` are per-task dicts of equally padded arrays (``encode_sft`` at one bucket).
    A pure function of ``(seed, step)``, so :func:`metafit.train.fit` resumes exactly; examples are
    drawn with replacement (small tasks repeat, which is what up-sampling them means).

    Raises:
      ValueError: mismatched lengths of ``task_arrays`` and ``probs``, probabilities that do not
        sum to 1, or tasks padded to different lengths.
    """
    probs = np.asarray(probs, np.float64)
    if len(task_arrays) != len(probs) or not np.isclose(probs.sum(), 1.0) or np.any(probs < 0):
        raise ValueError(f"need one probability per task summing to 1, got {probs.tolist()} for "
                         f"{len(task_arrays)} tasks")
    widths = {a["input_ids"].shape[1] for a in task_arrays}
    if len(widths) != 1:
        raise ValueError(f"tasks are padded to different lengths {sorted(widths)}; encode them at one bucket")
    keys = list(task_arrays[0])
    stacked = {k: np.concatenate([a[k] for a in task_arrays]) for k in keys}
    starts = np.cumsum([0] + [len(a["input_ids"]) for a in task_arrays])[:-1]
    counts = np.asarray([len(a["input_ids"]) for a in task_arrays])

    def batch_at(step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, step])
        tasks = rng.choice(len(probs), size=batch_size, p=probs)
        rows = starts[tasks] + rng.integers(0, counts[tasks])
        return {k: v[rows] for k, v in stacked.items()}

    return batch_at


def flat_gradients(loss_fn, params: Any, batches: Sequence[Any], trainable: Any) -> np.ndarray:
    """``[T, P]``: the gradient of ``loss_fn(params, batch, None)[0]`` over the ``trainable`` leaves, per batch.

    Only the trainable leaves are differentiated; the frozen ones (a LoRA model's base weights)
    enter as constants, so no gradient of a frozen weight is computed (a smaller program to
    compile and run). One jitted gradient serves every batch of the same shape.
    """
    from metafit.train.loop import combine, partition

    train, frozen = partition(params, trainable)
    grad = jax.jit(jax.grad(lambda t, f, batch: loss_fn(combine(t, f), batch, None)[0]))
    rows = []
    for batch in batches:
        leaves = jax.tree.leaves(grad(train, frozen, batch))
        rows.append(np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in leaves]))
    return np.stack(rows)


def gradient_cosines(loss_fn, params: Any, batches: Sequence[Any], trainable: Any) -> np.ndarray:
    """``[T, T]`` cosines between the tasks' gradients (each on its own batch) at ``params``.

    :math:`C_{ts} = g_t \\cdot g_s / (\\|g_t\\| \\|g_s\\|)` over the trainable (LoRA) weights; a
    task with a zero gradient has cosine 0 with every other task.
    """
    grads = flat_gradients(loss_fn, params, batches, trainable)
    norms = np.linalg.norm(grads, axis=1)
    unit = grads / np.where(norms > 0, norms, 1.0)[:, None]
    return unit @ unit.T


@dataclasses.dataclass(frozen=True)
class FilterDecision:
    """Why a task is kept in, or dropped from, the multi-task model (one row of ``filtering.json``).

    Attributes:
      task: its name.
      size: training examples.
      high_resource: one of the largest tasks (always kept: stage 2 trains on them).
      single: the single-task model's validation metric.
      joint: the validation metric after the brief joint training.
      drop_in_metric: ``single - joint``.
      negative_transfer: ``drop_in_metric > delta``.
      min_cosine: the lowest gradient cosine with a task at least as large.
      conflicts_with: that task (empty when there is none).
      conflict: ``min_cosine < cos_threshold``.
      kept: the decision.
      reason: the decision in words.
    """

    task: str
    size: int
    high_resource: bool
    single: float
    joint: float
    drop_in_metric: float
    negative_transfer: bool
    min_cosine: float
    conflicts_with: str
    conflict: bool
    kept: bool
    reason: str


def high_resource_tasks(sizes: Mapping[str, int], count: int) -> tuple[str, ...]:
    """The ``count`` largest tasks (ties broken by name, so the choice is deterministic)."""
    if not 1 <= count <= len(sizes):
        raise ValueError(f"high_resource must be in [1, {len(sizes)}] (the number of tasks), got {count}")
    return tuple(sorted(sizes, key=lambda t: (-sizes[t], t))[:count])


def filter_tasks(sizes: Mapping[str, int], single: Mapping[str, float], joint: Mapping[str, float],
                 cosines: np.ndarray, *, high_resource: Sequence[str], delta: float,
                 cos_threshold: float) -> dict[str, FilterDecision]:
    """Stage 1's decision per task from negative transfer and gradient conflict (module docstring).

    Args:
      sizes: task -> training examples (the order of ``cosines``' rows).
      single: task -> single-task validation metric.
      joint: task -> validation metric after the brief joint training.
      cosines: ``[T, T]`` gradient cosines (:func:`gradient_cosines`), rows in ``sizes`` order.
      high_resource: the tasks always kept.
      delta: largest tolerated drop of the metric under joint training.
      cos_threshold: a cosine below it with a task at least as large is a conflict.
    """
    names = list(sizes)
    decisions = {}
    for i, task in enumerate(names):
        rivals = [j for j, other in enumerate(names) if j != i and sizes[other] >= sizes[task]]
        j = min(rivals, key=lambda k: cosines[i, k]) if rivals else None
        min_cos = float(cosines[i, j]) if j is not None else 1.0
        drop = float(single[task] - joint[task])
        negative, conflict, large = drop > delta, min_cos < cos_threshold, task in high_resource
        kept = large or not (negative or conflict)
        reasons = [f"metric {joint[task]:.3f} under joint training vs {single[task]:.3f} alone "
                   f"({'more' if negative else 'not more'} than delta={delta:g} lower)",
                   f"lowest gradient cosine {min_cos:.3f}" + (f" with '{names[j]}'" if j is not None else "")
                   + f" ({'below' if conflict else 'not below'} {cos_threshold:g})"]
        verdict = "kept (high-resource)" if large else ("kept" if kept else "dropped: served by its single-task adapter")
        decisions[task] = FilterDecision(task, int(sizes[task]), large, float(single[task]), float(joint[task]), drop,
                                         negative, min_cos, names[j] if j is not None else "", conflict, kept,
                                         f"{verdict}; " + "; ".join(reasons))
    return decisions


class Stage(NamedTuple):
    """One training stage: a name, the tasks it mixes with their probabilities, and its steps."""

    name: str
    tasks: tuple[str, ...]
    probs: tuple[float, ...]
    steps: int


def three_stage_plan(sizes: Mapping[str, int], kept: Sequence[str], high_resource: Sequence[str], *,
                     temperature: float, stage2_steps: int, stage3_steps: int) -> tuple[Stage, Stage]:
    """Stages 2 and 3 after filtering: the kept high-resource tasks in proportion to their sizes,
    then every kept task with temperature sampling.

    Raises:
      ValueError: no kept high-resource task, or a stage without steps.
    """
    large = tuple(t for t in sizes if t in high_resource and t in kept)
    everyone = tuple(t for t in sizes if t in kept)
    if not large:
        raise ValueError("no high-resource task is kept: stage 2 has nothing to train on")
    if stage2_steps < 1 or stage3_steps < 1:
        raise ValueError(f"stages need at least one step, got stage2_steps={stage2_steps}, stage3_steps={stage3_steps}")
    return (Stage("stage2", large, tuple(temperature_probs([sizes[t] for t in large], 1.0)), stage2_steps),
            Stage("stage3", everyone, tuple(temperature_probs([sizes[t] for t in everyone], temperature)),
                  stage3_steps))


def train_on_mixture(loss_fn, params: Any, task_arrays: Mapping[str, Mapping[str, np.ndarray]], stage: Stage,
                     config, *, seed: int, trainable: Any, workdir=None, log=None, mesh=None,
                     eval_fn=None) -> Any:
    """One :func:`metafit.train.fit` run of ``stage`` (its tasks, probabilities and steps); the final result."""
    from metafit.train import fit

    data = mixture_batches([task_arrays[t] for t in stage.tasks], stage.probs, config.batch_size, seed)
    return fit(loss_fn, params, data, dataclasses.replace(config, steps=stage.steps), key=jax.random.key(seed),
               workdir=workdir, trainable=trainable, mesh=mesh, log=log, name=stage.name, eval_fn=eval_fn)


def as_jsonable(decisions: Mapping[str, FilterDecision]) -> dict[str, dict[str, Any]]:
    """``filtering.json``'s content: each task's decision as a plain dict."""
    return {task: dataclasses.asdict(d) for task, d in decisions.items()}


def response_loss_eval(loss_fn, batch: Mapping[str, np.ndarray]) -> Callable[[Any], dict[str, jax.Array]]:
    """``params -> {"eval_loss": ...}``: the response-token loss on one fixed (held-out) batch, jitted."""
    batch = jax.tree.map(jnp.asarray, dict(batch))
    loss = jax.jit(lambda p: loss_fn(p, batch, None)[0])
    return lambda params: {"eval_loss": loss(params)}


# ----------------------------------------------------------------------------- the arms, end to end

ARMS = ("single", "naive", "three_stage")


class Setup(NamedTuple):
    """A model with a fresh LoRA, its trainer loss, the task suite encoded at one bucket, and a scorer."""

    model: Any
    graphdef: Any
    params: Any
    trainable: Any
    loss_fn: Callable
    sizes: dict[str, int]
    arrays: dict[str, dict[str, np.ndarray]]
    held_out: dict[str, list]
    tokenizer: Any


def prepare(model_name: str, lora, sizes: Mapping[str, int], *, n_held_out: int, bucket: int, seed: int) -> Setup:
    """Loads ``model_name``, adds a fresh LoRA (initialised from ``seed``) and encodes the suite at ``bucket``."""
    from flax import nnx

    from metafit import peft
    from metafit.data.instructions import encode_sft
    from metafit.data.task_suite import task_suite
    from metafit.models import load
    from metafit.train.losses import next_token_loss

    suite = task_suite(sizes, n_held_out=n_held_out, seed=seed)
    model, tokenizer = load(model_name)
    peft.apply(model, lora, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    arrays = {t: encode_sft(tokenizer, d.train, (bucket,)) for t, d in suite.items()}
    return Setup(model, graphdef, params, peft.trainable_mask(params), next_token_loss(graphdef), dict(sizes), arrays,
                 {t: list(d.held_out) for t, d in suite.items()}, tokenizer)


def scores_of(setup: Setup, params: Any, tasks: Sequence[str], *, bucket: int, max_new_tokens: int) -> dict[str, float]:
    """Held-out greedy exact match and response loss of ``tasks`` under ``params``
    (:class:`metafit.train.lm_eval.InstructionScorer`)."""
    from flax import nnx

    from metafit.train.lm_eval import InstructionScorer

    nnx.update(setup.model, params)
    scorer = InstructionScorer(setup.graphdef, setup.tokenizer, {t: setup.held_out[t] for t in tasks}, (bucket,),
                               max_new_tokens)
    return scorer(setup.model)


def single_task_metrics(template: str, tasks: Sequence[str]) -> dict[str, float]:
    """Each task's exact match from its single-task run folder (``template`` with ``{task}``).

    Raises:
      FileNotFoundError: a run folder without results, naming the command that trains it.
    """
    from metafit.runs import RunDirError, load_results

    metrics = {}
    for task in tasks:
        folder = template.format(task=task)
        try:
            metrics[task] = float(load_results(folder)["methods"]["single"][f"{task}_em"])
        except (RunDirError, KeyError) as err:
            raise FileNotFoundError(
                f"stage 1 needs the single-task result of '{task}' in {folder} ({err}); train it first: metafit run "
                f"configs/serve/multitask_single.yaml --set args.task={task} --workdir {folder}") from None
    return metrics


def check_arm(arm: str, task: str, sizes: Mapping[str, int], single_runs: str) -> None:
    """Cheap checks before any compute: the arm, the single task's name, the single-task results stage 1 reads."""
    from metafit.data.task_suite import SUITE_TASKS

    if arm not in ARMS:
        raise ValueError(f"args.arm must be one of {ARMS}, got '{arm}'")
    for name in sizes:
        SUITE_TASKS.get(name)
    if arm == "single" and task not in sizes:
        raise ValueError(f"args.task must name one of the tasks {sorted(sizes)} for arm 'single', got '{task}'")
    if arm == "three_stage":
        if "{task}" not in single_runs:
            raise ValueError(f"args.single_runs must contain '{{task}}' (one run folder per task), got '{single_runs}'")
        single_task_metrics(single_runs, list(sizes))
