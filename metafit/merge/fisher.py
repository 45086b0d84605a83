"""Diagonal (empirical) Fisher information for Fisher-weighted merging (Matena & Raffel 2022).

    F = (1/n) Σ_i (∇_θ log p(y_i | x_i; θ))²        (elementwise square, per parameter)

computed with one ``vmap`` of per-example gradients. Feed one Fisher per model to
``merge("fisher", None, models, fisher=[F_1, ..., F_M])``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def diagonal_fisher(log_prob: Callable[[PyTree, Any], jax.Array], params: PyTree, examples: Any) -> PyTree:
    """Mean squared per-example score.

    Args:
      log_prob: ``(params, example) -> scalar`` log-likelihood of one example (no batch axis).
      params: the model's parameters (any pytree).
      examples: pytree of arrays with a leading example axis.
    Returns:
      Pytree like ``params`` with the diagonal Fisher.
    """
    scores = jax.vmap(jax.grad(log_prob), in_axes=(None, 0))(params, examples)
    return jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), scores)
