"""The trainer's configuration (the ``train:`` section of every run config)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

REMAT_POLICIES = ("none", "block", "dots_saveable")  # as metafit.models.remat (no model import here)
MAX_COUNT = 10**9  # steps, batch sizes and periods above this are typos, not experiments


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`metafit.train.fit` optimises a loss.

    Attributes:
      steps: optimiser steps in total.
      batch_size: examples per step (split into ``grad_accum`` micro-batches).
      lr: peak learning rate.
      optimizer: an optax optimiser by name (``adamw``, ``sgd``, ``lion``, ``adafactor``, ...) or a name
        registered in :data:`metafit.train.OPTIMIZERS`.
      optimizer_args: the optimiser's own keyword arguments (e.g. ``{b1: 0.9, b2: 0.95}``),
        checked against its signature before any compute.
      weight_decay: passed as ``weight_decay`` to optimisers that take it (adamw, lamb, lars, ...);
        a non-zero value for one that does not (adam, sgd) is an error, not silently ignored.
      momentum: passed as ``momentum`` to optimisers that take it (sgd, rmsprop, lars) when non-zero;
        non-zero for one that does not is an error.
      schedule: learning-rate schedule after warm-up: constant, cosine or linear decay to 0.
      warmup_steps: linear warm-up from 0 to ``lr``.
      clip_norm: clip gradients to this global norm (0 = no clipping).
      grad_accum: micro-batches per step; gradients are averaged over them.
      precision: dtype the loss is computed in; parameters stay float32.
      eval_every: run ``eval_fn`` every this many steps (0 = only at the end).
      log_every: average and write train metrics every this many steps.
      ckpt_every: save a checkpoint every this many steps (0 = only the final one).
      keep_checkpoints: how many recent checkpoints to keep.
      steps_per_dispatch: optimiser steps fused into one jitted call with ``lax.scan`` (1: no loop).
        Keep 1 for convolutional models on a CPU: XLA runs a convolution inside a loop through a
        slow path there (jax-ml/jax#12868; a Conv4 step 1.0 s alone, 9.6 s as a scan of one step,
        ``benchmarks/meta_task_batching.py``).
      remat: rematerialisation of metafit decoder blocks in the backward pass: ``none`` (keep all
        activations), ``block`` (recompute each block, least memory), ``dots_saveable`` (keep matmul
        outputs, recompute the rest); see :mod:`metafit.models.remat`.
      scan_layers: run the decoder blocks of a metafit Llama-family model as one ``lax.scan`` (one
        block compiled instead of every layer: shorter compilation for deep models); module paths
        are unchanged. Falls back to the unrolled loop when the blocks differ in structure.
    """

    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    weight_decay: float = 0.0
    momentum: float = 0.0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    clip_norm: float = 0.0
    grad_accum: int = 1
    precision: Literal["float32", "bfloat16"] = "float32"
    eval_every: int = 0
    log_every: int = 10
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    steps_per_dispatch: int = 1
    remat: Literal["none", "block", "dots_saveable"] = "none"
    scan_layers: bool = False

    def __hash__(self):  # the trainer caches compiled steps by config; optimizer_args is a dict
        values = [(f, getattr(self, f)) for f in self.__dataclass_fields__ if f != "optimizer_args"]
        return hash((tuple(values), _frozen(self.optimizer_args)))

    def __post_init__(self):
        positive = ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints", "steps_per_dispatch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "momentum", "clip_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"train.{name} must be a finite number >= 0, got {value}")
        for name in ("steps", "batch_size", "eval_every", "log_every", "ckpt_every", "warmup_steps"):
            if getattr(self, name) > MAX_COUNT:
                raise ValueError(f"train.{name}={getattr(self, name)} is above the limit of {MAX_COUNT:.0e}; "
                                 "is a digit too many?")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"train.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum ({self.grad_accum})"
            )


def _frozen(value: Any) -> Any:
    """A hashable copy of YAML values (mappings and lists become sorted/plain tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value
