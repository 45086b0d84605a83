"""Losses shared by several methods.

:func:`causal_lm_loss` is the one next-token cross-entropy of metafit's causal LMs (SFT on
instruction responses, the char-level task answers, post-training); :func:`next_token_loss`
wraps it as a trainer loss of an NNX model, :func:`lm_batch_loss` applies it to a batch dict.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the positions where ``loss_mask`` is 1.

    .. math::  L = \\frac{\\sum_{b,t} m_{b,t} \\, (-\\log \\mathrm{softmax}(z_{b,t})_{x_{b,t+1}})}{\\max(1, \\sum_{b,t} m_{b,t})}

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
    nll = -token_logprobs(logits, input_ids)
    mask = loss_mask[:, :-1].astype(jnp.float32)
    count = mask.sum()
    return (nll * mask).sum() / jnp.maximum(count, 1.0), count


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``log softmax(z_{b,t})[x_{b,t+1}]``: the log-probability of each next token, ``[b, s - 1]`` in float32.

    Shared by :func:`causal_lm_loss` (its mean over masked positions) and the per-sequence
    response log-probabilities of preference losses (:func:`metafit.posttrain.sequence_logprob`).
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def lm_batch_loss(logits: jax.Array, batch) -> jax.Array:
    """:func:`causal_lm_loss` of a batch dict (``input_ids``, ``loss_mask``), without the token count."""
    return causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])[0]


def _one_per_graphdef(make_loss):
    """Returns the same loss function object for equal graphdefs, so :func:`metafit.train.fit` compiles it once.

    ``fit`` caches its jitted step by the loss function's identity; a fresh closure per call
    would retrace and recompile an identical step (every SFT stage, every merge expert, every
    test). Equal ``nnx.GraphDef`` s describe the same computation, so they share one closure. A
    graphdef that cannot be hashed (an unhashable static attribute) gets a fresh closure.
    """
    cached = functools.lru_cache(maxsize=64)(make_loss)

    @functools.wraps(make_loss)
    def loss_of(graphdef):
        try:
            hash(graphdef)
        except TypeError:
            return make_loss(graphdef)
        return cached(graphdef)

    return loss_of


@_one_per_graphdef
def next_token_loss(graphdef: nnx.GraphDef):
    """The trainer loss ``(params, batch, key) -> (loss, {"response_tokens": n})`` of an NNX causal LM.

    ``batch`` holds ``input_ids`` and ``loss_mask`` (``[b, s]``, see :func:`causal_lm_loss`) and,
    when sequences are padded, ``attention_mask``: the layout of
    :func:`metafit.data.instructions.encode_sft` and :func:`metafit.data.chars.char_tasks`.
    Equal graphdefs get the same function object (one compilation in :func:`metafit.train.fit`).
    """

    def loss_fn(params, batch, key):
        logits = nnx.merge(graphdef, params)(batch["input_ids"], batch.get("attention_mask"))
        loss, tokens = causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss, {"response_tokens": tokens}

    return loss_fn


@_one_per_graphdef
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
