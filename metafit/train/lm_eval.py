"""Scoring a causal LM on instruction sets: greedy exact match and response-token loss.

Instructions come from :mod:`metafit.data.instructions` and have exact answers, so greedy
decoding up to the end-of-turn token, compared with the response string, is a fair metric.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.data.instructions import Instruction, chat_prompt, encode_sft
from metafit.models import generate
from metafit.train.losses import next_token_loss


def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, bucket: int,
                   batch_size: int = 0) -> list[str]:
    """Greedy chat answers of ``model`` to user ``prompts`` (up to the end-of-turn token), stripped.

    Prompts are left-padded to ``max(bucket, longest prompt)`` tokens, so equal buckets share a
    compiled generation; ``batch_size`` > 0 generates that many prompts per call (the last call padded).
    """
    encoded = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(bucket, max(len(p) for p in encoded))
    step = batch_size or len(encoded)
    answers = []
    for start in range(0, len(encoded), step):
        chunk = encoded[start:start + step]
        ids = np.zeros((step, length), np.int32)
        mask = np.zeros_like(ids)
        for i, p in enumerate(chunk + [chunk[-1]] * (step - len(chunk))):
            ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
        out = np.asarray(generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                  max_new_tokens=max_new_tokens))
        answers += tokenizer.batch_decode(out[:len(chunk), length:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def exact_match(model, tokenizer, examples: Sequence[Instruction], max_new_tokens: int, bucket: int) -> float:
    """Share of examples whose greedy answer (up to the end-of-turn token) equals the response.

    Prompts are left-padded to ``max(bucket, longest prompt)`` tokens, so equal buckets share a
    compiled generation.
    """
    answers = greedy_answers(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens, bucket)
    return float(np.mean([a == ex.response for a, ex in zip(answers, examples)]))


@functools.lru_cache(maxsize=32)
def _response_loss(graphdef: nnx.GraphDef):
    """The jitted response-token loss of one architecture, shared by every scorer of it.

    A jit built per scorer would trace and compile again for each scorer (test, validation, a rerun
    in the same process); keyed on the graph definition, they all reuse one program.
    """
    loss_fn = next_token_loss(graphdef)
    return jax.jit(lambda params, batch: loss_fn(params, batch, None)[0])


class InstructionScorer:
    """Per-task exact match and response-token loss of any model with one architecture.

    Args:
      graphdef: the architecture (``nnx.split(model)[0]``) of every model scored.
      tokenizer: its tokenizer (with a chat template).
      eval_sets: ``{task: examples}``.
      buckets: padded sequence lengths of the loss batches; the first is the generation bucket.
      max_new_tokens: generation budget for exact match.

    Calling it on a model returns ``{"<task>_em", "<task>_loss" for each task, "mean_em", "mean_loss"}``.
    """

    def __init__(self, graphdef: nnx.GraphDef, tokenizer, eval_sets: dict[str, list[Instruction]],
                 buckets: Sequence[int], max_new_tokens: int):
        self.tokenizer, self.eval_sets = tokenizer, eval_sets
        self.bucket, self.max_new_tokens = buckets[0], max_new_tokens
        self.batches = {t: jax.tree.map(jnp.asarray, encode_sft(tokenizer, ex, buckets)) for t, ex in eval_sets.items()}
        self.loss = _response_loss(graphdef)

    def __call__(self, model) -> dict[str, float]:
        params = nnx.state(model)
        scores = {}
        for task, examples in self.eval_sets.items():
            scores[f"{task}_em"] = exact_match(model, self.tokenizer, examples, self.max_new_tokens, self.bucket)
            scores[f"{task}_loss"] = float(self.loss(params, self.batches[task]))
        scores["mean_em"] = float(np.mean([scores[f"{t}_em"] for t in self.eval_sets]))
        scores["mean_loss"] = float(np.mean([scores[f"{t}_loss"] for t in self.eval_sets]))
        return scores
