"""Post-training of metafit's small LM guided by SmolLM2-135M-Instruct (``metafit.posttrain``).

Three experiments, chained through run folders (``configs/posttrain/``):

* ``posttrain_data`` -- the data pipeline (:func:`metafit.posttrain.pipeline.run_pipeline`): dedup,
  teacher categorisation, rare-label drop and balancing, three candidates, scoring, selection.
  Writes ``records.json`` (the scored dataset) and each stage's cache file.
* ``posttrain_train`` -- SFT, KTO or DPO of the student (full fine-tuning) through
  :func:`metafit.train.fit` with the method's loss, starting from the student or from an
  earlier run's ``model/`` (``init_run``: the SFT run for SFT -> KTO, whose weights are then also
  the reference). Writes ``model/`` (HF folder) and per-category exact match of the start and
  the result.
* ``posttrain_merge`` -- a merge of run models through :mod:`metafit.merge` (plain average of two
  SFT seeds, ``0.05 * SFT + 0.95 * (SFT -> KTO)``, TIES over the student), scored the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from metafit.experiments import RunConfig, experiment
from metafit.posttrain import stages
from metafit.posttrain.pipeline import PipelineConfig
from metafit.runs import RunDir


@dataclass(frozen=True)
class DataArgs:
    """Options of ``posttrain_data``.

    Attributes:
      pipeline: the pipeline's settings (pool size, noise, dedup distance, category names, ...).
      teacher: the larger model (embedded name, HF folder or GGUF file).
      student: the small model whose answers are the third candidate.
    """

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    teacher: str = "smollm2-135m-instruct"
    student: str = "metafit-small-lm"


@experiment("posttrain_data", config=DataArgs)
def posttrain_data(cfg: RunConfig, run: RunDir) -> dict:
    """The data pipeline into ``records.json``; its summary (what each stage kept) as the results."""
    summary = stages.build_dataset(cfg.args.pipeline, run.path, seed=cfg.seed, teacher=cfg.args.teacher,
                                   student=cfg.args.student)
    return {"metrics": summary}


@experiment("posttrain_train", config=stages.StageArgs, validate=lambda cfg: stages.check_stage_settings(cfg.args))
def posttrain_train(cfg: RunConfig, run: RunDir) -> dict:
    """SFT, KTO or DPO of the student; per-category exact match of the start and the result."""
    return {"methods": stages.train_stage(cfg.args, cfg.train, run, seed=cfg.seed)}


@experiment("posttrain_merge", config=stages.MergeArgs, validate=lambda cfg: stages.check_merge_settings(cfg.args))
def posttrain_merge(cfg: RunConfig, run: RunDir) -> dict:
    """A merge of run models through :mod:`metafit.merge`, scored per category."""
    return {"methods": stages.merge_stage(cfg.args, run, seed=cfg.seed)}
