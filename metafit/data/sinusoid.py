"""Sinusoid regression tasks (Finn et al., 2017) and a heterogeneous variant with outlier tasks.

Each task is ``y = A sin(x - phi)`` with ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]`` (the MAML protocol). Tasks are a continuous family, so the
three splits draw from the same distribution with independent key streams
(``fold_in(key, split_id)`` is applied by the caller's key; held-out evaluation uses
its own fixed key, e.g. 600 test tasks from ``jax.random.key(seed + 1)``).

``sinusoid_hetero`` mixes in ``outlier_fraction`` outlier tasks during training and
validation: a random line ``y = a x + b``, a random parabola, or a sinusoid with heavy
Gaussian label noise (``noise_std``), each equally likely. Its *test* split holds clean
sinusoids only, so it measures how well meta-training on contaminated data serves
the real task family -- the setting where weighting tasks by gradient agreement
should help (AMFS card).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from metafit.data.tasks import TASKSETS, Task, TaskSampler, TaskSet, bound

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


def sinusoid_task(key: jax.Array, shots: int, queries: int) -> Task:
    """One clean sinusoid task with ``shots`` support and ``queries`` query points."""
    amp_key, phase_key, x_key = jax.random.split(key, 3)
    amplitude = jax.random.uniform(amp_key, (), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(phase_key, (), minval=PHASE[0], maxval=PHASE[1])
    x = jax.random.uniform(x_key, (shots + queries, 1), minval=INPUT_RANGE[0], maxval=INPUT_RANGE[1])
    y = amplitude * jnp.sin(x - phase)
    return _split(x, y, shots)


def outlier_task(key: jax.Array, shots: int, queries: int, noise_std: float) -> Task:
    """One outlier task: a line, a parabola or a noisy sinusoid, chosen uniformly at random."""
    kind_key, a_key, b_key, c_key, noise_key, sin_key = jax.random.split(key, 6)
    x, y_sin = _concat(sinusoid_task(sin_key, shots, queries))
    a = jax.random.uniform(a_key, (), minval=-2.0, maxval=2.0)
    b = jax.random.uniform(b_key, (), minval=-3.0, maxval=3.0)
    c = jax.random.uniform(c_key, (), minval=-1.0, maxval=1.0)
    line = a * x + b
    parabola = 0.3 * c * (x - b) ** 2 + a
    noisy = y_sin + noise_std * jax.random.normal(noise_key, y_sin.shape)
    kind = jax.random.randint(kind_key, (), 0, 3)
    y = jnp.select([kind == 0, kind == 1], [line, parabola], noisy)
    return _split(x, y, shots)


def hetero_task(key: jax.Array, shots: int, queries: int, outlier_fraction: float, noise_std: float) -> Task:
    """A clean sinusoid with probability ``1 - outlier_fraction``, else an :func:`outlier_task`."""
    coin_key, clean_key, outlier_key = jax.random.split(key, 3)
    clean = sinusoid_task(clean_key, shots, queries)
    outlier = outlier_task(outlier_key, shots, queries, noise_std)
    is_outlier = jax.random.uniform(coin_key) < outlier_fraction
    # both are computed and one is selected: branch-free, so it vmaps over tasks
    return jax.tree.map(lambda o, c: jnp.where(is_outlier, o, c), outlier, clean)


def _split(x: jax.Array, y: jax.Array, shots: int) -> Task:
    return Task(support=(x[:shots], y[:shots]), query=(x[shots:], y[shots:]))


def _concat(task: Task) -> tuple[jax.Array, jax.Array]:
    return (jnp.concatenate([task.support[0], task.query[0]]), jnp.concatenate([task.support[1], task.query[1]]))


def _clean(data, key, *, shots, queries):
    del data  # synthetic: nothing to read
    return sinusoid_task(key, shots, queries)


def _mixed(data, key, *, shots, queries, outlier_fraction, noise_std):
    del data
    return hetero_task(key, shots, queries, outlier_fraction, noise_std)


def _regression_ways(name: str, ways: int | None) -> None:
    if ways not in (None, 1):
        raise ValueError(f"{name} is a regression task set: ways must be 1 (or omitted), got {ways}")


@TASKSETS.register("sinusoid")
def sinusoid(*, ways: int | None, shots: int, queries: int) -> TaskSet:
    """Finn et al. sinusoid regression: ``shots`` support and ``queries`` query points per task."""
    _regression_ways("sinusoid", ways)
    sample = bound(_clean, shots=shots, queries=queries)
    samplers = {split: TaskSampler(sample, split) for split in ("train", "validation", "test")}
    return TaskSet("sinusoid", "regression", 1, shots, queries, (1,), 1, **samplers,
                   info={"amplitude": AMPLITUDE, "phase": PHASE, "x": INPUT_RANGE})


@TASKSETS.register("sinusoid_hetero")
def sinusoid_hetero(*, ways: int | None, shots: int, queries: int, outlier_fraction: float = 0.25,
                    noise_std: float = 2.0) -> TaskSet:
    """Sinusoids with ``outlier_fraction`` outlier tasks in train/validation; clean test tasks."""
    _regression_ways("sinusoid_hetero", ways)
    if not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"sinusoid_hetero: outlier_fraction must be in [0, 1), got {outlier_fraction}")
    if noise_std < 0:
        raise ValueError(f"sinusoid_hetero: noise_std must be >= 0, got {noise_std}")
    mixed = bound(_mixed, shots=shots, queries=queries, outlier_fraction=outlier_fraction,
                              noise_std=noise_std)
    clean = bound(_clean, shots=shots, queries=queries)
    return TaskSet(
        "sinusoid_hetero", "regression", 1, shots, queries, (1,), 1,
        train=TaskSampler(mixed, "train"), validation=TaskSampler(mixed, "validation"),
        test=TaskSampler(clean, "test"),
        info={"outlier_fraction": outlier_fraction, "noise_std": noise_std, "test": "clean sinusoids"},
    )
