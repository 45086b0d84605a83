"""Optimisers and learning-rate schedules built from a :class:`TrainConfig`."""
from __future__ import annotations

from typing import Callable

import optax

from metafit.registry import Registry
from metafit.train.config import TrainConfig

OPTIMIZERS: Registry[Callable[[TrainConfig, optax.Schedule], optax.GradientTransformation]] = Registry(
    "optimizer"
)


@OPTIMIZERS.register("adamw")
def _adamw(cfg: TrainConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(cfg: TrainConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adam(lr)


@OPTIMIZERS.register("sgd")
def _sgd(cfg: TrainConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.sgd(lr, momentum=cfg.momentum or None)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``cfg.lr`` then constant, cosine or linear decay to zero."""
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(cfg.lr),
        "cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps),
        "linear": optax.linear_schedule(cfg.lr, 0.0, decay_steps),
    }[cfg.schedule]
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optimiser named by ``cfg.optimizer`` with schedule and optional clipping.

    Example:
        >>> tx = make_optimizer(TrainConfig(optimizer="adamw", lr=3e-4, clip_norm=1.0))
    """
    tx = OPTIMIZERS.get(cfg.optimizer)(cfg, make_schedule(cfg))
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
