"""Losses shared by several methods."""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
