"""Merging fine-tuned language models (``merge_lm``): per-task experts of SmolLM2 merged by
`metafit merge` recipes, against ATM on the same tasks and the same budget.

1. One expert per instruction task (:mod:`metafit.data.instructions`: ``upper``, ``add``, ...)
   is fine-tuned from the base model with LoRA through :func:`metafit.train.fit` for
   ``train.steps`` steps; its LoRA is folded into the weights and the model is saved as an HF
   folder, ``models/<task>/`` (the base goes to ``models/base/``).
2. Every entry of ``merges`` becomes a recipe file, ``recipes/<name>.yaml``, and runs through
   :func:`metafit.merge.recipe.run_recipe` -- the code behind ``metafit merge`` -- into
   ``merged/<name>/``, an HF folder that transformers loads. The recipes stay in the run
   folder, so ``metafit merge RUN/recipes/ties.yaml --out DIR`` redoes one by hand. A merge
   with ``scales`` has its coefficient chosen on validation instructions (disjoint from the
   training and test ones); the chosen value is what its recipe file holds.
3. Language ATM (``atm_rounds`` = K > 0): K rounds in which every task is fine-tuned with a
   fresh LoRA for ``train.steps / K`` steps from the current merge, folded in, and the
   results averaged (θ + mean τ); the same number of gradient steps as one expert, so it is
   budget-matched with the ``average`` merge (task arithmetic with 1/T). Rounds are
   checkpointed (``checkpoints/atm``): a rerun of the same folder continues after the last
   finished round. The result is saved as ``merged/atm/``.
4. Every model -- base, experts, merges, ATM -- is loaded back from its folder and scored on
   each task's held-out instructions: greedy exact match and response-token cross-entropy.

Experts are checkpointed through the trainer (``checkpoints/expert_<task>``), so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit import peft
from metafit.config import dump_yaml
from metafit.data.batching import epoch_batches
from metafit.data.instructions import Instruction, encode_sft, make_instructions
from metafit.experiments import RunConfig, experiment
from metafit.experiments.finetune import exact_match, sft_loss
from metafit.merge import atm as atm_lib
from metafit.merge.methods import MergeError, get_method, resolve_params
from metafit.merge.recipe import run_recipe
from metafit.models import load, save_folder
from metafit.registry import UnknownNameError
from metafit.runs import RunDir, plot_curves
from metafit.train import fit


@dataclass(frozen=True)
class MergeSpec:
    """One merge of the experts: a row of the results table and a recipe file.

    Attributes:
      name: row name and folder name (``merged/<name>/``); letters, digits, ``_`` and ``-``.
      method: a merge method (``metafit list``): task_arithmetic, ties, dare_ties, linear, ...
      parameters: the recipe's shared ``parameters`` (scale, density, drop_rate, normalize, ...).
      scales: candidate merge coefficients (``scale``) chosen on the validation instructions by mean
        exact match, then mean loss (the digits experiment tunes its baselines the same way);
        empty = use ``parameters`` as given. The chosen value is written into the recipe.
    """

    name: str
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    scales: tuple[float, ...] = ()


DEFAULT_MERGES = (
    MergeSpec("average", "linear", {"normalize": True}),  # θ_base + mean τ: task arithmetic with 1/T
    MergeSpec("task_arithmetic", "task_arithmetic", {}, (0.25, 0.5, 0.75, 1.0)),
    MergeSpec("ties", "ties", {"density": 0.2}, (0.5, 0.75, 1.0, 1.5)),
    MergeSpec("dare_ties", "dare_ties", {"drop_rate": 0.9}, (0.1, 0.25, 0.5, 1.0)),
)


@dataclass(frozen=True)
class MergeLMArgs:
    """Options of ``merge_lm``.

    Attributes:
      model: embedded name, HF folder or GGUF file (see :func:`metafit.models.load`).
      tasks: instruction tasks, one expert each (``metafit list`` shows them).
      lora: LoRA of every expert and every ATM round.
      n_train: generated training instructions per task.
      n_eval: held-out instructions per task (the reported scores).
      n_val: validation instructions per task, disjoint from both, for choosing merge coefficients.
      buckets: padded sequence lengths (one compilation each).
      max_new_tokens: generation budget for exact match.
      merges: the merges of the experts (each becomes ``recipes/<name>.yaml``).
      atm_rounds: K rounds of language ATM with ``train.steps / K`` steps per task each (0 = off).
    """

    model: str = "smollm2-135m-instruct"
    tasks: tuple[str, ...] = ("upper", "add", "sort", "successor")
    lora: peft.LoraConfig = field(default_factory=lambda: peft.LoraConfig(rank=8, alpha=16.0,
                                                                          targets=("q_proj", "v_proj")))
    n_train: int = 160
    n_eval: int = 32
    n_val: int = 32
    buckets: tuple[int, ...] = (64, 96, 128)
    max_new_tokens: int = 8
    merges: tuple[MergeSpec, ...] = DEFAULT_MERGES
    atm_rounds: int = 4


def check_args(args: MergeLMArgs, steps: int) -> None:
    """Fails before any compute on values the experiment cannot run with."""
    if len(args.tasks) < 2:
        raise ValueError(f"args.tasks: merging needs at least two tasks, got {list(args.tasks)}")
    if len(set(args.tasks)) != len(args.tasks):
        raise ValueError(f"args.tasks: tasks repeat in {list(args.tasks)}")
    names = [m.name for m in args.merges] + (["atm"] if args.atm_rounds else [])
    bad = [n for n in names if not n or not all(c.isalnum() or c in "_-" for c in n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"args.merges: names must be unique folder names (letters, digits, _ and -), "
                         f"and 'atm' is taken when atm_rounds > 0; got {names}")
    for index, spec in enumerate(args.merges):
        try:
            method = get_method(spec.method)
            if "fisher" in method.tensor_inputs:
                raise MergeError("needs a Fisher file per model, which merge_lm does not compute; "
                                 "run such a recipe with `metafit merge` and `fisher:` entries")
            resolve_params(method, len(args.tasks), spec.parameters)
            if spec.scales:
                if "scale" not in method.param_names:
                    raise MergeError(f"method '{method.name}' has no `scale` to tune; drop `scales`")
                if "scale" in spec.parameters:
                    raise MergeError("give `scale` in parameters or candidates in `scales`, not both")
                for value in spec.scales:
                    resolve_params(method, len(args.tasks), {**spec.parameters, "scale": value})
        except (UnknownNameError, MergeError) as err:
            raise ValueError(f"args.merges[{index}] ({spec.name}): {err}") from None
    if args.atm_rounds < 0 or (args.atm_rounds and steps % args.atm_rounds):
        raise ValueError(f"args.atm_rounds={args.atm_rounds} must be 0 or divide train.steps={steps} "
                         "(each round gets train.steps / atm_rounds steps per task, the experts' budget)")


class Scorer:
    """Per-task exact match and response-token loss of any model with the base's architecture."""

    def __init__(self, graphdef: nnx.GraphDef, tokenizer, eval_sets: dict[str, list[Instruction]], args: MergeLMArgs):
        self.tokenizer, self.eval_sets, self.args = tokenizer, eval_sets, args
        self.batches = {t: jax.tree.map(jnp.asarray, encode_sft(tokenizer, ex, args.buckets))
                        for t, ex in eval_sets.items()}
        loss_fn = sft_loss(graphdef)
        self.loss = jax.jit(lambda params, batch: loss_fn(params, batch, None)[0])

    def __call__(self, model) -> dict[str, float]:
        params = nnx.state(model)
        scores = {}
        for task, examples in self.eval_sets.items():
            scores[f"{task}_em"] = exact_match(model, self.tokenizer, examples, self.args.max_new_tokens,
                                               self.args.buckets[0])
            scores[f"{task}_loss"] = float(self.loss(params, self.batches[task]))
        scores["mean_em"] = float(np.mean([scores[f"{t}_em"] for t in self.eval_sets]))
        scores["mean_loss"] = float(np.mean([scores[f"{t}_loss"] for t in self.eval_sets]))
        return scores


class LoraFinetuner:
    """Fine-tunes a fresh LoRA on one task from given base weights and folds it in.

    The LoRA model's loss is built once, so the trainer's compiled step is reused by every
    expert and every ATM round (their graph definitions are equal).
    """

    def __init__(self, graphdef: nnx.GraphDef, arrays: dict[str, dict[str, np.ndarray]], cfg: RunConfig, run: RunDir):
        self.graphdef, self.arrays, self.cfg, self.run = graphdef, arrays, cfg, run
        self.tasks = list(arrays)
        self._lora = None  # (graphdef, loss_fn) of the LoRA-wrapped model

    def __call__(self, params, task: int, round_index: int, key: jax.Array, *, steps: int,
                 workdir: Path | None = None):
        model = nnx.merge(self.graphdef, params)
        peft.apply(model, self.cfg.args.lora, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 2**31 - 1))))
        lora_graphdef, lora_params = nnx.split(model)
        if self._lora is None or self._lora[0] != lora_graphdef:
            self._lora = (lora_graphdef, sft_loss(lora_graphdef))
        name = self.tasks[task]
        stage = f"expert_{name}" if round_index == 0 else f"atm_round{round_index}_{name}"
        config = dataclasses.replace(self.cfg.train, steps=steps, eval_every=0,
                                     log_every=min(self.cfg.train.log_every, steps),
                                     ckpt_every=0 if workdir is None else self.cfg.train.ckpt_every)
        result = fit(self._lora[1], lora_params,
                     epoch_batches(self.arrays[name], config.batch_size, self.cfg.seed + 100 * task + round_index),
                     config, key=key, workdir=workdir, trainable=peft.trainable_mask(lora_params),
                     name=stage, log=self.run.metrics)
        nnx.update(model, result.params)
        peft.merge_lora(model)
        return nnx.state(model)


def write_recipe(path: Path, spec: MergeSpec, tasks: list[str], seed: int) -> Path:
    """A ``metafit merge`` recipe merging ``models/<task>`` onto ``models/base`` (paths relative to it)."""
    recipe = {"method": spec.method, "base": "../models/base", "models": [f"../models/{t}" for t in tasks],
              "parameters": dict(spec.parameters), "seed": seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {spec.name}: written by the merge_lm experiment; run with\n"
                    f"#   metafit merge {path.name} --out DIR\n" + dump_yaml(recipe))
    return path


def _saved(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def merge_with_recipe(spec: MergeSpec, tasks: list[str], seed: int, run: RunDir,
                      val_score: Scorer | None) -> tuple[dict[str, float], float]:
    """Runs ``spec`` as a recipe into ``merged/<name>/``, choosing ``scale`` on validation if asked.

    Every candidate goes through the same recipe path as ``metafit merge`` (so the kept folder
    is exactly what the final recipe file produces); the best one is kept, the others deleted.

    Returns:
      ({"scale": chosen, "val_mean_em": its validation score} or {}, merge seconds in total).
    """
    recipe_path = run.path / "recipes" / f"{spec.name}.yaml"
    final = run.path / "merged" / spec.name
    if not spec.scales:
        return {}, run_recipe(write_recipe(recipe_path, spec, tasks, seed), final, progress=False)["seconds"]
    candidate_dir = final.with_name(spec.name + ".candidate")
    run.metrics.truncate(f"tune_{spec.name}", -1)  # a rerun tunes again: keep one set of lines
    best, seconds = None, 0.0
    for index, scale in enumerate(spec.scales):
        candidate = dataclasses.replace(spec, parameters={**spec.parameters, "scale": scale}, scales=())
        seconds += run_recipe(write_recipe(recipe_path, candidate, tasks, seed), candidate_dir,
                              progress=False)["seconds"]
        val = val_score(load(candidate_dir)[0])
        run.log({"scale": scale, **val}, step=index, stage=f"tune_{spec.name}")
        rank = (val["mean_em"], -val["mean_loss"])
        if best is None or rank > best[0]:
            shutil.rmtree(final, ignore_errors=True)
            candidate_dir.rename(final)
            best = (rank, candidate, val)
        else:
            shutil.rmtree(candidate_dir)
    _, chosen, val = best
    write_recipe(recipe_path, chosen, tasks, seed)  # the recipe that produced merged/<name>/
    return {"scale": chosen.parameters["scale"], "val_mean_em": val["mean_em"]}, seconds


def train_expert(finetune: LoraFinetuner, graphdef, base_params, index: int, task: str, key: jax.Array,
                 cfg: RunConfig, run: RunDir, tokenizer):
    """Task ``task``'s expert, loaded from ``models/<task>/`` (trained and saved there first if missing)."""
    folder = run.path / "models" / task
    if not _saved(folder):
        expert = finetune(base_params, index, 0, jax.random.fold_in(key, index), steps=cfg.train.steps,
                          workdir=run.checkpoint_dir(f"expert_{task}"))
        save_folder(nnx.merge(graphdef, expert), folder, tokenizer)
    return load(folder)[0]


def language_atm(finetune: LoraFinetuner, graphdef, base_params, num_tasks: int, steps: int, key: jax.Array,
                 cfg: RunConfig, run: RunDir, score: Scorer, tokenizer) -> list[dict[str, float]]:
    """PA-ATM with a fresh LoRA of ``steps`` steps per task and round; saves ``merged/atm/``.

    Returns the test scores after each round (restored rounds are scored again).
    """
    run.metrics.truncate("atm", 0)  # restored rounds are scored and logged again
    curve = []

    def on_round(k, params):
        scores = score(nnx.merge(graphdef, params))
        curve.append(scores)
        run.log(scores, step=k, stage="atm")

    result = atm_lib.atm(base_params, lambda p, t, k, task_key: finetune(p, t, k, task_key, steps=steps), num_tasks,
                         cfg.args.atm_rounds, key=jax.random.fold_in(key, 99), on_round=on_round,
                         checkpoint_dir=run.checkpoint_dir("atm"))
    save_folder(nnx.merge(graphdef, result.params), run.path / "merged" / "atm", tokenizer)
    return curve


@experiment("merge_lm", config=MergeLMArgs, validate=lambda cfg: check_args(cfg.args, cfg.train.steps))
def merge_lm(cfg: RunConfig, run: RunDir) -> dict:
    """Per-task LoRA experts of a causal LM, merged by recipes and by ATM, scored per task."""
    started = time.perf_counter()
    args = cfg.args
    check_args(args, cfg.train.steps)
    tasks = list(args.tasks)
    model, tokenizer = load(args.model)
    graphdef, base_params = nnx.split(model)
    train_arrays = {t: encode_sft(tokenizer, make_instructions(args.n_train, seed=cfg.seed, tasks=[t]), args.buckets)
                    for t in tasks}
    eval_sets = {t: make_instructions(args.n_eval, seed=cfg.seed, tasks=[t], offset=args.n_train) for t in tasks}
    score = Scorer(graphdef, tokenizer, eval_sets, args)
    finetune = LoraFinetuner(graphdef, train_arrays, cfg, run)
    key = jax.random.key(cfg.seed)
    models_dir, merged_dir = run.path / "models", run.path / "merged"

    rows = {"base": score(model)}
    if not _saved(models_dir / "base"):
        save_folder(model, models_dir / "base", tokenizer)
    for t, task in enumerate(tasks):
        rows[f"expert {task}"] = score(train_expert(finetune, graphdef, base_params, t, task, key, cfg, run, tokenizer))
    rows["experts, each on its own task"] = {
        "mean_em": float(np.mean([rows[f"expert {t}"][f"{t}_em"] for t in tasks])),
        "mean_loss": float(np.mean([rows[f"expert {t}"][f"{t}_loss"] for t in tasks])),
    }

    val_sets = {t: make_instructions(args.n_val, seed=cfg.seed, tasks=[t], offset=args.n_train + args.n_eval)
                for t in tasks}
    val_score = Scorer(graphdef, tokenizer, val_sets, args) if any(m.scales for m in args.merges) else None
    merge_seconds = {}
    for spec in args.merges:
        chosen, seconds = merge_with_recipe(spec, tasks, cfg.seed, run, val_score)
        merge_seconds[spec.name] = seconds
        rows[f"merge {spec.name}"] = {**score(load(merged_dir / spec.name)[0]), **chosen}

    if args.atm_rounds:
        steps = cfg.train.steps // args.atm_rounds
        atm_curve = language_atm(finetune, graphdef, base_params, len(tasks), steps, key, cfg, run, score, tokenizer)
        rows[f"ATM ({args.atm_rounds} rounds x {steps} steps)"] = atm_curve[-1]
        curves = {"ATM": (list(range(args.atm_rounds + 1)),
                          [rows["base"]["mean_em"]] + [s["mean_em"] for s in atm_curve])}
        for spec in args.merges:  # one-shot merges of the full-budget experts, as flat references
            curves[f"{spec.name} of experts"] = ([0, args.atm_rounds], [rows[f"merge {spec.name}"]["mean_em"]] * 2)
        plot_curves(run.plot_path("atm_rounds"), curves, xlabel="ATM round", ylabel="mean exact match",
                    title=f"language ATM, tasks {', '.join(tasks)}")
    run.log({"merge_seconds": merge_seconds, "seconds": time.perf_counter() - started}, step=0, stage="summary")
    return {"methods": rows}
