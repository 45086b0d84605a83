"""Training stages of post-training (SFT, KTO, DPO) as trainer runs, checkpoint merges, and scoring.

Each stage reads the scored dataset of a data run (``records.json``, :mod:`metafit.posttrain.pipeline`)
and starts from the student or from an earlier run's ``model/``:

* **SFT** -- next-token loss on the best response (:func:`metafit.train.losses.next_token_loss`).
* **KTO** -- best = desirable, worst = undesirable (:func:`metafit.posttrain.losses.kto_objective`);
  the mismatched pairs of :math:`z_0` pair each row's prompt with the response of another row
  (a fixed derangement of the dataset drawn from the seed).
* **DPO** -- (best, worst) pairs (:func:`metafit.posttrain.losses.dpo_objective`).

The reference is the starting model (the student, or the SFT run for SFT -> KTO); its
log-probabilities of every training sequence are computed once per dataset and cached in the
run folder (:func:`metafit.posttrain.reference.cached_reference_logprobs`). The student is
trained fully (all 1.97M parameters): it is small enough that LoRA would save nothing here.
Every model is scored by greedy exact match per category on held-out instructions whose prompts
do not occur in the data run (:func:`eval_sets`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import numpy as np
from flax import nnx

from metafit import merge
from metafit.data.batching import epoch_batches
from metafit.data.instructions import Instruction, encode_sft
from metafit.models import load, save_folder
from metafit.posttrain.data import CATEGORIES, make_pool
from metafit.posttrain.losses import check_beta, dpo_objective, kto_objective
from metafit.posttrain.pipeline import PipelineConfig, run_pipeline
from metafit.posttrain.reference import cached_reference_logprobs, check_same_vocabulary
from metafit.runs import RunDir
from metafit.train import TrainConfig, fit
from metafit.train.lm_eval import InstructionScorer
from metafit.train.losses import next_token_loss

RECORDS = "records.json"


@dataclass(frozen=True)
class EvalArgs:
    """How every post-training model is scored.

    Attributes:
      n_eval: held-out instructions per category.
      seed: seed of the held-out stream (prompts that occur in the data run are skipped).
      bucket: prompt length for generation (one compilation).
      max_new_tokens: generation budget.
    """

    n_eval: int = 24
    seed: int = 1000
    bucket: int = 64
    max_new_tokens: int = 12


@dataclass(frozen=True)
class StageArgs:
    """Options of ``posttrain_train``.

    Attributes:
      method: ``sft``, ``kto`` or ``dpo``.
      data_run: run folder of ``posttrain_data`` (holds ``records.json``).
      init_run: run folder whose ``model/`` is the starting policy and the reference
        (``""`` = the student itself); SFT -> KTO names the SFT run here.
      student: the student model when ``init_run`` is empty.
      beta: KTO/DPO reward scale (> 0).
      desirable_weight: KTO's lambda_D.
      undesirable_weight: KTO's lambda_U.
      buckets: padded training sequence lengths.
      eval: the held-out scoring.
    """

    method: Literal["sft", "kto", "dpo"] = "sft"
    data_run: str = "runs/posttrain/data"
    init_run: str = ""
    student: str = "metafit-small-lm"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    buckets: tuple[int, ...] = (64, 96)
    eval: EvalArgs = field(default_factory=EvalArgs)


@dataclass(frozen=True)
class MergeArgs:
    """Options of ``posttrain_merge``.

    Attributes:
      method: ``linear`` (weighted average of the models) or ``ties`` (TIES over the student).
      runs: run folders whose ``model/`` are merged.
      weights: linear weights, summing to 1 (empty = equal).
      density: TIES density.
      scale: TIES scale.
      data_run: the data run (its prompts are excluded from the held-out set).
      student: the TIES base (the models' common start).
      eval: the held-out scoring.
    """

    method: Literal["linear", "ties"] = "linear"
    runs: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    density: float = 0.2
    scale: float = 1.0
    data_run: str = "runs/posttrain/data"
    student: str = "metafit-small-lm"
    eval: EvalArgs = field(default_factory=EvalArgs)


# ---------------------------------------------------------------------------------------------
# data
def build_dataset(pipeline: PipelineConfig, folder: str | Path, *, seed: int, teacher: str, student: str) -> dict:
    """Runs the pipeline into ``folder`` and writes ``records.json``; returns the pipeline summary."""
    records, summary = run_pipeline(pipeline, folder, seed=seed, load_teacher=lambda: load(teacher),
                                    load_student=lambda: load(student))
    (Path(folder) / RECORDS).write_text(json.dumps(records, indent=1))
    return summary


def load_records(data_run: str | Path) -> list[dict[str, Any]]:
    """The scored dataset of a data run; a clear error when the run is missing or empty."""
    path = Path(data_run) / RECORDS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the data stage first "
                                f"(metafit run configs/posttrain/data.yaml --workdir {data_run})")
    records = json.loads(path.read_text())
    if not records:
        raise ValueError(f"{path} holds no examples; the data stage kept nothing")
    return records


def response(record: dict[str, Any], which: str) -> str:
    """The text of the record's ``best`` or ``worst`` response."""
    return record["scores"][record[which]]["response"]


def check_preference_data(method: str, records: Sequence[dict[str, Any]]) -> None:
    """KTO needs desirable and undesirable examples, DPO at least one pair: else an error before compute."""
    pairs = sum(r["worst"] is not None for r in records)
    if method in ("kto", "dpo") and pairs == 0:
        raise ValueError(f"{method.upper()} needs undesirable examples, but no instruction of the data run has a "
                         "candidate ranked below its best (all candidates equally good); raise pipeline.noise")
    if method == "kto" and not records:
        raise ValueError("KTO needs desirable examples, but the data run has none")


def kto_rows(records: Sequence[dict[str, Any]]) -> tuple[list[Instruction], np.ndarray]:
    """Best responses as desirable rows (1), worst ones as undesirable rows (0)."""
    rows = [Instruction(r["category"], r["prompt"], response(r, "best")) for r in records]
    rows += [Instruction(r["category"], r["prompt"], response(r, "worst")) for r in records if r["worst"]]
    desirable = np.zeros(len(rows), np.float32)
    desirable[:len(records)] = 1.0
    return rows, desirable


def mismatched(rows: Sequence[Instruction], seed: int) -> list[Instruction]:
    """Each row's prompt with another row's response (a derangement: a random cyclic shift order)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    partner = np.empty(len(rows), int)
    partner[order] = np.roll(order, -1)
    return [Instruction(row.task, row.prompt, rows[j].response) for row, j in zip(rows, partner)]


def kto_arrays(tokenizer, records, buckets, seed: int, reference, folder: Path) -> dict[str, np.ndarray]:
    """Encoded KTO rows + mismatched pairs + their cached reference log-probabilities."""
    rows, desirable = kto_rows(records)
    if desirable.min() == 1.0 or desirable.max() == 0.0:
        raise ValueError("KTO needs both desirable and undesirable examples; the data run has "
                         f"{int(desirable.sum())} desirable and {int((1 - desirable).sum())} undesirable")
    own, kl = encode_sft(tokenizer, rows, buckets), encode_sft(tokenizer, mismatched(rows, seed), buckets)
    ref = cached_reference_logprobs(folder / "reference_logp.npz", *reference, {"": own, "kl_": kl})
    return {**own, **{f"kl_{k}": v for k, v in kl.items()}, "desirable": desirable,
            "ref_logp": ref[""], "kl_ref_logp": ref["kl_"]}


def dpo_arrays(tokenizer, records, buckets, reference, folder: Path) -> dict[str, np.ndarray]:
    """Encoded (best, worst) pairs + their cached reference log-probabilities."""
    pairs = [r for r in records if r["worst"]]
    sides = {side: encode_sft(tokenizer, [Instruction(r["category"], r["prompt"], response(r, which)) for r in pairs],
                              buckets) for side, which in (("chosen_", "best"), ("rejected_", "worst"))}
    ref = cached_reference_logprobs(folder / "reference_logp.npz", *reference, sides)
    return {**{f"{s}{k}": v for s, arrays in sides.items() for k, v in arrays.items()},
            **{f"{s}ref_logp": ref[s] for s in sides}}


# ---------------------------------------------------------------------------------------------
# scoring
def eval_sets(args: EvalArgs, records: Sequence[dict[str, Any]]) -> dict[str, list[Instruction]]:
    """``args.n_eval`` held-out instructions per category, none of whose prompts is in the data run."""
    seen = {r["prompt"].strip() for r in records}
    sets: dict[str, list[Instruction]] = {}
    for category in CATEGORIES.names():
        found, offset = [], 0
        while len(found) < args.n_eval and offset < 200 * args.n_eval:
            for ex in make_pool(args.n_eval, seed=args.seed, categories=[category], noise=0.0,
                                duplicate_fraction=0.0, offset=offset):
                if ex.prompt not in seen and len(found) < args.n_eval:
                    seen.add(ex.prompt)
                    found.append(ex.instruction())
            offset += args.n_eval
        sets[category] = found
    return sets


def scorer(graphdef, tokenizer, args: EvalArgs, records) -> InstructionScorer:
    """Per-category exact match and response loss (``<category>_em``, ``mean_em``) on :func:`eval_sets`."""
    return InstructionScorer(graphdef, tokenizer, eval_sets(args, records), (args.bucket,), args.max_new_tokens)


# ---------------------------------------------------------------------------------------------
# stages
def check_stage_settings(args: StageArgs) -> None:
    """The settings alone, checked before the run folder exists (the ``validate`` hook)."""
    check_beta(args.beta)
    for name in ("desirable_weight", "undesirable_weight"):
        if not getattr(args, name) > 0:
            raise ValueError(f"args.{name} must be > 0, got {getattr(args, name)}")
    if args.eval.n_eval < 1:
        raise ValueError(f"args.eval.n_eval must be >= 1, got {args.eval.n_eval}")


def check_stage(args: StageArgs) -> None:
    """The settings and the runs they name (data run, ``init_run``), before any model is loaded."""
    check_stage_settings(args)
    if args.init_run and not (Path(args.init_run) / "model").is_dir():
        raise FileNotFoundError(f"args.init_run: {args.init_run}/model not found; run that stage first")
    check_preference_data(args.method, load_records(args.data_run))


def start_model(args: StageArgs):
    """The starting policy (and reference): ``init_run/model`` or the student."""
    return load(Path(args.init_run) / "model" if args.init_run else args.student)


def stage_data(args: StageArgs, tokenizer, records, seed: int, reference, folder: Path):
    """``(arrays, loss_fn)`` of the stage's method."""
    graphdef = reference[0]
    if args.method == "sft":
        rows = [Instruction(r["category"], r["prompt"], response(r, "best")) for r in records]
        return encode_sft(tokenizer, rows, args.buckets), next_token_loss(graphdef)
    if args.method == "kto":
        return (kto_arrays(tokenizer, records, args.buckets, seed, reference, folder),
                kto_objective(graphdef, beta=args.beta, desirable_weight=args.desirable_weight,
                              undesirable_weight=args.undesirable_weight))
    return dpo_arrays(tokenizer, records, args.buckets, reference, folder), dpo_objective(graphdef, beta=args.beta)


def train_stage(args: StageArgs, train: TrainConfig, run: RunDir, *, seed: int) -> dict[str, dict[str, float]]:
    """Trains the stage through :func:`metafit.train.fit`, saves ``model/``; scores of the start and the result."""
    check_stage(args)
    records = load_records(args.data_run)
    model, tokenizer = start_model(args)
    graphdef, params = nnx.split(model)
    score = scorer(graphdef, tokenizer, args.eval, records)
    rows = {"start": score(model)}
    arrays, loss_fn = stage_data(args, tokenizer, records, seed, (graphdef, params), run.path)
    result = fit(loss_fn, params, epoch_batches(arrays, train.batch_size, seed), train, key=jax.random.key(seed),
                 workdir=run.checkpoint_dir(args.method), log=run.metrics, name=args.method, progress=False)
    nnx.update(model, result.params)
    save_folder(model, run.path / "model", tokenizer)
    rows[args.method] = {**score(model), "train_rows": len(jax.tree.leaves(arrays)[0]),
                         "step_seconds": result.timing.get("step_seconds", float("nan"))}
    return rows


def check_merge_settings(args: MergeArgs) -> None:
    """The settings alone, checked before the run folder exists (the ``validate`` hook)."""
    if args.weights and (len(args.weights) != len(args.runs) or abs(sum(args.weights) - 1) > 1e-6):
        raise ValueError(f"args.weights must give one weight per run and sum to 1, got {list(args.weights)}")
    if args.method == "ties" and not 0 < args.density <= 1:
        raise ValueError(f"args.density must be in (0, 1], got {args.density}")


def check_merge(args: MergeArgs) -> None:
    """The settings and the runs they name, before any model is loaded."""
    check_merge_settings(args)
    if len(args.runs) < 2:
        raise ValueError(f"args.runs: a merge needs at least two run folders, got {list(args.runs)}")
    missing = [r for r in args.runs if not (Path(r) / "model").is_dir()]
    if missing:
        raise FileNotFoundError(f"args.runs: no model/ in {missing}; run those stages first")


def merge_stage(args: MergeArgs, run: RunDir, *, seed: int) -> dict[str, dict[str, float]]:
    """Merges the runs' models (:func:`metafit.merge.linear` or :func:`metafit.merge.ties`), saves and scores it."""
    check_merge(args)
    records = load_records(args.data_run)
    loaded = [load(Path(r) / "model") for r in args.runs]
    model, tokenizer = loaded[0]
    for other, other_tokenizer in loaded[1:]:
        check_same_vocabulary(model, other, tokenizer, other_tokenizer)
    states = [nnx.state(m) for m, _ in loaded]
    if args.method == "linear":
        merged = merge.linear(states, list(args.weights) or None)
    else:
        merged = merge.ties(nnx.state(load(args.student, tokenizer=False)[0]), states, args.density, args.scale)
    nnx.update(model, merged)
    save_folder(model, run.path / "model", tokenizer)
    return {"merge": scorer(nnx.graphdef(model), tokenizer, args.eval, records)(model)}
