"""Losses shared by several methods.

:func:`causal_lm_loss` is the one next-token cross-entropy of metafit's causal LMs (SFT on
instruction responses, the char-level task answers, post-training); :func:`next_token_loss`
wraps it as a trainer loss of an NNX model, :func:`lm_batch_loss` applies it to a batch dict.

In training, :func:`next_token_loss` never materialises the ``[b, s, vocab]`` logits: it takes
the final hidden states and the output matrix of the model and computes the log-probabilities
``chunk_tokens`` tokens at a time (:func:`chunked_token_logprobs`), which for a 49k vocabulary
keeps the loss's peak memory at ``chunk_tokens x vocab`` floats instead of ``b x s x vocab``.
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
    return masked_mean_nll(token_logprobs(logits, input_ids), loss_mask)


def masked_mean_nll(logprobs: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean of -logprobs over loss_mask[:, :-1] == 1, count)`` for ``logprobs [b, s - 1]``."""
    mask = loss_mask[:, :-1].astype(jnp.float32)
    count = mask.sum()
    return -(logprobs * mask).sum() / jnp.maximum(count, 1.0), count


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``log softmax(z_{b,t})[x_{b,t+1}]``: the log-probability of each next token, ``[b, s - 1]`` in float32.

    Shared by :func:`causal_lm_loss` (its mean over masked positions) and the per-sequence
    response log-probabilities of preference losses (:func:`metafit.posttrain.sequence_logprob`).
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def chunked_token_logprobs(hidden: jax.Array, output_matrix: jax.Array, input_ids: jax.Array,
                           chunk_tokens: int = 256) -> jax.Array:
    """:func:`token_logprobs` of the logits ``hidden @ output_matrix.T``, never all at once.

    .. math:: \\log p_t = z_{t, x_{t+1}} - \\log\\sum_v e^{z_{t,v}}, \\qquad z_t = h_t E^\\top

    The ``b (s - 1)`` predicting positions are cut into chunks of ``chunk_tokens``; each chunk's
    ``[chunk_tokens, vocab]`` logits live only inside one step of a ``lax.map``. The gradient
    with respect to the hidden states, :math:`\\partial \\log p_t / \\partial h_t =
    (\\mathrm{onehot}(x_{t+1}) - \\mathrm{softmax}(z_t)) E`, is formed in the same pass (it needs
    the chunk's probabilities, which are then gone), so a frozen output matrix costs no second
    vocabulary projection; the gradient for ``E`` itself re-forms each chunk's logits in the
    backward pass (and is dropped by XLA when ``E`` is frozen). Values and gradients equal the
    unchunked :func:`token_logprobs` up to float rounding (``tests/train/test_losses.py``).

    Args:
      hidden: ``[b, s, d]`` final hidden states.
      output_matrix: ``[vocab, d]``, e.g. ``model.output_matrix()`` of a metafit causal LM.
      input_ids: ``[b, s]``.
      chunk_tokens: positions per chunk.

    Returns:
      ``[b, s - 1]`` float32 log-probabilities of the next tokens.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    b, s, d = hidden.shape
    rows = hidden[:, :-1].reshape(-1, d)
    targets = input_ids[:, 1:].reshape(-1)
    n = rows.shape[0]
    chunks = -(-n // chunk_tokens)
    pad = chunks * chunk_tokens - n
    rows = jnp.pad(rows, ((0, pad), (0, 0))).reshape(chunks, chunk_tokens, d)
    targets = jnp.pad(targets, (0, pad)).reshape(chunks, chunk_tokens)
    logprobs = _chunked_logprobs(rows, output_matrix.astype(hidden.dtype), targets)
    return logprobs.reshape(-1)[:n].reshape(b, s - 1)


def _chunk_logits(rows, matrix):
    return jnp.einsum("td,vd->tv", rows, matrix, preferred_element_type=jnp.float32)


def _chunk_forward(matrix, chunk):
    """One chunk: log-probabilities ``[t]`` and their gradient w.r.t. the rows, ``[t, d]``."""
    rows, targets = chunk
    logits = _chunk_logits(rows, matrix)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logprobs = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - lse
    onehot_minus_p = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32) - jnp.exp(logits - lse[:, None])
    grad_rows = (onehot_minus_p.astype(matrix.dtype) @ matrix).astype(rows.dtype)
    return logprobs, grad_rows


@jax.custom_vjp
def _chunked_logprobs(rows, matrix, targets):
    return jax.lax.map(functools.partial(_chunk_forward, matrix), (rows, targets))[0]


def _chunked_logprobs_fwd(rows, matrix, targets):
    logprobs, grad_rows = jax.lax.map(functools.partial(_chunk_forward, matrix), (rows, targets))
    return logprobs, (rows, matrix, targets, grad_rows)


def _chunked_logprobs_bwd(residuals, cotangent):
    rows, matrix, targets, grad_rows = residuals
    d_rows = (cotangent[..., None] * grad_rows.astype(jnp.float32)).astype(rows.dtype)

    def matrix_grad(total, chunk):  # sum_t g_t (onehot_t - p_t)^T h_t, logits re-formed per chunk
        chunk_rows, chunk_targets, g = chunk
        logits = _chunk_logits(chunk_rows, matrix)
        p = jax.nn.softmax(logits, axis=-1)
        weighted = g[:, None] * (jax.nn.one_hot(chunk_targets, logits.shape[-1], dtype=jnp.float32) - p)
        return total + jnp.einsum("tv,td->vd", weighted, chunk_rows.astype(jnp.float32)), None

    d_matrix, _ = jax.lax.scan(matrix_grad, jnp.zeros(matrix.shape, jnp.float32), (rows, targets, cotangent))
    return d_rows, d_matrix.astype(matrix.dtype), None


_chunked_logprobs.defvjp(_chunked_logprobs_fwd, _chunked_logprobs_bwd)


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
    def loss_of(graphdef, *args, **kwargs):
        try:
            hash((graphdef, args, tuple(kwargs.items())))
        except TypeError:
            return make_loss(graphdef, *args, **kwargs)
        return cached(graphdef, *args, **kwargs)

    return loss_of


@_one_per_graphdef
def next_token_loss(graphdef: nnx.GraphDef, chunk_tokens: int = 256):
    """The trainer loss ``(params, batch, key) -> (loss, {"response_tokens": n})`` of an NNX causal LM.

    ``batch`` holds ``input_ids`` and ``loss_mask`` (``[b, s]``, see :func:`causal_lm_loss`) and,
    when sequences are padded, ``attention_mask``: the layout of
    :func:`metafit.data.instructions.encode_sft` and :func:`metafit.data.chars.char_tasks`.
    Models with ``output_matrix()`` (metafit's Llama and GPT-2 LMs with a plain head) get the
    chunked loss (:func:`chunked_token_logprobs`, ``chunk_tokens`` positions at a time); others
    are called for their full logits.
    Equal graphdefs get the same function object (one compilation in :func:`metafit.train.fit`).
    """

    def loss_fn(params, batch, key):
        ids = batch["input_ids"]
        model = nnx.merge(graphdef, params)
        matrix = model.output_matrix() if hasattr(model, "output_matrix") else None
        if matrix is None:
            logprobs = token_logprobs(model(ids, batch.get("attention_mask")), ids)
        else:
            hidden = model.forward(ids, batch.get("attention_mask"), compute_logits=False).hidden_states
            logprobs = chunked_token_logprobs(hidden, matrix, ids, chunk_tokens)
        loss, tokens = masked_mean_nll(logprobs, batch["loss_mask"])
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
