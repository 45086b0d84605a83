"""Few-shot task sets with learn2learn-like ergonomics, sampled on device from a key.

A *task* is a fixed-shape pytree ``Task(support=(x, y), query=(x, y))``; a batch of
tasks is the same pytree with a leading task axis, so learners ``vmap`` over it. A
*task set* bundles three samplers (``train``, ``validation``, ``test``) that are pure,
jittable functions of a PRNG key, so the same key always gives the same task and tasks
can be drawn inside a jitted meta-step. The data layer knows no trainer: the caller wraps
a sampler for :func:`metafit.train.fit` itself,
``DeviceSampler(sampler.batch_fn(num_tasks), data=sampler.data)``.

Example:
    >>> tasksets = get_tasksets("sinusoid", shots=10, queries=10)
    >>> batch = tasksets.train.sample_batch(jax.random.key(0), 25)
    >>> batch.support[0].shape, batch.query[1].shape
    ((25, 10, 1), (25, 10, 1))

Task-set families register a builder in :data:`TASKSETS`; :func:`list_tasksets`
names them and :func:`get_tasksets` validates the arguments before building
anything (too many ways or shots for the class pool, zero queries, unknown names).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from metafit.registry import Registry

Array = jax.Array


class Task(NamedTuple):
    """One few-shot task (or a batch of them, with a leading task axis).

    Attributes:
      support: ``(x, y)`` the learner adapts on; ``x: [n_support, *input_shape]``.
      query: ``(x, y)`` the adapted learner is scored on.
    """

    support: tuple[Array, Array]
    query: tuple[Array, Array]


@dataclasses.dataclass(frozen=True)
class TaskSampler:
    """Draws tasks of one split; ``fn(data, key) -> Task`` is pure and jittable.

    Attributes:
      fn: the single-task sampler.
      split: ``"train"``, ``"validation"`` or ``"test"``.
      data: arrays the sampler reads (e.g. an image pool), passed to ``fn`` as an
        argument so that eager sampling jits without baking them in as constants.
    """

    fn: Callable[[Any, Array], Task]
    split: str
    data: Any = None

    def sample(self, key: Array) -> Task:
        """One task, a pure function of ``key``."""
        return _sample_one(self.fn, self.data, key)

    def sample_batch(self, key: Array, num_tasks: int) -> Task:
        """``num_tasks`` independent tasks stacked on a leading axis (``vmap`` over split keys)."""
        return _sample_batch(self.fn, self.data, key, num_tasks)

    def batch_fn(self, num_tasks: int) -> Callable[..., Task]:
        """``(key, data=None) -> Task``: ``num_tasks`` tasks drawn from ``data`` (this split's
        :attr:`data`), a pure function for :class:`metafit.train.DeviceSampler`, which passes
        ``data`` to the compiled step as an argument instead of baking the arrays in::

            DeviceSampler(sampler.batch_fn(25), data=sampler.data)
        """
        return bound(_sample_from, self.fn, num_tasks)


@functools.lru_cache(maxsize=256)
def bound(fn: Callable[..., Any], /, *args: Any, **options: Any) -> functools.partial:
    """``functools.partial(fn, *args, **options)``, the *same* object for equal arguments.

    Samplers are static arguments of jitted functions (:func:`_sample_batch`) and keys of the
    trainer's step cache, which compare partials by identity: a fresh partial per
    :func:`get_tasksets` call would compile the same sampler again for every task set built with
    equal options (each learner of ``meta_compare``, each evaluation helper).
    """
    return functools.partial(fn, *args, **options)


def _sample_from(fn, num_tasks, key, data=None):  # data=None: a task set without arrays (sinusoid)
    return _sample_batch(fn, data, key, num_tasks)


@functools.partial(jax.jit, static_argnums=0)
def _sample_one(fn, data, key):
    return fn(data, key)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sample_batch(fn, data, key, num_tasks):
    return jax.vmap(fn, in_axes=(None, 0))(data, jax.random.split(key, num_tasks))


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """A named few-shot benchmark: samplers for the three splits plus its shapes.

    Attributes:
      name: registered task-set name.
      kind: ``"regression"`` (MSE, targets ``[n, output_dim]``) or ``"classification"``
        (integer labels in ``[0, ways)``, cross-entropy).
      ways: classes per task (1 for regression).
      shots: support examples per class (per task for regression).
      queries: query examples per class (per task for regression).
      input_shape: shape of one input, e.g. ``(1,)`` or ``(28, 28, 1)``.
      output_dim: network outputs: ``ways`` for classification, target size for regression.
      train, validation, test: the samplers.
      info: free-form facts about the set (class counts, split sizes, sources).
    """

    name: str
    kind: Literal["regression", "classification"]
    ways: int
    shots: int
    queries: int
    input_shape: tuple[int, ...]
    output_dim: int
    train: TaskSampler
    validation: TaskSampler
    test: TaskSampler
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> TaskSampler:
        """The sampler of split ``name`` (``train``, ``validation`` or ``test``)."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split '{name}'; valid splits: train, validation, test")
        return getattr(self, name)


TaskSetBuilder = Callable[..., TaskSet]
TASKSETS: Registry[TaskSetBuilder] = Registry("taskset")


def list_tasksets() -> list[str]:
    """Names accepted by :func:`get_tasksets`."""
    return TASKSETS.names()


def get_tasksets(name: str, ways: int | None = None, shots: int = 5, queries: int = 15, **options: Any) -> TaskSet:
    """Builds the task set ``name`` with ``ways``-way ``shots``-shot tasks and ``queries`` query points.

    Args:
      name: a name from :func:`list_tasksets`.
      ways: classes per task (classification; ``None`` = the family's default, 5 for
        classification and 1 for regression, where only 1 is allowed).
      shots: support examples per class (per task for regression); >= 1.
      queries: query examples per class (per task for regression); >= 1.
      **options: family-specific options (e.g. ``outlier_fraction`` for
        ``sinusoid_hetero``, ``image_size`` for ``glyphs``).

    Returns:
      A :class:`TaskSet`.

    Raises:
      UnknownNameError: unknown ``name``.
      ValueError: non-positive sizes, or more ways/shots+queries than the class pool holds.
    """
    builder = TASKSETS.get(name)
    for label, value in (("shots", shots), ("queries", queries)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{name}: {label} must be a positive integer, got {value!r}"
                + (" (the meta-loss is computed on the query set, so it cannot be empty)" if label == "queries" else "")
            )
    if ways is not None and (not isinstance(ways, int) or ways < 1):
        raise ValueError(f"{name}: ways must be a positive integer, got {ways!r}")
    return builder(ways=ways, shots=shots, queries=queries, **options)


def check_class_pool(name: str, split: str, num_classes: int, per_class: int, ways: int, shots: int,
                     queries: int) -> None:
    """Raises a ``ValueError`` saying what to change if a split cannot supply the requested tasks."""
    if ways > num_classes:
        raise ValueError(
            f"{name}: ways={ways} but the {split} split has only {num_classes} classes; use ways <= {num_classes}"
        )
    if shots + queries > per_class:
        raise ValueError(
            f"{name}: shots + queries = {shots} + {queries} = {shots + queries} but each class of the {split} "
            f"split has only {per_class} examples; lower shots or queries so that shots + queries <= {per_class}"
        )


def sample_classification_task(key: Array, pool: Array, ways: int, shots: int, queries: int,
                               transform: Callable[[Array, Array], Array] | None = None) -> Task:
    """An N-way K-shot task from an image pool ``[num_classes, per_class, *shape]``.

    Classes are drawn without replacement and relabelled ``0..ways-1`` in random
    order; examples within a class are drawn without replacement, the first
    ``shots`` go to the support set and the next ``queries`` to the query set.

    Args:
      key: PRNG key (the task is a pure function of it).
      pool: examples grouped by class.
      ways, shots, queries: task sizes (validated by the caller).
      transform: optional ``(key, x[n, *shape]) -> x`` augmentation (e.g. random affine).

    Returns:
      ``Task`` with ``x: [ways * shots, *shape]`` (class-major) and int32 labels.
    """
    class_key, example_key, transform_key = jax.random.split(key, 3)
    num_classes, per_class = pool.shape[:2]
    classes = jax.random.permutation(class_key, num_classes)[:ways]
    example_keys = jax.random.split(example_key, ways)
    picks = jax.vmap(lambda k: jax.random.permutation(k, per_class)[: shots + queries])(example_keys)
    images = pool[classes[:, None], picks]  # [ways, shots + queries, *shape]
    images = images.astype(jnp.float32)
    if transform is not None:
        flat = images.reshape(ways * (shots + queries), *images.shape[2:])
        images = transform(transform_key, flat).reshape(images.shape)
    labels = jnp.broadcast_to(jnp.arange(ways, dtype=jnp.int32)[:, None], (ways, shots + queries))
    support = (_merge_ways(images[:, :shots]), labels[:, :shots].reshape(-1))
    query = (_merge_ways(images[:, shots:]), labels[:, shots:].reshape(-1))
    return Task(support, query)


def sample_scaled_images(pool: Array, key: Array, *, ways: int, shots: int, queries: int) -> Task:
    """:func:`sample_classification_task` on a ``uint8`` pool, images scaled to ``[0, 1]`` float32."""
    task = sample_classification_task(key, pool, ways, shots, queries)
    scale = lambda pair: (pair[0] / 255.0, pair[1])  # noqa: E731
    return Task(scale(task.support), scale(task.query))


def sample_float_images(pool: Array, key: Array, *, ways: int, shots: int, queries: int) -> Task:
    """:func:`sample_classification_task` on a pool already in the inputs' scale (float32, no rescaling)."""
    return sample_classification_task(key, pool, ways, shots, queries)


def pooled_taskset(name: str, pools: dict[str, Any], *, ways: int, shots: int, queries: int,
                   info: dict[str, Any] | None = None,
                   sampler: Callable[..., Task] = sample_scaled_images) -> TaskSet:
    """An N-way K-shot :class:`TaskSet` over per-split pools ``[num_classes, per_class, *shape]``.

    The one builder behind ``digits``, ``glyphs``, ``arrays`` and ``image_folder``: every split is
    checked with :func:`check_class_pool` before any pool goes to the device, then sampled by
    ``sampler`` (``uint8`` pools: :func:`sample_scaled_images`, inputs ``/ 255``; float pools:
    :func:`sample_float_images`).
    """
    for split in ("train", "validation", "test"):
        pool = pools[split]
        check_class_pool(name, split, pool.shape[0], pool.shape[1], ways, shots, queries)
    samplers = {
        split: TaskSampler(bound(sampler, ways=ways, shots=shots, queries=queries), split,
                           jnp.asarray(pools[split]))
        for split in ("train", "validation", "test")
    }
    input_shape = tuple(int(d) for d in pools["train"].shape[2:])
    return TaskSet(name, "classification", ways, shots, queries, input_shape, ways, **samplers, info=info or {})


def _merge_ways(x: Array) -> Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


# The built-in families register themselves on import (they import matplotlib, scipy and
# scikit-learn lazily, so this is cheap); at the bottom because they import this module.
from metafit.data import digits, glyphs, labelled, sinusoid  # noqa: E402,F401
