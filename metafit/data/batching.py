"""Host-side batching that is a pure function of the step (so training resumes exactly)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def epoch_batches(arrays: Any, batch_size: int, seed: int) -> Callable[[int], Any]:
    """``batch_at(step)`` over a pytree of arrays sharing a leading example axis.

    Each epoch visits the examples in a fresh permutation drawn from ``(seed, epoch)``;
    a trailing partial batch is dropped so every step has the same shape.

    Raises:
      ValueError: if there are fewer examples than ``batch_size``.
    """
    leaves = jax.tree.leaves(arrays)
    n = len(leaves[0])
    if any(len(leaf) != n for leaf in leaves):
        raise ValueError(f"all arrays need the same number of examples, got {[len(l) for l in leaves]}")
    if n < batch_size:
        raise ValueError(f"{n} examples cannot fill a batch of {batch_size}; lower train.batch_size")
    per_epoch = n // batch_size

    def batch_at(step: int):
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        rows = order[index * batch_size:(index + 1) * batch_size]
        return jax.tree.map(lambda a: np.asarray(a)[rows], arrays)

    return batch_at


def multitask_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Callable[[int], Any]:
    """``batch_at(step)`` over several tasks at once: ``(x [T, b, ...], y [T, b])`` from ``x [T, n, ...], y [T, n]``.

    Every task gets the same rows at each step (one :func:`epoch_batches` permutation over the
    shared example axis ``n``).
    """
    stream = epoch_batches((np.moveaxis(x, 1, 0), y.T), batch_size, seed)

    def batch_at(step: int):
        xb, yb = stream(step)
        return np.moveaxis(xb, 0, 1), yb.T

    return batch_at
