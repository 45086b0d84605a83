"""The multi-layer perceptron of metafit (quickstart classifier, merge encoder, meta-learning backbone)."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx


class MLP(nnx.Module):
    """``in -> widths[0] -> ... -> widths[-1] -> out``: a ReLU body (``features``) and a linear ``head``.

    Inputs ``[batch, ...]`` are flattened after the batch axis. The split into a body and a
    linear head is what meta-learners need (ANIL adapts the head alone, ProtoNet and R2-D2
    replace it with a closed form); the layers are attributes ``dense0, dense1, ...`` and
    ``head`` (string names, so checkpoints and tree paths are stable). With ``widths=()`` the
    MLP is one linear layer. Example: the 1-40-40-1 sinusoid regressor of MAML is
    ``MLP(1, (40, 40), 1, rngs=nnx.Rngs(0))``.

    Args:
      in_features: input size (after flattening).
      widths: hidden layer sizes.
      out_features: output size.
      activation: elementwise non-linearity after every hidden layer (default ReLU).
      rngs: NNX random streams (keyword-only; randomness is explicit).
    """

    def __init__(self, in_features: int, widths: Sequence[int], out_features: int, *,
                 activation: Callable[[jax.Array], jax.Array] = jax.nn.relu, rngs: nnx.Rngs):
        sizes = [in_features, *widths]
        self.depth = len(widths)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            setattr(self, f"dense{i}", nnx.Linear(a, b, rngs=rngs))
        self.head = nnx.Linear(sizes[-1], out_features, rngs=rngs)
        self.activation = activation

    def features(self, x: jax.Array) -> jax.Array:
        """The body's output ``[batch, widths[-1]]`` (the flattened input when there is no hidden layer)."""
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = self.activation(getattr(self, f"dense{i}")(x))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))
