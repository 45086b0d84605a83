"""Outer-loop task weights from per-task meta-gradients (O-AMFS).

Given the meta-gradients ``g_1..g_T`` of a meta-batch, a weighting returns
``w in R^T`` and the meta-gradient becomes ``sum_i w_i g_i`` (uniform weights
``1/T`` give the plain average). Weights are a function of the gradients only and
are not differentiated. Registered in :data:`TASK_WEIGHTINGS`:

* ``uniform``: ``w_i = 1 / T`` (plain meta-learning).
* ``gradient_agreement`` (Eshratifar et al., 2018; the AMFS card's outer loop)::

      w_i = sum_j g_i . g_j / sum_k |sum_j g_k . g_j|

  A task whose gradient agrees with the batch gets a large weight; one that points
  against the consensus gets a small or **negative** weight (the absolute value in the
  denominator is there because numerators can be negative), so the outer step then
  *ascends* that task's query loss. The weights satisfy ``sum_i |w_i| = 1``.
* ``gradient_agreement_clipped``: the same agreements clipped at 0 and renormalised,
  ``w_i = max(a_i, 0) / sum_k max(a_k, 0)`` with ``a_i = sum_j g_i . g_j``: disagreeing
  tasks are dropped instead of ascended (``sum_k a_k = |sum_j g_j|^2 >= 0``, so some
  agreement is positive unless every gradient cancels; then uniform).
* ``softmax_cosine``: ``w = softmax(c / temperature)`` with ``c_i`` the mean cosine
  similarity of ``g_i`` to the other tasks' gradients (a bounded, non-negative variant).

Example:
    >>> grads = {"w": jnp.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])}
    >>> gradient_agreement(grads)   # inner products: rows sum to 1, 1, -1
    Array([ 0.33333334,  0.33333334, -0.33333334], dtype=float32)
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from metafit.registry import Registry

Weighting = Callable[..., jax.Array]
TASK_WEIGHTINGS: Registry[Weighting] = Registry("task-weighting")


def task_gram(grads: Any) -> jax.Array:
    """``G_ij = g_i . g_j`` for per-task gradient trees with a leading task axis, ``[T, T]``."""
    rows = [g.reshape(g.shape[0], -1).astype(jnp.float32) for g in jax.tree.leaves(grads)]
    return sum(r @ r.T for r in rows)


def _num_tasks(grads: Any) -> int:
    return jax.tree.leaves(grads)[0].shape[0]


@TASK_WEIGHTINGS.register("uniform")
def uniform(grads: Any) -> jax.Array:
    """``1 / T`` for every task."""
    num_tasks = _num_tasks(grads)
    return jnp.full((num_tasks,), 1.0 / num_tasks)


@TASK_WEIGHTINGS.register("gradient_agreement")
def gradient_agreement(grads: Any) -> jax.Array:
    """``w_i = sum_j g_i.g_j / sum_k |sum_j g_k.g_j|`` (uniform if every gradient is zero)."""
    agreement = task_gram(grads).sum(axis=1)
    return _normalised_or_uniform(agreement, jnp.abs(agreement).sum(), grads)


@TASK_WEIGHTINGS.register("gradient_agreement_clipped")
def gradient_agreement_clipped(grads: Any) -> jax.Array:
    """``w_i = max(a_i, 0) / sum_k max(a_k, 0)``, ``a_i = sum_j g_i.g_j`` (uniform if no ``a_i > 0``)."""
    positive = jnp.maximum(task_gram(grads).sum(axis=1), 0.0)
    return _normalised_or_uniform(positive, positive.sum(), grads)


def _normalised_or_uniform(scores: jax.Array, total: jax.Array, grads: Any) -> jax.Array:
    """``scores / total``, or uniform weights when ``total`` is 0 (every gradient zero or cancelling);
    the inner ``where`` keeps the unused division finite so its gradient is too."""
    return jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), uniform(grads))


@TASK_WEIGHTINGS.register("softmax_cosine")
def softmax_cosine(grads: Any, temperature: float = 0.1) -> jax.Array:
    """``softmax(mean_{j != i} cos(g_i, g_j) / temperature)``."""
    gram = task_gram(grads)
    num_tasks = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 1e-30))
    cosine = gram / (norms[:, None] * norms[None, :])
    mean_other = (cosine.sum(axis=1) - jnp.diag(cosine)) / max(num_tasks - 1, 1)
    return jax.nn.softmax(mean_other / temperature)


def combine_task_grads(grads: Any, weights: jax.Array) -> Any:
    """``sum_i w_i g_i`` over the leading task axis of every leaf."""
    return jax.tree.map(lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), grads)
