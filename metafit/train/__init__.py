"""The one trainer: every metafit method trains through :func:`fit`.

A method supplies a loss ``(params, batch, key) -> (loss, metrics)`` (and, if it
needs them, a data stream and a gradient rule); ``fit`` supplies the jitted and
fused step, optimiser, schedules, clipping, gradient accumulation, bf16
compute, periodic eval, ``metrics.jsonl``, progress, Orbax checkpoints with
exact resume, and the non-finite-loss guard.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from metafit.train import TrainConfig, fit
    >>> def loss_fn(w, batch, key):
    ...     x, y = batch
    ...     return jnp.mean((x @ w - y) ** 2), {}
    >>> data = lambda step: (np.ones((8, 2), np.float32), np.ones(8, np.float32))
    >>> result = fit(loss_fn, jnp.zeros(2), data, TrainConfig(steps=50, lr=0.1), key=jax.random.key(0),
    ...              progress=False)
"""
from metafit.train.callbacks import Callback, Snapshots, StatefulData, StepInfo, param_snapshots, unstack
from metafit.train.checkpoint import Checkpointer, CheckpointMismatchError, CheckpointWarning, load_checkpoint
from metafit.train.config import TrainConfig
from metafit.train.loop import (
    DeviceSampler,
    FitResult,
    NonFiniteLossError,
    TrainState,
    combine,
    fit,
    partition,
)
from metafit.train.metrics import MetricsWriter, Progress
from metafit.train.optim import OPTIMIZERS, make_optimizer, make_schedule

__all__ = [
    "TrainConfig", "fit", "FitResult", "DeviceSampler", "TrainState", "NonFiniteLossError",
    "partition", "combine", "make_optimizer", "make_schedule", "OPTIMIZERS", "Checkpointer",
    "CheckpointWarning", "CheckpointMismatchError", "load_checkpoint", "MetricsWriter", "Progress", "Callback", "StepInfo",
    "StatefulData", "Snapshots", "param_snapshots", "unstack",
]
