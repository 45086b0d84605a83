"""Losses shared by several methods."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the positions where ``loss_mask`` is 1.

    Position ``t`` of ``logits`` predicts token ``t + 1``; ``loss_mask[:, t]`` says
    whether that prediction counts (e.g. response tokens only, as built by
    :func:`metafit.data.instructions.encode_sft`).

    Args:
      logits: ``[b, s, vocab]``.
      input_ids: ``[b, s]``.
      loss_mask: ``[b, s]`` (the last column is ignored: nothing follows it).

    Returns:
      ``(mean_nll, number_of_counted_tokens)``.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    mask = loss_mask[:, :-1].astype(jnp.float32)
    count = mask.sum()
    return (nll * mask).sum() / jnp.maximum(count, 1.0), count


def classification_loss(graphdef: nnx.GraphDef) -> Callable[[Any, tuple[jax.Array, jax.Array], Any],
                                                           tuple[jax.Array, dict[str, jax.Array]]]:
    """The mean softmax cross-entropy of the NNX classifier ``graphdef``, as a loss for :func:`metafit.train.fit`.

    ``loss_fn(params, (x, y), key) -> (mean CE, {"accuracy": ...})`` with ``params`` the state
    split off the model (``graphdef, params = nnx.split(model)``), ``y`` integer labels; the
    logits are upcast to float32 and ``key`` is unused.

    Example:
        >>> graphdef, params = nnx.split(MLP(64, (128,), 10, rngs=nnx.Rngs(0)))
        >>> loss, metrics = classification_loss(graphdef)(params, (x, y), None)
    """

    def loss_fn(params, batch, key):
        x, y = batch
        logits = nnx.merge(graphdef, params)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}

    return loss_fn
