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
   finished round, and the scores of finished rounds (a trainer callback's records) are read
   back from ``metrics.jsonl``, not computed again. The result is saved as ``merged/atm/``.
4. Every model -- base, experts, merges, ATM -- is loaded back from its folder and scored on
   each task's held-out instructions: greedy exact match and response-token cross-entropy.

Experts are checkpointed through the trainer (``checkpoints/expert_<task>``), so an
interrupted run resumes where it stopped. The pieces (LoRA experts, recipe merges with tuned
coefficients, language ATM) are :mod:`metafit.merge.experts`; the scores are
:class:`metafit.train.lm_eval.InstructionScorer`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

from metafit import peft
from metafit.data.instructions import encode_sft, make_instructions
from metafit.experiments import RunConfig, experiment
from metafit.merge.experts import (LoraFinetuner, MergeSpec, is_saved, load_or_train_expert, lora_atm,
                                   merge_with_recipe)
from metafit.merge.methods import MergeError
from metafit.merge.similarity import relative_change
from metafit.models import load, save_folder
from metafit.registry import UnknownNameError
from metafit.runs import RunDir, plot_curves
from metafit.train.lm_eval import InstructionScorer


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
            spec.check(len(args.tasks))
        except (UnknownNameError, MergeError) as err:
            raise ValueError(f"args.merges[{index}] ({spec.name}): {err}") from None
    if args.atm_rounds < 0 or (args.atm_rounds and steps % args.atm_rounds):
        raise ValueError(f"args.atm_rounds={args.atm_rounds} must be 0 or divide train.steps={steps} "
                         "(each round gets train.steps / atm_rounds steps per task, the experts' budget)")


@experiment("merge_lm", config=MergeLMArgs, validate=lambda cfg: check_args(cfg.args, cfg.train.steps))
def merge_lm(cfg: RunConfig, run: RunDir) -> dict:
    """Per-task LoRA experts of a causal LM, merged by recipes and by ATM, scored per task."""
    started = time.perf_counter()
    args = cfg.args
    check_args(args, cfg.train.steps)
    tasks = list(args.tasks)
    model, tokenizer = load(args.model)
    graphdef, base_params = nnx.split(model)
    instructions = lambda n, offset: {t: make_instructions(n, seed=cfg.seed, tasks=[t], offset=offset) for t in tasks}
    train_arrays = {t: encode_sft(tokenizer, ex, args.buckets) for t, ex in instructions(args.n_train, 0).items()}
    score = InstructionScorer(graphdef, tokenizer, instructions(args.n_eval, args.n_train), args.buckets,
                              args.max_new_tokens)
    finetune = LoraFinetuner(graphdef, train_arrays, args.lora, cfg.train, cfg.seed, run.metrics)
    key = jax.random.key(cfg.seed)

    # How far each model moved from the base on the LoRA targets: ‖θ − θ_base‖ / ‖θ_base‖, mean over
    # tensors, measured on the model as it is scored (each folder is read once).
    is_target = lambda name: any(target in name for target in args.lora.targets)
    moved = lambda scored: relative_change(base_params, nnx.split(scored)[1], is_target)
    weight_change = {}

    rows = {"base": score(model)}
    if not is_saved(run.path / "models" / "base"):
        save_folder(model, run.path / "models" / "base", tokenizer)
    for t, task in enumerate(tasks):
        expert = load_or_train_expert(finetune, base_params, t, key, steps=cfg.train.steps, root=run.path,
                                      checkpoint_dir=run.checkpoint_dir(f"expert_{task}"), tokenizer=tokenizer)
        rows[f"expert {task}"], weight_change[f"expert {task}"] = score(expert), moved(expert)
    rows["experts, each on its own task"] = {
        "mean_em": float(np.mean([rows[f"expert {t}"][f"{t}_em"] for t in tasks])),
        "mean_loss": float(np.mean([rows[f"expert {t}"][f"{t}_loss"] for t in tasks])),
    }

    val_score = None
    if any(m.scales for m in args.merges):
        val_score = InstructionScorer(graphdef, tokenizer, instructions(args.n_val, args.n_train + args.n_eval),
                                      args.buckets, args.max_new_tokens)
    merge_seconds = {}
    for spec in args.merges:
        chosen, merge_seconds[spec.name] = merge_with_recipe(spec, tasks, cfg.seed, run.path, val_score, run.metrics)
        merged = load(run.path / "merged" / spec.name)[0]
        rows[f"merge {spec.name}"], weight_change[f"merge {spec.name}"] = {**score(merged), **chosen}, moved(merged)
    expert = merged = None  # the last expert and merge need not stay in memory through ATM

    if args.atm_rounds:
        steps = cfg.train.steps // args.atm_rounds
        atm_curve = lora_atm(finetune, base_params, args.atm_rounds, steps, key=jax.random.fold_in(key, 99),
                             score=score, checkpoint_dir=run.checkpoint_dir("atm"), out_dir=run.path / "merged" / "atm",
                             tokenizer=tokenizer, log=run.metrics)
        rows[f"ATM ({args.atm_rounds} rounds x {steps} steps)"] = atm_curve[-1]
        curves = {"ATM": (list(range(args.atm_rounds + 1)),
                          [rows["base"]["mean_em"]] + [s["mean_em"] for s in atm_curve])}
        for spec in args.merges:  # one-shot merges of the full-budget experts, as flat references
            curves[f"{spec.name} of experts"] = ([0, args.atm_rounds], [rows[f"merge {spec.name}"]["mean_em"]] * 2)
        plot_curves(run.plot_path("atm_rounds"), curves, xlabel="ATM round", ylabel="mean exact match",
                    title=f"language ATM, tasks {', '.join(tasks)}")
    if args.atm_rounds:  # the rounds' merges were scored in memory; the saved final merge is measured here
        weight_change["ATM"] = moved(load(run.path / "merged" / "atm")[0])
    run.log({"merge_seconds": merge_seconds, "seconds": time.perf_counter() - started}, step=0, stage="summary")
    out = {"methods": rows, "weight_change": weight_change}
    if args.atm_rounds:
        out["atm_rounds"] = atm_curve
    return out
