"""Context awareness after instruction tuning (:mod:`metafit.context`): diagnosis, steering, indicator SFT.

* ``context_nih``: needle-in-a-haystack recall with and without the chat template, an alpha
  sweep of attention steering (with the template), extractive QA and context-free questions per
  arm, user-token attention at the last position and the retrieval head; a heatmap per arm.
  Each arm's scores are written to ``arms/<arm>.json`` when it ends, and a rerun of the same
  folder skips the arms already there.
* ``context_sft``: vanilla vs indicator-conditioned SFT of one model on the same skewed mix,
  same budget; extractive QA and NIH (context tasks, with ``[IND]`` for the indicator arm) and
  context-free instructions and questions before and after.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metafit import context, peft
from metafit.data import context_tasks
from metafit.data.instructions import make_instructions
from metafit.experiments import RunConfig, experiment
from metafit.models import load
from metafit.runs import RunDir


@dataclass(frozen=True)
class NIHArgs:
    """Options of ``context_nih``.

    Attributes:
      model: embedded name, HF folder or GGUF file.
      lengths, depths: the NIH grid (prompt tokens without template; relative needle depth).
      alphas: steering strengths run with the template (1.0 = the unsteered template arm).
      no_template: also run the arm without the chat template (alpha 1).
      n_qa, n_free: extractive-QA and context-free items per arm (0 = skip).
      batch_size, bucket, max_new_tokens: generation batches (one compilation per bucket length).
    """

    model: str = "smollm2-135m-instruct"
    lengths: tuple[int, ...] = (128, 256, 384, 512, 640, 768, 896, 1024)
    depths: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    alphas: tuple[float, ...] = (1.0, 0.95, 0.9, 0.8)
    no_template: bool = True
    n_qa: int = 48
    n_free: int = 48
    batch_size: int = 8
    bucket: int = 128
    max_new_tokens: int = 12


def validate_nih(cfg: RunConfig) -> None:
    """Grid and alphas, checked before the run folder exists."""
    args = cfg.args
    if not args.lengths or not args.depths:
        raise ValueError("args.lengths and args.depths must be non-empty")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise ValueError(f"args.depths must lie in [0, 1], got {list(args.depths)}")
    if any(not 0.0 < a <= 1.0 for a in args.alphas):
        raise ValueError(f"args.alphas must lie in (0, 1] (1 = no steering), got {list(args.alphas)}")
    if min(args.batch_size, args.bucket, args.max_new_tokens) < 1 or min(args.n_qa, args.n_free) < 0:
        raise ValueError("args.batch_size, args.bucket and args.max_new_tokens must be >= 1; n_qa, n_free >= 0")


@experiment("context_nih", config=NIHArgs, validate=validate_nih)
def context_nih(cfg: RunConfig, run: RunDir) -> dict:
    """NIH template vs none, alpha sweep, QA and context-free scores, attention diagnosis."""
    args = cfg.args
    model, tokenizer = load(args.model)
    tests = context_tasks.nih_grid(tokenizer, args.lengths, args.depths, seed=cfg.seed)
    sets = {"qa": context_tasks.extractive_qa(args.n_qa, seed=cfg.seed),
            "free": context_tasks.context_free(args.n_free, seed=cfg.seed)}
    arms = [(f"template_alpha{a:g}", True, a) for a in args.alphas] + ([("no_template", False, 1.0)]
                                                                       if args.no_template else [])
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, bucket=args.bucket)
    methods = {}
    for name, template, alpha in arms:
        methods[name] = context.run_arm(model, tokenizer, tests, sets, run.subdir("arms") / f"{name}.json",
                                        template=template, alpha=alpha, **gen)
        methods[name].pop("nih_answers", None)  # kept in arms/<arm>.json
        grid = np.asarray(methods[name].pop("grid"))
        methods[name]["nih_recall_by_length"] = {str(n): float(r) for n, r in zip(sorted(args.lengths), grid.mean(1))}
        context.nih_heatmap(run.plot_path(f"nih_{name}"), grid, sorted(args.lengths), sorted(args.depths), name)
    probes = [t.prompt for t in tests if t.length == min(args.lengths)]
    return {"methods": methods, "metrics": context.run_diagnosis(model, tokenizer, probes,
                                                                  run.subdir("arms") / "diagnosis.json",
                                                                  batch_size=args.batch_size)}


@dataclass(frozen=True)
class SFTArgs:
    """Options of ``context_sft``.

    Attributes:
      model: the base model (embedded name, HF folder or GGUF file).
      n_train: SFT items; ``context_fraction`` of them extractive QA, the rest context-free.
      beta: s_M threshold for the indicator; ``layer``: scored layer (-1 = middle).
      flag_fraction: if > 0, flag this share of the items with the highest s_M instead of beta.
      lora: LoRA settings, or null for full fine-tuning (the indicator row trains either way).
      n_qa, n_free: held-out QA and context-free items; ``free_tasks``: instruction tasks.
      nih_lengths, nih_depths: the NIH grid of the evaluation (within the model's positions).
      buckets, batch_size, bucket, max_new_tokens: SFT padding and generation.
    """

    model: str = "metafit-small-lm"
    n_train: int = 512
    context_fraction: float = 0.1
    beta: float = 0.6
    flag_fraction: float = 0.0
    layer: int = -1
    lora: peft.LoraConfig | None = None
    n_qa: int = 64
    n_free: int = 48
    free_tasks: tuple[str, ...] = ("upper", "count", "reverse")
    nih_lengths: tuple[int, ...] = (128, 192, 256)
    nih_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    buckets: tuple[int, ...] = (64, 96)
    batch_size: int = 16
    bucket: int = 32
    max_new_tokens: int = 8


def validate_sft(cfg: RunConfig) -> None:
    """Fractions and sizes, checked before the run folder exists."""
    args = cfg.args
    if not 0.0 < args.context_fraction < 1.0:
        raise ValueError(f"args.context_fraction must lie in (0, 1), got {args.context_fraction}")
    if not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"args.beta must lie in [0, 1] (s_M is a share of attention), got {args.beta}")
    if not 0.0 <= args.flag_fraction < 1.0:
        raise ValueError(f"args.flag_fraction must lie in [0, 1) (0 = use beta), got {args.flag_fraction}")
    if args.n_train < cfg.train.batch_size or min(args.n_qa, args.n_free) < 1:
        raise ValueError("args.n_train must be >= train.batch_size and args.n_qa, args.n_free >= 1")


@experiment("context_sft", config=SFTArgs, validate=validate_sft)
def context_sft(cfg: RunConfig, run: RunDir) -> dict:
    """Vanilla vs +indicator SFT on a skewed mix; context and context-free scores of both."""
    args = cfg.args
    base, base_tokenizer = load(args.model)
    tests = context_tasks.nih_grid(base_tokenizer, args.nih_lengths, args.nih_depths, seed=cfg.seed)
    items = context_tasks.skewed_sft_mix(args.n_train, seed=cfg.seed, context_fraction=args.context_fraction,
                                         free_tasks=args.free_tasks)
    scores, flags = context.flag_items(base, base_tokenizer, items, beta=args.beta,
                                       layer=None if args.layer < 0 else args.layer,
                                       fraction=args.flag_fraction or None)
    is_qa = np.asarray([it.task == "qa" for it in items])
    flagging = {"fraction_flagged": float(flags.mean()), "flagged_qa": float(flags[is_qa].mean()),
                "flagged_free": float(flags[~is_qa].mean()), "s_m_qa": float(scores[is_qa].mean()),
                "s_m_free": float(scores[~is_qa].mean())}
    free = [context_tasks.ContextItem(ex.task, ex.prompt, ex.response)
            for ex in make_instructions(args.n_free, seed=cfg.seed + 1000, tasks=args.free_tasks)]
    sets = {"qa": context_tasks.extractive_qa(args.n_qa, seed=cfg.seed + 1000), "free": free}
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, bucket=args.bucket)
    methods = {"base": context.run_arm(base, base_tokenizer, tests, sets, run.subdir("arms") / "base.json", **gen)}
    for arm in ("vanilla", "indicator"):
        model, tokenizer, token_id = context.add_indicator(base, base_tokenizer)
        train_items = context.with_indicators(items, flags if arm == "indicator" else np.zeros_like(flags),
                                              context.INDICATOR)
        path = run.subdir("arms") / f"{arm}.json"
        if not path.exists():
            context.train_sft(model, context.sft_arrays(tokenizer, train_items, args.buckets), cfg.train,
                              token_id=token_id, seed=cfg.seed, lora=args.lora, workdir=run.checkpoint_dir(arm),
                              log=run.metrics)
        methods[arm] = context.run_arm(model, tokenizer, tests, sets, path,
                                       context_indicator=context.INDICATOR if arm == "indicator" else None, **gen)
    for scores_ in methods.values():
        scores_.pop("grid")
        scores_.pop("nih_answers", None)  # kept in arms/<arm>.json
    return {"methods": methods, "metrics": flagging}
