"""The DELIFT comparison: three use cases, every selection arm, the same LoRA fine-tuning, three metrics.

Use cases (generated instruction families: ``families="unseen"``, :mod:`metafit.data.unseen_instructions`,
families the small LM never saw, which is what the configs use; ``"pretraining"``,
:mod:`metafit.data.instructions`, the families the small LM was pretrained on, so fine-tuning on
them barely moves it):

* ``instruction`` -- pool of all families; select with FL; evaluate on held-out pairs of all families;
* ``task`` -- a target set of a few families; select from the mixed pool with FLMI (target
  kernel: utility of pool pairs as demonstrations for target pairs); evaluate on those families;
* ``continual`` -- an existing set of some families; select with FLCG (existing-set kernel: utility
  of existing pairs as demonstrations for pool pairs); train on existing + selected; evaluate on all.

Arms: ``initial`` (no fine-tuning), ``random``, ``selectit``, ``less``, ``deft_ucs``, ``delift_se``,
``fl_only`` (FL on the utility kernel whatever the use case), ``delift``, ``full``
(see :mod:`metafit.select.baselines`). Every trained arm runs the same
:func:`metafit.train.fit` schedule with a fresh LoRA adapter.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from metafit import peft
from metafit.data.batching import epoch_batches
from metafit.data.instructions import INSTRUCTION_TASKS, Instruction, encode_sft, make_instructions
from metafit.data.unseen_instructions import UNSEEN_TASKS, make_unseen
from metafit.train import TrainConfig, fit
from metafit.train.lm_eval import greedy_answers
from metafit.train.losses import next_token_loss

from . import baselines, metrics
from .objectives import budget_of, facility_location, flcg, flmi
from .utility import as_pair, pair_distances, similarity_from_utility

USE_CASES = ("instruction", "task", "continual")
FAMILY_SETS = {"pretraining": INSTRUCTION_TASKS, "unseen": UNSEEN_TASKS}
ARMS = ("initial", "random", "selectit", "less", "deft_ucs", "delift_se", "fl_only", "delift", "full")
_SIDE_OFFSET = 1_000_000  # generator indices of the target/existing and eval sets, apart from the pool's


@dataclasses.dataclass(frozen=True)
class Sets:
    """The pairs of one use case: ``side`` is the target (task) or existing (continual) set."""

    pool: list[Instruction]
    side: list[Instruction]
    eval: list[Instruction]


def check_families(families: str, tasks: Sequence[str], side_tasks: Sequence[str], mix: Sequence[float]) -> None:
    """Raises ValueError, before any compute, for a family set, family or mix the generators cannot make."""
    if families not in FAMILY_SETS:
        raise ValueError(f"families must be one of {tuple(FAMILY_SETS)}, got {families!r}")
    known = FAMILY_SETS[families].names()
    unknown = [t for t in (*tasks, *side_tasks) if t not in known]
    if unknown:
        raise ValueError(f"instruction families {unknown} are not in the {families!r} set; choose from {known}")
    if mix and families != "unseen":
        raise ValueError("mix (uneven family weights) needs families 'unseen'; leave it empty for 'pretraining'")
    if mix and len(mix) != len(tasks or known):
        raise ValueError(f"mix has {len(mix)} weights for {len(tasks or known)} families {list(tasks or known)}")


def family_pairs(families: str, n: int, *, seed: int, tasks: Sequence[str] | None = None,
                 mix: Sequence[float] | None = None, offset: int = 0) -> list[Instruction]:
    """``n`` generated pairs of the family set ``families`` (``mix``: uneven weights, ``unseen`` only)."""
    check_families(families, tasks or (), (), mix or ())
    if families == "unseen":
        return make_unseen(n, seed=seed, tasks=tasks, mix=mix or None, offset=offset)
    return make_instructions(n, seed=seed, tasks=tasks, offset=offset)


def use_case_sets(use_case: str, *, n_pool: int, n_side: int, n_eval: int, seed: int,
                  side_tasks: Sequence[str] = ("reverse", "sort"), pool: list[Instruction] | None = None,
                  families: str = "pretraining", tasks: Sequence[str] | None = None,
                  mix: Sequence[float] | None = None) -> Sets:
    """Pool, side set and evaluation set of a use case (``pool`` given = a user's own pairs).

    The pool draws ``tasks`` (default: every family of the set) with weights ``mix`` (default: in
    turn); the side set and the evaluation set take their families in turn, so every family weighs
    the same in the score however rare it is in the pool.
    """
    if use_case not in USE_CASES:
        raise ValueError(f"use_case must be one of {USE_CASES}, got {use_case!r}")
    pairs = lambda n, task_names, offset, weights=None: family_pairs(  # noqa: E731
        families, n, seed=seed, tasks=task_names, mix=weights, offset=offset)
    pool = pool if pool is not None else pairs(n_pool, tasks, 0, mix)
    side = pairs(n_side, side_tasks, _SIDE_OFFSET) if use_case != "instruction" else []
    eval_tasks = side_tasks if use_case == "task" else tasks
    return Sets(pool, side, pairs(n_eval, eval_tasks, 2 * _SIDE_OFFSET))


def read_pairs(path: str | Path) -> list[Instruction]:
    """``{"instruction": ..., "response": ...}`` per line of a JSONL file.

    Raises:
      ValueError: a line that is not such an object (named with its line number), or no pairs.
    """
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            instruction, response = as_pair(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'instruction' and 'response' "
                             f"strings ({err})") from err
        pairs.append(Instruction(str(record.get("task", "user")), instruction, response))
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


def write_pairs(path: str | Path, pairs: Sequence[Instruction], answers: Sequence[str] | None = None) -> None:
    """Writes pairs as JSONL (the format :func:`read_pairs` reads), each with the model's ``answer`` if given."""
    if answers is not None and len(answers) != len(pairs):
        raise ValueError(f"{len(answers)} answers for {len(pairs)} pairs: give one answer per pair")
    with open(path, "w", encoding="utf-8") as out:
        for index, pair in enumerate(pairs):
            record = {"instruction": pair.prompt, "response": pair.response, "task": pair.task}
            if answers is not None:
                record["answer"] = answers[index]
            out.write(json.dumps(record) + "\n")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Similarities the arms select with (``side`` entries are ``[n_pool, n_side]`` or None)."""

    utility: np.ndarray
    utility_side: np.ndarray | None
    uncertainty: np.ndarray
    embedding: np.ndarray
    embedding_side: np.ndarray | None
    pool_embeddings: np.ndarray


def kernels(model, tokenizer, encoder, encoder_tokenizer, sets: Sets, use_case: str, *, workdir: Path,
            block: int, cache_dir: Path | None = None) -> Kernels:
    """Utility kernels (resumable under ``workdir``, or shared under ``cache_dir``) and sentence-embedding
    kernels of a use case."""
    def distances(queries, examples, name):
        where = dict(cache_dir=cache_dir) if cache_dir is not None else dict(workdir=workdir / name)
        return pair_distances(model, tokenizer, queries, examples, block=block, **where)

    bare, joined = distances(sets.pool, sets.pool, "pool")
    utility = similarity_from_utility(bare[0][:, None] - joined[0])
    side = None
    if use_case == "task":  # how well pool pair j serves target pair q, transposed to [pool, target]
        b, j = distances(sets.side, sets.pool, "side")
        side = similarity_from_utility(b[0][:, None] - j[0]).T
    elif use_case == "continual":  # how well existing pair k serves pool pair i: [pool, existing]
        b, j = distances(sets.pool, sets.side, "side")
        side = similarity_from_utility(b[0][:, None] - j[0])
    texts = lambda pairs: [f"{p.prompt} {p.response}" for p in pairs]  # noqa: E731
    pool_emb = metrics.embed_texts(encoder, encoder_tokenizer, texts(sets.pool))
    side_emb = None if not sets.side else baselines.embedding_kernel(
        pool_emb, metrics.embed_texts(encoder, encoder_tokenizer, texts(sets.side)))
    return Kernels(utility, side, bare[1], baselines.embedding_kernel(pool_emb), side_emb, pool_emb)


def _submodular(use_case: str, kernel, side, budget: int) -> np.ndarray:
    if use_case == "task":
        return flmi(kernel, side, budget)
    if use_case == "continual":
        return flcg(kernel, side, budget)
    return facility_location(kernel, budget)


def select_arm(arm: str, use_case: str, k: Kernels, budget: int, *, seed: int,
               less_features: tuple[np.ndarray, np.ndarray | None] | None = None) -> np.ndarray:
    """Pool indices chosen by ``arm`` (``full``: all; ``initial``: none)."""
    n = len(k.utility)
    if arm == "full":
        return np.arange(n)
    if arm == "initial":
        return np.arange(0)
    if arm == "random":
        return baselines.random_subset(n, budget, key=jax.random.key(seed))
    if arm == "selectit":
        return baselines.self_uncertainty_subset(k.uncertainty, budget)
    if arm == "less":
        return baselines.gradient_subset(less_features[0], budget, less_features[1])
    if arm == "deft_ucs":
        return baselines.kmeans_subset(k.pool_embeddings, budget, seed=seed)
    if arm == "delift_se":
        return _submodular(use_case, k.embedding, k.embedding_side, budget)
    if arm == "fl_only":
        return facility_location(k.utility, budget)
    if arm == "delift":
        return _submodular(use_case, k.utility, k.utility_side, budget)
    raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")


def sft_and_score(model, tokenizer, train: list[Instruction], evaluate: list[Instruction], *, lora: peft.LoraConfig,
                  train_config: TrainConfig, seed: int, encoder, encoder_tokenizer, buckets: Sequence[int],
                  max_new_tokens: int, workdir: Path | None = None, log=None) -> tuple[dict[str, float], list[str]]:
    """LoRA SFT on ``train`` (none: the model as is), then ROUGE-L, exact match and embedding similarity.

    Returns the scores (with ``<family>_em``, exact match per family, when ``evaluate`` mixes families)
    and the greedy answers, one per ``evaluate`` pair."""
    model = nnx.clone(model)
    if train:
        peft.apply(model, lora, rngs=nnx.Rngs(seed))
        graphdef, params = nnx.split(model)
        batch_size = min(train_config.batch_size, len(train))
        data = epoch_batches(encode_sft(tokenizer, train, buckets), batch_size, seed)
        result = fit(next_token_loss(graphdef), params, data, dataclasses.replace(train_config, batch_size=batch_size),
                     key=jax.random.key(seed), workdir=workdir, trainable=peft.trainable_mask(params), progress=False, log=log)
        nnx.update(model, result.params)
    answers = greedy_answers(model, tokenizer, [ex.prompt for ex in evaluate], max_new_tokens, buckets[0])
    references = [ex.response for ex in evaluate]
    scores = {"rouge_l": metrics.rouge_l(answers, references), "exact_match": metrics.exact_match_rate(answers, references),
              "embedding_similarity": metrics.embedding_similarity(answers, references, encoder, encoder_tokenizer),
              "train_size": float(len(train))}
    return {**scores, **exact_match_by_family(evaluate, answers)}, answers


def exact_match_by_family(evaluate: Sequence[Instruction], answers: Sequence[str]) -> dict[str, float]:
    """``{"<family>_em": rate}`` in order of first appearance; empty when every pair is of one family."""
    by_family: dict[str, tuple[list[str], list[str]]] = {}
    for pair, answer in zip(evaluate, answers):
        predictions, references = by_family.setdefault(pair.task, ([], []))
        predictions.append(answer)
        references.append(pair.response)
    if len(by_family) < 2:
        return {}
    return {f"{family}_em": metrics.exact_match_rate(*pairs) for family, pairs in by_family.items()}


def run_arms(model, tokenizer, encoder, encoder_tokenizer, sets: Sets, use_case: str, *, arms: Sequence[str],
             budget_fraction: float, lora: peft.LoraConfig, train_config: TrainConfig, seed: int, folder: Path,
             block: int = 64, buckets: Sequence[int] = (64,), max_new_tokens: int = 8, less_dim: int = 256,
             log=None, utility_cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """Selects with every arm, writes ``selected_<arm>.jsonl`` to ``folder``, fine-tunes and scores each
    (its held-out answers in ``answers_<arm>.jsonl``).

    The utility tiles live in ``folder/utility`` (a rerun resumes them), or in ``utility_cache``, one
    folder per kernel shared with every run that needs the same one; checkpoints in
    ``folder/checkpoints/<arm>``.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {ARMS}")
    budget = budget_of(budget_fraction, len(sets.pool))
    k = kernels(model, tokenizer, encoder, encoder_tokenizer, sets, use_case, workdir=folder / "utility", block=block,
                cache_dir=utility_cache)
    less = None
    if "less" in arms:
        key = jax.random.key(seed)
        pool_features = baselines.gradient_features(model, tokenizer, sets.pool, lora=lora, dim=less_dim, key=key,
                                                    buckets=buckets)
        target = baselines.gradient_features(model, tokenizer, sets.side, lora=lora, dim=less_dim, key=key,
                                             buckets=buckets) if use_case == "task" else None
        less = (pool_features, target)
    existing = sets.side if use_case == "continual" else []
    results = {}
    for arm in arms:
        chosen = select_arm(arm, use_case, k, budget, seed=seed, less_features=less)
        subset = [sets.pool[i] for i in chosen]
        write_pairs(folder / f"selected_{arm}.jsonl", subset)
        scores, answers = sft_and_score(model, tokenizer, existing + subset, sets.eval, lora=lora,
                                        train_config=train_config, seed=seed, encoder=encoder,
                                        encoder_tokenizer=encoder_tokenizer, buckets=buckets,
                                        max_new_tokens=max_new_tokens, workdir=folder / "checkpoints" / arm, log=log)
        write_pairs(folder / f"answers_{arm}.jsonl", sets.eval, answers)
        results[arm] = {**scores, "selected": float(len(chosen))}
    return results
