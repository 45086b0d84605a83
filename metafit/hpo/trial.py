"""One fine-tuning trial: a point of the search space trained on a task through :func:`metafit.train.fit`.

The schedule is fixed by the point (``steps``, warm-up, cosine decay); the held-out response-token
loss is measured at each fidelity ``k / F`` of the steps, so one full run yields the whole learning
curve. With a ``workdir`` the trial checkpoints at each fidelity and ``stop_at`` pauses it there:
running it again with a later ``stop_at`` resumes the same checkpoint (a promotion), and ends exactly
where an uninterrupted run would. A non-finite loss makes the trial ``failed`` (returned, not raised).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit import peft
from metafit.data.batching import epoch_batches
from metafit.data.instructions import Instruction, encode_sft
from metafit.hpo.space import SearchSpace
from metafit.hpo.tasks import text_meta_features
from metafit.train import NonFiniteLossError, TrainConfig, fit
from metafit.train.losses import next_token_loss

BUCKETS = (64, 96, 128)


@dataclasses.dataclass
class TaskData:
    """A task ready to train on: the base model split once, encoded rows, meta-features."""

    model_name: str
    graphdef: Any
    state: Any
    tokenizer: Any
    train: dict[str, np.ndarray]
    eval: dict[str, jax.Array]
    meta_features: dict[str, float]


@functools.lru_cache(maxsize=2)
def _base_model(model_name: str):
    from metafit.models import load

    model, tokenizer = load(model_name)
    graphdef, state = nnx.split(model)
    return graphdef, state, tokenizer


def prepare_task(model_name: str, train_rows: Sequence[Instruction], eval_rows: Sequence[Instruction],
                 buckets: Sequence[int] = BUCKETS) -> TaskData:
    """Encodes a task's rows for ``model_name`` and computes its meta-features (zero-shot loss included)."""
    graphdef, state, tokenizer = _base_model(model_name)
    features = text_meta_features(tokenizer, train_rows)
    if not eval_rows:
        raise ValueError("a task needs held-out rows (n_eval >= 1): the trials are scored on them")
    train = encode_sft(tokenizer, train_rows, buckets)
    eval_batch = jax.tree.map(jnp.asarray, encode_sft(tokenizer, eval_rows, buckets))
    features["zero_shot_loss"] = float(_eval_loss(graphdef)(state, eval_batch))
    return TaskData(model_name, graphdef, state, tokenizer, train, eval_batch, features)


@functools.lru_cache(maxsize=64)
def _eval_loss(graphdef):
    loss_fn = next_token_loss(graphdef)
    return jax.jit(lambda params, batch: loss_fn(params, batch, None)[0])


def peft_config(point: dict) -> peft.PeftConfig:
    """The PEFT config a point names (its ``peft`` family with its rank/alpha/dropout/targets)."""
    targets = tuple(point["targets"])
    family = point["peft"]
    if family == "ia3":
        return peft.PeftConfig(method="ia3", ia3=peft.IA3Config(
            targets=targets, feedforward=tuple(t for t in targets if t == "down_proj")))
    lora = peft.LoraConfig(rank=int(point["rank"]), alpha=float(point["alpha"]), dropout=float(point["dropout"]),
                           targets=targets, use_dora=family == "dora")
    return peft.PeftConfig(method="lora", lora=lora)


def train_config(space: SearchSpace, point: dict, *, checkpoint: bool) -> TrainConfig:
    """The trainer settings of a point; metrics and (optionally) checkpoints at every fidelity."""
    steps = int(point["steps"])
    every = steps // space.fidelities
    return TrainConfig(steps=steps, batch_size=int(point["batch_size"]), lr=float(point["lr"]), optimizer="adamw",
                       weight_decay=float(point["weight_decay"]), schedule="cosine",
                       warmup_steps=int(round(float(point["warmup"]) * steps)), clip_norm=1.0,
                       eval_every=every, log_every=every, ckpt_every=every if checkpoint else 0, keep_checkpoints=1)


def run_trial(task: TaskData, space: SearchSpace, point: dict, *, seed: int = 0, workdir: str | Path | None = None,
              stop_at: int | None = None, log=None) -> dict[str, Any]:
    """Trains ``point`` on ``task`` up to ``stop_at`` (default: all its steps).

    Returns:
      ``{"status": "ok" | "failed", "curve": {step: eval_loss}, "seconds": wall time, "error": ...}``;
      the curve holds the fidelities reached in this call (a resumed call adds the later ones).
    """
    space.check_point(point)
    model = nnx.merge(task.graphdef, task.state)  # a fresh copy: peft.apply below does not touch the base
    peft.apply(model, peft_config(point), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    loss_fn = next_token_loss(graphdef)
    eval_loss = _eval_loss(graphdef)
    config = train_config(space, point, checkpoint=workdir is not None)
    start = time.perf_counter()
    try:
        result = fit(loss_fn, params, epoch_batches(task.train, config.batch_size, seed), config,
                     key=jax.random.key(seed), workdir=workdir, eval_fn=lambda p: {"eval_loss": eval_loss(p, task.eval)},
                     trainable=peft.trainable_mask(params), stop_at=stop_at, log=log, progress=False)
    except NonFiniteLossError as err:
        return {"status": "failed", "curve": {}, "seconds": time.perf_counter() - start, "error": str(err)}
    curve = {int(e["step"]): float(e["eval_loss"]) for e in result.evals}
    if not all(math.isfinite(v) for v in curve.values()):
        return {"status": "failed", "curve": curve, "seconds": time.perf_counter() - start,
                "error": "non-finite held-out loss"}
    return {"status": "ok", "curve": curve, "seconds": time.perf_counter() - start}
