"""Prefix tuning (Li & Liang, 2021): P learned key/value vectors per attention module, gated.

The hook (duck-typed: metafit.models never imports metafit.peft). An attention module that
supports prefixes has an attribute ``kv_prefix`` (``None`` by default) and integer attributes
for its key/value head count (``kv_heads`` / ``num_kv_heads``; ``heads`` for plain MHA) and
``head_dim``. After RoPE on k and after any KV-cache write, it calls

    if self.kv_prefix is not None:
        k, v, allowed, bias = self.kv_prefix(k, v, allowed, bias)

with k, v ``[batch, kv_len, kv_heads, head_dim]`` (``seq_axis=2, head_axis=1`` for a
``[batch, heads, len, dim]`` layout), ``allowed`` a boolean mask broadcastable to
``[batch, heads, q_len, kv_len]`` (or None) and ``bias`` an additive pre-softmax bias of that
shape (or None), then attends as usual. :func:`metafit.peft.apply` sets ``kv_prefix`` to a
:class:`KVPrefix` on every such module.

Gating multiplies the prefix's unnormalised attention weights by g: the prefix columns get the
additive score bias ``log g``, so with ``lambda`` the softmax mass on the prefix,

    out = (1 - lambda_g) * attn(x; own keys) + lambda_g * attn(x; prefix),
    lambda_g = g Z_p / (g Z_p + Z_x),   Z_p, Z_x: sums of exp(scores) over prefix / own keys

g = 1 is plain prefix tuning; g = 0 masks the prefix out exactly (base model, zero gradient to
the prefix).
Real tokens keep positions 0..T-1 and the prefix keys are used without RoPE.

Reference:
  Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.peft.core import PeftModule, PrefixParam, check_weights, new_gate

# key/value head counts first: "heads" in a GQA module counts query heads
_HEAD_ATTRS = ("num_kv_heads", "kv_heads", "num_key_value_heads", "n_kv_heads", "num_heads", "heads",
               "num_attention_heads")


def attention_shape(attention: nnx.Module) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` read from a hook-carrying attention module."""
    heads = next((getattr(attention, a) for a in _HEAD_ATTRS if isinstance(getattr(attention, a, None), int)),
                 None)
    head_dim = getattr(attention, "head_dim", None)
    if heads is None or not isinstance(head_dim, int):
        raise TypeError(
            f"{type(attention).__name__} has a kv_prefix hook but no integer 'num_kv_heads' and 'head_dim' "
            "attributes; metafit.peft needs them to size the prefix"
        )
    return heads, head_dim


def _gate_columns(gate: jnp.ndarray) -> jnp.ndarray:
    """Gate ``()``, ``[batch]`` or ``[batch, q_len]`` as ``[batch|1, 1, q_len|1, 1]``."""
    if gate.ndim == 0:
        return gate.reshape(1, 1, 1, 1)
    if gate.ndim == 1:
        return gate.reshape(-1, 1, 1, 1)
    if gate.ndim == 2:
        return gate.reshape(gate.shape[0], 1, gate.shape[1], 1)
    raise ValueError(f"a prefix gate must have shape (), [batch] or [batch, q_len]; got {gate.shape}")


class KVPrefix(PeftModule):
    """Learned prefix keys/values ``[num_prefix, num_kv_heads, head_dim]`` for one attention module."""

    def __init__(self, num_prefix: int, num_kv_heads: int, head_dim: int, *, init_scale: float = 0.02,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None, weights: Mapping[str, Any] | None = None):
        """``rngs`` draws N(0, init_scale^2) values; or ``weights`` gives ``prefix_k``/``prefix_v`` (checked shapes)."""
        shape = (num_prefix, num_kv_heads, head_dim)
        if weights is not None:
            weights = check_weights(weights, {"prefix_k": shape, "prefix_v": shape}, dtype, "KVPrefix")
            keys, values = weights["prefix_k"], weights["prefix_v"]
        elif rngs is None:
            raise ValueError("KVPrefix needs rngs (random init) or weights")
        else:
            keys = init_scale * jax.random.normal(rngs.params(), shape, dtype)
            values = init_scale * jax.random.normal(rngs.params(), shape, dtype)
        self.prefix_k = PrefixParam(keys)
        self.prefix_v = PrefixParam(values)
        self.gate = new_gate()

    def __call__(self, k, v, allowed=None, bias=None, *, seq_axis: int = 1, head_axis: int = 2):
        """Prepends the prefix to ``k``/``v`` and ``num_prefix`` columns to ``allowed``/``bias``.

        Args:
          k, v: ``[batch, kv_len, kv_heads, head_dim]`` (or another order given by the axes).
          allowed: boolean mask broadcastable to ``[batch, heads, q_len, kv_len]`` or None (all allowed).
          bias: additive pre-softmax score bias of that shape, or None.

        Returns:
          ``(k, v, allowed, bias)`` over ``num_prefix + kv_len`` keys; the prefix columns of ``allowed``
          are ``g > 0`` and those of ``bias`` are ``log g`` (0 where ``g = 0``, masked anyway).
        """
        if k.ndim != 4 or {seq_axis, head_axis} != {1, 2}:
            raise ValueError("kv_prefix expects 4-D k/v with (seq_axis, head_axis) = (1, 2) or (2, 1)")
        batch, kv_len, num_prefix = k.shape[0], k.shape[seq_axis], self.prefix_k.shape[0]
        axes = [0, 0, 0, 3]  # transpose [batch, P, heads, dim] into the caller's layout
        axes[seq_axis], axes[head_axis] = 1, 2

        def with_prefix(x, prefix):
            p = jnp.broadcast_to(prefix.get_value().astype(x.dtype)[None], (batch,) + prefix.shape)
            return jnp.concatenate([jnp.transpose(p, axes), x], axis=seq_axis)

        gate = _gate_columns(jnp.asarray(self.gate.get_value(), jnp.float32))
        open_ = gate > 0
        log_gate = jnp.where(open_, jnp.log(jnp.where(open_, gate, 1.0)), 0.0)
        allowed = jnp.ones((1, 1, 1, kv_len), bool) if allowed is None else allowed
        bias = jnp.zeros((1, 1, 1, kv_len), jnp.float32) if bias is None else bias
        return (with_prefix(k, self.prefix_k), with_prefix(v, self.prefix_v),
                _prepend_columns(open_, allowed, num_prefix),
                _prepend_columns(log_gate.astype(bias.dtype), bias, num_prefix))


def _prepend_columns(columns: jnp.ndarray, mask: jnp.ndarray, num_prefix: int) -> jnp.ndarray:
    """``[columns repeated num_prefix times, mask]`` on the last axis; ``columns``: ``[b|1, 1, q|1, 1]``."""
    if mask.ndim != 4:
        raise ValueError(f"kv_prefix expects 4-D masks/biases [batch, heads, q_len, kv_len]; got {mask.shape}")
    batch, _, q_len = jnp.broadcast_shapes((mask.shape[0], 1, mask.shape[2]),
                                           (columns.shape[0], 1, columns.shape[2]))
    heads = mask.shape[1]
    columns = jnp.broadcast_to(columns, (batch, heads, q_len, num_prefix))
    mask = jnp.broadcast_to(mask, (batch, heads, q_len, mask.shape[-1]))
    return jnp.concatenate([columns, mask], axis=-1)
