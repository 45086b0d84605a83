"""A plain multi-layer perceptron in Flax NNX (quickstart classifier, meta-learning backbone)."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx


class MLP(nnx.Module):
    """``in -> widths[0] -> ... -> out`` with an activation between layers.

    Args:
      in_features: input size.
      widths: hidden layer sizes.
      out_features: output size.
      activation: elementwise non-linearity (default ReLU).
      rngs: NNX random streams (keyword-only; randomness is explicit).
    """

    def __init__(self, in_features: int, widths: Sequence[int], out_features: int, *,
                 activation: Callable[[jax.Array], jax.Array] = jax.nn.relu, rngs: nnx.Rngs):
        sizes = [in_features, *widths, out_features]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)
