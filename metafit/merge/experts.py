"""Task experts of a causal LM: LoRA fine-tunes folded into the weights, merged by recipes and by ATM.

The pieces of merging language models on disk, as the ``merge_lm`` experiment uses them. A
*root* folder holds::

    models/base/, models/<task>/     HF folders: the base model and one expert per task
    recipes/<name>.yaml              `metafit merge` recipes over models/ (paths relative to the recipe)
    merged/<name>/                   HF folders written by those recipes (transformers loads them)

* :class:`LoraFinetuner` fine-tunes a fresh LoRA on one task from given weights through
  :func:`metafit.train.fit` and folds it in: the :data:`~metafit.merge.atm.Finetune` of language
  ATM and the trainer of every expert (:func:`load_or_train_expert`).
* :class:`MergeSpec` + :func:`merge_with_recipe`: a merge of the experts as a recipe file, run by
  the code behind ``metafit merge``, its ``scale`` optionally chosen on validation data.
* :func:`lora_atm`: ATM rounds of LoRA fine-tunes, each round's merge scored by a trainer
  callback whose records survive a rerun of the checkpointed rounds.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from metafit import peft
from metafit.config import dump_yaml
from metafit.data.batching import epoch_batches
from metafit.merge import atm as atm_lib
from metafit.merge.methods import MergeError, get_method, resolve_params
from metafit.merge.recipe import run_recipe
from metafit.models import load, save_folder
from metafit.train import Callback, TrainConfig, fit
from metafit.train.losses import next_token_loss
from metafit.train.metrics import MetricsWriter

Scores = Callable[[Any], dict[str, float]]  # model -> {name: value}, e.g. metafit.train.lm_eval.InstructionScorer


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

    def check(self, num_models: int) -> None:
        """Raises MergeError / UnknownNameError on a method or parameters that cannot merge ``num_models`` experts."""
        method = get_method(self.method)
        if "fisher" in method.tensor_inputs:
            raise MergeError("needs a Fisher file per model, which merge_lm does not compute; "
                             "run such a recipe with `metafit merge` and `fisher:` entries")
        resolve_params(method, num_models, self.parameters)
        if self.scales:
            if "scale" not in method.param_names:
                raise MergeError(f"method '{method.name}' has no `scale` to tune; drop `scales`")
            if "scale" in self.parameters:
                raise MergeError("give `scale` in parameters or candidates in `scales`, not both")
            for value in self.scales:
                resolve_params(method, num_models, {**self.parameters, "scale": value})


class LoraFinetuner:
    """Fine-tunes a fresh LoRA on one task from given base weights and folds it in.

    The LoRA model's loss is built once, so the trainer's compiled step is reused by every
    expert and every ATM round (their graph definitions are equal). Task ``t``'s data in round
    ``k`` (0 = the expert) is ``epoch_batches(arrays[t], batch_size, seed + 100 t + k)``.

    Args:
      graphdef: the base model's graph definition (``nnx.split(model)``).
      arrays: ``{task: encode_sft arrays}`` (the order of tasks is the task index).
      lora: the LoRA of every fine-tune.
      train: the trainer config (``steps`` is given per call).
      seed: data-order seed.
      log: metrics writer of the run.
    """

    def __init__(self, graphdef: nnx.GraphDef, arrays: dict[str, dict[str, np.ndarray]], lora: peft.LoraConfig,
                 train: TrainConfig, seed: int, log: MetricsWriter | None = None):
        self.graphdef, self.arrays, self.lora, self.train, self.seed, self.log = graphdef, arrays, lora, train, seed, log
        self.tasks = list(arrays)
        self._lora_loss = None  # (graphdef, loss_fn) of the LoRA-wrapped model

    def __call__(self, params, task: int, round_index: int, key: jax.Array, *, steps: int,
                 workdir: Path | None = None):
        # copy=True: merge_lora writes the folded kernels in place, and without a copy the model would
        # share its Variables with ``params``, so the caller's base (and every later expert) would move too.
        model = nnx.merge(self.graphdef, params, copy=True)
        peft.apply(model, self.lora, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 2**31 - 1))))
        lora_graphdef, lora_params = nnx.split(model)
        if self._lora_loss is None or self._lora_loss[0] != lora_graphdef:
            self._lora_loss = (lora_graphdef, next_token_loss(lora_graphdef))
        name = self.tasks[task]
        stage = f"expert_{name}" if round_index == 0 else f"atm_round{round_index}_{name}"
        config = dataclasses.replace(self.train, steps=steps, eval_every=0, log_every=min(self.train.log_every, steps),
                                     ckpt_every=0 if workdir is None else self.train.ckpt_every)
        result = fit(self._lora_loss[1], lora_params,
                     epoch_batches(self.arrays[name], config.batch_size, self.seed + 100 * task + round_index),
                     config, key=key, workdir=workdir, trainable=peft.trainable_mask(lora_params),
                     name=stage, log=self.log)
        nnx.update(model, result.params)
        peft.merge_lora(model)
        return nnx.state(model)


def is_saved(folder: Path) -> bool:
    """Whether ``folder`` holds a complete HF model folder (config and weights)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def load_or_train_expert(finetune: LoraFinetuner, base_params, index: int, key: jax.Array, *, steps: int,
                         root: Path, checkpoint_dir: Path, tokenizer):
    """Task ``index``'s expert, loaded from ``root/models/<task>/`` (trained with key ``fold_in(key, index)`` and saved there first if missing)."""
    folder = root / "models" / finetune.tasks[index]
    if not is_saved(folder):
        expert = finetune(base_params, index, 0, jax.random.fold_in(key, index), steps=steps, workdir=checkpoint_dir)
        save_folder(nnx.merge(finetune.graphdef, expert), folder, tokenizer)
    return load(folder)[0]


def write_recipe(path: Path, spec: MergeSpec, tasks: Sequence[str], seed: int) -> Path:
    """A ``metafit merge`` recipe merging ``models/<task>`` onto ``models/base`` (``path`` lies in ``root/recipes/``)."""
    recipe = {"method": spec.method, "base": "../models/base", "models": [f"../models/{t}" for t in tasks],
              "parameters": dict(spec.parameters), "seed": seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {spec.name}: written by the merge_lm experiment; run with\n"
                    f"#   metafit merge {path.name} --out DIR\n" + dump_yaml(recipe))
    return path


def merge_with_recipe(spec: MergeSpec, tasks: Sequence[str], seed: int, root: Path, val_score: Scores | None,
                      log: MetricsWriter | None = None) -> tuple[dict[str, float], float]:
    """Runs ``spec`` as a recipe into ``root/merged/<name>/``, choosing ``scale`` on validation if asked.

    Every candidate goes through the same recipe path as ``metafit merge`` (so the kept folder
    is exactly what the final recipe file produces); the best one (by mean exact match, then
    lower mean loss) is kept, the others deleted. Each candidate's validation scores are logged
    with stage ``tune_<name>``.

    Returns:
      ({"scale": chosen, "val_mean_em": its validation score} or {}, merge seconds in total).
    """
    recipe_path = root / "recipes" / f"{spec.name}.yaml"
    final = root / "merged" / spec.name
    if not spec.scales:
        return {}, run_recipe(write_recipe(recipe_path, spec, tasks, seed), final, progress=False)["seconds"]
    candidate_dir = final.with_name(spec.name + ".candidate")
    stage = f"tune_{spec.name}"
    if log is not None:
        log.truncate(stage, -1)  # a rerun tunes again: keep one set of lines
    best, seconds = None, 0.0
    for index, scale in enumerate(spec.scales):
        candidate = dataclasses.replace(spec, parameters={**spec.parameters, "scale": scale}, scales=())
        seconds += run_recipe(write_recipe(recipe_path, candidate, tasks, seed), candidate_dir,
                              progress=False)["seconds"]
        val = val_score(load(candidate_dir)[0])
        if log is not None:
            log.write({"stage": stage, "step": index, "scale": scale, **val})
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


def lora_atm(finetune: LoraFinetuner, base_params, rounds: int, steps: int, *, key: jax.Array, score: Scores,
             checkpoint_dir: Path, out_dir: Path, tokenizer, log: MetricsWriter, name: str = "atm") -> list[dict[str, float]]:
    """PA-ATM with a fresh LoRA of ``steps`` steps per task and round; saves the final merge to ``out_dir``.

    Each round's merge is scored by a :class:`~metafit.train.Callback` (metrics with stage
    ``name``, split ``score``); rounds restored from ``checkpoint_dir`` are not scored again,
    their scores come back from ``log`` (the run's own ``metrics.jsonl``). A restored round
    whose line is missing there (a run folder written before scores were callback records) is
    scored again and logged.

    Returns:
      The scores after each round.
    """
    scoring = Callback("score", lambda info, state: (state, score(nnx.merge(finetune.graphdef, info.params))), every=1)
    result = atm_lib.atm(base_params, lambda p, t, k, task_key: finetune(p, t, k, task_key, steps=steps),
                         len(finetune.tasks), rounds, key=key, callbacks=[scoring], checkpoint_dir=checkpoint_dir,
                         log=log, name=name)
    save_folder(nnx.merge(finetune.graphdef, result.params), out_dir, tokenizer)
    scores = {record["step"]: {k: v for k, v in record.items() if k != "step"}
              for record in result.callback_records[scoring.name]}
    for k in sorted(set(range(1, rounds + 1)) - set(scores)):
        scores[k] = score(nnx.merge(finetune.graphdef, result.rounds[k - 1]))
        log.write({"stage": name, "split": scoring.name, "step": k, **scores[k]})
    return [scores[k] for k in range(1, rounds + 1)]
