"""Build metafit's small LM (:mod:`metafit.pretrain.small_lm`) and measure what it learned.

The build is cached by content hash, so this run, ``metafit.models.load("metafit-small-lm")``
and every config that names the model share one build (a run whose model is cached only
evaluates). Results: held-out next-token loss of text and of chats beside the unigram
baseline; per instruction family, greedy exact match (``<task>_em``) and response loss on
instructions drawn from another random stream than the pretraining chats, with the share whose
prompt also occurs in pretraining (``<task>_seen``); exact match on the prompts that do not
(``unseen_em``); one greedy answer (``sample_answer``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flax import nnx

from metafit.data.instructions import INSTRUCTION_TASKS, chat_prompt, make_instructions
from metafit.data.text import TEXT_DATASETS
from metafit.experiments import RunConfig, experiment, plot_curves
from metafit.models import generate, load
from metafit.pretrain.small_lm import SmallLMConfig, build, build_info, heldout_metrics, pretraining_data
from metafit.runs import RunDir
from metafit.train.lm_eval import InstructionScorer, exact_match


@dataclass(frozen=True)
class SmallLMArgs:
    """Options of the small-LM build.

    Attributes:
      small_lm: what to build (corpus, tokenizer, architecture); the run's ``train:`` section
        and ``seed`` are the pretraining schedule and seed.
      n_eval: instructions per task for exact match.
      max_new_tokens: generation budget for exact match and the sample.
      bucket: prompts are left-padded to this length (one compilation).
      sample_prompt: a user message answered greedily into the results.
    """

    small_lm: SmallLMConfig = field(default_factory=SmallLMConfig)
    n_eval: int = 32
    max_new_tokens: int = 8
    bucket: int = 64
    sample_prompt: str = "Write 'planet' in capital letters. Reply with the word only."


def validate(cfg: RunConfig) -> None:
    """Dataset names and evaluation sizes, checked before the run folder exists."""
    args = cfg.args
    for name in args.small_lm.text_datasets:
        TEXT_DATASETS.get(name)  # an unknown name raises with the valid ones
    if args.n_eval < 1 or args.max_new_tokens < 1 or args.bucket < 1:
        raise ValueError(f"args.n_eval, args.max_new_tokens and args.bucket must be >= 1, got "
                         f"{args.n_eval}, {args.max_new_tokens}, {args.bucket}")


@experiment("pretrain_small_lm", config=SmallLMArgs, validate=validate)
def pretrain_small_lm(cfg: RunConfig, run: RunDir) -> dict:
    """Builds (or finds) the small LM, then held-out loss, exact match per task and a sample."""
    args = cfg.args
    folder = build(args.small_lm, train=cfg.train, seed=cfg.seed, workdir=run.checkpoint_dir("pretrain"),
                   log=run.metrics)
    model, tokenizer = load(folder)
    data = pretraining_data(args.small_lm, seed=cfg.seed, tokenizer=tokenizer)
    info = build_info(folder)
    metrics = {"parameters": info["parameters"], "vocab_size": info["vocab_size"],
               "build_seconds": info["seconds"], **heldout_metrics(model, data, args.small_lm.eval_rows)}

    tasks = INSTRUCTION_TASKS.names()
    eval_set = make_instructions(args.n_eval * len(tasks), seed=cfg.seed)
    eval_sets = {task: [ex for ex in eval_set if ex.task == task] for task in tasks}
    scorer = InstructionScorer(nnx.graphdef(model), tokenizer, eval_sets, (args.bucket,), args.max_new_tokens)
    metrics.update(scorer(model))  # <task>_em, <task>_loss (response tokens), mean_em, mean_loss
    pretraining_prompts = {m["content"] for chat in data.corpus.train_chats for m in chat if m["role"] == "user"}
    for task, examples in eval_sets.items():
        metrics[f"{task}_seen"] = float(np.mean([ex.prompt in pretraining_prompts for ex in examples]))
    unseen = [ex for ex in eval_set if ex.prompt not in pretraining_prompts]
    if unseen:
        metrics["unseen_em"] = exact_match(model, tokenizer, unseen, args.max_new_tokens, args.bucket)
        metrics["unseen_prompts"] = len(unseen)

    prompt = tokenizer(chat_prompt(tokenizer, args.sample_prompt), add_special_tokens=False)["input_ids"]
    answer = np.asarray(generate(model, np.asarray(prompt, np.int32), max_new_tokens=args.max_new_tokens))
    metrics["sample_answer"] = tokenizer.decode(answer[len(prompt):], skip_special_tokens=True)

    curve = run.metrics.read("pretrain")
    if curve:  # absent when the model came from the cache
        train = [r for r in curve if r.get("split") == "train"]
        evals = [r for r in curve if r.get("split") == "eval"]
        plot_curves(run.plot_path("pretrain_loss"), {
            "train loss": ([r["step"] for r in train], [r["loss"] for r in train]),
            "held-out text": ([r["step"] for r in evals], [r["heldout_text_loss"] for r in evals]),
            "held-out chats": ([r["step"] for r in evals], [r["heldout_chat_loss"] for r in evals]),
        }, xlabel="step", ylabel="next-token cross-entropy (nats)", title="small LM pretraining")
    return {"metrics": metrics}
