"""Building blocks shared by every transformer family in :mod:`metafit.models`.

One attention kernel (:func:`attend`), one mask builder (:func:`attention_allowed`), one
KV-cache writer (:func:`update_cache`) and the norms/activations the HF architectures use.
Llama, GPT-2 and BERT only differ in how they project q/k/v and position tokens; the maths
below is written once.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# Scores at disallowed positions. The float32 minimum (what transformers uses) keeps a fully
# masked row finite: its softmax is uniform instead of NaN, and nothing downstream reads it.
MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


class Conv1D(nnx.Linear):
    """``nnx.Linear`` whose HF checkpoint stores the kernel as ``[in, out]`` (GPT-2's ``Conv1D``).

    The maths is exactly ``nnx.Linear`` (``y = x @ kernel + bias``); the subclass only tells the
    checkpoint converter not to transpose the weight, so ``isinstance(m, nnx.Linear)`` still holds
    for LoRA targeting.
    """


class RMSNorm(nnx.Module):
    r"""Root-mean-square norm, :math:`y = w \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}`.

    Computed in float32 and cast back before the weight multiplies, as in HF ``LlamaRMSNorm``,
    so bf16 models round the same way.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    r"""Layer norm with HF parameter names (``weight``, ``bias``).

    :math:`y = w \odot (x - \mu) / \sqrt{\sigma^2 + \epsilon} + b`, statistics in float32.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(x.dtype)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


# HF ``hidden_act`` / ``activation_function`` names -> jax functions. "gelu" is the exact erf
# form; the "new"/"fast"/"pytorch_tanh" variants are all the tanh approximation.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    """The activation HF calls ``name``; unknown names list the supported ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation '{name}'; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def linear(in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs, cls=nnx.Linear):
    """An ``nnx.Linear`` (or subclass) with the HF-style N(0, 0.02) init and the model dtype."""
    if _abstract[-1]:
        return _shape_only(linear, in_features, out_features, bias=bias, dtype=jnp.dtype(dtype), cls=cls)
    return cls(
        in_features,
        out_features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


def output_matrix(lm_head: nnx.Module | None, embedding: nnx.Embed) -> Array | None:
    """The ``[vocab, hidden]`` matrix ``E`` with ``logits = hidden @ E.T`` of an LM head, or None.

    ``lm_head`` None = tied to ``embedding``; a plain bias-free ``nnx.Linear`` head gives its
    transposed kernel. Anything else (a PEFT-wrapped head, a bias) returns None: the caller must
    call the head itself. Used by the chunked training loss (:mod:`metafit.train.losses`).
    """
    if lm_head is None:
        return embedding.embedding[...].astype(embedding.dtype)
    if type(lm_head) is nnx.Linear and lm_head.bias is None:
        return lm_head.kernel[...].astype(lm_head.dtype).T
    return None


def embed(num: int, features: int, *, dtype, rngs: nnx.Rngs) -> nnx.Embed:
    if _abstract[-1]:
        return _shape_only(embed, num, features, dtype=jnp.dtype(dtype))
    return nnx.Embed(
        num, features, dtype=dtype, param_dtype=dtype, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
    )


_abstract = [False]


def abstract_model(build: Callable[[], nnx.Module]) -> nnx.Module:
    """``build()`` with shape-only weights (``jax.ShapeDtypeStruct``): ``nnx.eval_shape(build)``, in linear time.

    ``nnx.eval_shape`` traces the whole constructor as one program, and each random key drawn in
    it (one per projection) has flax read the traced counter's ``sharding``, whose error message
    walks every equation traced so far: time quadratic in the layers (SmolLM2's 30 layers: 2.4 s
    of CPU, against 0.1 s for 2). Here the constructor runs eagerly, and the projections and
    embeddings that :func:`linear` and :func:`embed` make are each traced alone, once per shape.
    Every model family builds its randomly initialised modules through these two; the rest
    (norm weights) is deterministic and only its shape is kept.
    """
    _abstract.append(True)
    try:
        model = build()
    finally:
        _abstract.pop()
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))


@functools.lru_cache(maxsize=None)
def _abstract_module(make: Callable, *args, **kwargs):
    _abstract.append(False)
    try:
        return nnx.split(nnx.eval_shape(lambda: make(*args, **kwargs, rngs=nnx.Rngs(0))))
    finally:
        _abstract.pop()


def _shape_only(make: Callable, *args, **kwargs) -> nnx.Module:
    """A fresh module (its own variables) with the shapes ``make(*args, **kwargs)`` would have."""
    return nnx.merge(*_abstract_module(make, *args, **kwargs), copy=True)


# --------------------------------------------------------------------------------------------
# attention


class KVCache(NamedTuple):
    """Per-layer key/value buffers of fixed length ``max_len``.

    ``keys[i]``/``values[i]``: ``[batch, max_len, kv_heads, head_dim]``. Slot ``j`` holds the
    token that was fed at cache index ``j``; slots not yet written are zeros and are never
    attended to (the causal rule ``key_slot <= query_slot`` excludes them).

    A layer-scanned Llama stack (:func:`metafit.models.remat.scan_blocks`) returns the buffers
    stacked instead, ``keys``/``values`` ``[layers, batch, max_len, kv_heads, head_dim]``;
    ``keys[i]``, ``len(keys)`` and :attr:`max_len` read both forms alike.
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]


def init_cache(num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    zeros = lambda: jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)  # noqa: E731
    return KVCache(tuple(zeros() for _ in range(num_layers)), tuple(zeros() for _ in range(num_layers)))


def stacked_cache(cache: KVCache) -> tuple[Array, Array]:
    """``(keys, values)`` of ``cache`` as ``[layers, ...]`` arrays (stacked once, if given per layer)."""
    return tuple(b if isinstance(b, jax.Array) else jnp.stack(b) for b in (cache.keys, cache.values))


def update_cache(buffer: Array, new: Array, index) -> Array:
    """Writes ``new`` ``[b, s, ...]`` into ``buffer`` ``[b, T, ...]`` at slots ``index .. index+s``."""
    start = (0, index) + (0,) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


def attention_allowed(
    key_mask: Array | None,
    query_slots: Array,
    key_slots: Array,
    *,
    causal: bool,
    window: int | None = None,
) -> Array:
    """Boolean ``[b|1, 1, q, k]``: may query ``i`` attend to key ``j``?

    Args:
      key_mask: ``[b, k]`` (1 = real token, 0 = padding) or None (all keys real).
      query_slots, key_slots: ``[q]`` and ``[k]`` integer sequence slots.
      causal: keys must not come after the query (``key_slot <= query_slot``).
      window: sliding-window size; keys with ``query_slot - key_slot >= window`` are dropped
        (transformers' ``sliding_window`` convention).
    """
    rel = query_slots[:, None] - key_slots[None, :]
    allowed = jnp.ones(rel.shape, bool)
    if causal:
        allowed = rel >= 0
    if window is not None:
        allowed = allowed & (rel < window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & (key_mask[:, None, None, :] != 0)
    return allowed


def attend(
    query: Array,
    key: Array,
    value: Array,
    allowed: Array,
    *,
    scale: float,
    attention_bias: Array | None = None,
    return_probs: bool = False,
) -> tuple[Array, Array | None]:
    r"""Scaled dot-product attention with grouped-query heads and an additive steering bias.

    .. math:: p = \mathrm{softmax}(s \cdot q k^\top + B), \qquad o = p v

    where ``B`` is ``attention_bias`` at allowed positions and :data:`MASKED_SCORE` elsewhere.
    Query head ``h`` uses key/value head ``h // (heads / kv_heads)`` (HF's ``repeat_kv`` order);
    keys are grouped instead of repeated, so GQA costs no copies.

    Args:
      query: ``[b, q, heads, d]``; key, value: ``[b, k, kv_heads, d]``.
      allowed: boolean mask broadcastable to ``[b, heads, q, k]``.
      scale: multiplies the raw scores (``d ** -0.5`` usually).
      attention_bias: optional additive pre-softmax bias broadcastable to ``[b, heads, q, k]``
        (e.g. ``[b, 1, q, k]``), the hook for attention steering.
      return_probs: also return the ``[b, heads, q, k]`` attention probabilities.

    Without a bias and without probabilities (training, scoring, generation) this runs
    :func:`jax.nn.dot_product_attention` (cuDNN's fused kernel on a GPU for 16-bit inputs, XLA's
    otherwise); with either, the explicit einsum path below, which the fused kernels cannot
    serve. Both compute the same function (``tests/models/test_model_attention.py``).

    Returns:
      ``(output [b, q, heads, d_v], probs or None)``.
    """
    if attention_bias is None and not return_probs:
        return fused_attention(query, key, value, allowed, scale=scale), None
    b, q_len, heads, d = query.shape
    k_len, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(b, q_len, kv_heads, groups, d)
    # Scores and softmax in float32 whatever the model dtype: bf16 logits of long rows lose mass.
    scores = jnp.einsum("bqkgd,btkd->bkgqt", grouped, key, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, heads, q_len, k_len) * scale
    if attention_bias is not None:
        scores = scores + attention_bias.astype(jnp.float32)
    # where() after the bias so a large negative steering bias cannot overflow the mask to -inf.
    scores = jnp.where(allowed, scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    grouped_probs = probs.reshape(b, kv_heads, groups, q_len, k_len).astype(value.dtype)
    out = jnp.einsum("bkgqt,btkd->bqkgd", grouped_probs, value)
    return out.reshape(b, q_len, heads, value.shape[-1]), (probs if return_probs else None)


def fused_attention(query: Array, key: Array, value: Array, allowed: Array, *, scale: float) -> Array:
    """``softmax(s q k^T masked by allowed) v`` through :func:`jax.nn.dot_product_attention`.

    cuDNN on a GPU when the inputs are bf16/fp16 (its fused kernels take no fp32), XLA elsewhere;
    if cuDNN refuses the shapes while tracing, XLA's version runs instead. A row with no allowed
    key gets the uniform average of the values, as in :func:`attend` (both mask with a finite
    score, never -inf).
    """
    if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(query, key, value, mask=allowed, scale=scale, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(query, key, value, mask=allowed, scale=scale, implementation="xla")


def sequence_slots(batch_len: int, cache_index) -> Array:
    """Slots ``cache_index .. cache_index + batch_len`` of the tokens fed in this call."""
    return cache_index + jnp.arange(batch_len)


def positions_from_mask(attention_mask: Array) -> Array:
    """Positions ``[b, T]`` that skip padding: the number of real tokens before each slot.

    ``cumsum(mask) - 1`` at real tokens (padding gets 1, as in transformers' ``generate``), so a
    left-padded prompt sees the same positions as the unpadded one. Plain forward calls use slot
    indices instead (transformers' default); :func:`metafit.models.generate` uses this.
    """
    positions = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
    return jnp.where(attention_mask != 0, positions, 1)


def last_token_pool(hidden: Array, input_ids: Array, attention_mask: Array | None, pad_token_id: int | None):
    """Hidden state of the rightmost real token of each row (decoder sequence classification).

    Real tokens come from ``attention_mask`` when given, else ``input_ids != pad_token_id``
    (transformers' rule); with neither the last position is used.
    """
    b, s = input_ids.shape
    if attention_mask is not None:
        real = attention_mask != 0
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return hidden[:, -1]
    index = jnp.argmax(jnp.arange(s)[None, :] * real, axis=-1)
    return hidden[jnp.arange(b), index]
