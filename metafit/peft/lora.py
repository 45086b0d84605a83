"""LoRA and DoRA around Linear-like modules (``kernel [in, out]``, optional ``bias [out]``).

LoRA (Hu et al., 2021), gated:

    y = base(x) + g * s * dropout(x) A B,      A: [in, r], B: [r, out], s = alpha / r

DoRA (Liu et al., 2024) rescales each output column of the adapted weight to a learned
magnitude m (init: the column norms of W, so DoRA = base at init when B = 0):

    W' = m * (W + s A B) / ||W + s A B||_col,   y = x W' + b
    y  = base(x) + g * [ (m/n - 1) * (x W) + (m/n) * s * dropout(x) A B ],   n = sg(||W + s A B||_col)

The norm n is treated as a constant in the backward pass (``stop_gradient``), as in the
DoRA paper (Sec. 4.3) and HF PEFT, which makes our gradients match theirs.
Layout: ``A = lora_A.weight.T`` and ``B = lora_B.weight.T`` of HF PEFT's torch tensors.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
  Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.peft.core import (DoRAMagnitude, PeftWrapper, bias_of, check_weights, dropout_is_enabled, kernel_of,
                               new_gate, replace_value)


# ----------------------------------------------------------------------------- low-rank products
#
# x A and h B with a rank-r side have ordinary maths but awkward gradients for XLA's CPU backend:
# autodiff writes dA = x^T dh and dB = h^T dy as dots contracting the *leading* (token) axis of a
# large activation. XLA then either transposes the whole activation ([tokens, features], megabytes
# per adapter per step) or falls back from its fast GEMM library (YNNPACK) to a generic dot that
# is 5-10x slower; with LoRA on every projection this cost more than the adapters' own FLOPs
# (0.5x the tokens/s of q,v-only LoRA on SmolLM2-135M). The custom VJPs below transpose the
# *small* [tokens, r] factor instead and hold it in place with an optimisation barrier (XLA
# would otherwise fold the transpose back into the dot), so every product is a plain row-major
# [m, k] @ [k, n] GEMM. Values and gradients are the same maths as autodiff's.


def _rows(x: jax.Array) -> jax.Array:
    """``x [..., d]`` as ``[tokens, d]``."""
    return x.reshape(-1, x.shape[-1])


def _small_transpose(x: jax.Array) -> jax.Array:
    """``x.T`` of a ``[tokens, r]`` matrix, materialised (XLA may not fold it into the next dot)."""
    return jax.lax.optimization_barrier(x.T)


@jax.custom_vjp
def project_down(x: jax.Array, a: jax.Array) -> jax.Array:
    """``x @ a`` for ``x [..., in]``, ``a [in, r]`` with a small r (gradients as GEMMs, see above)."""
    return x @ a


def _project_down_fwd(x, a):
    return x @ a, (x, a)


def _project_down_bwd(residuals, dh):
    x, a = residuals
    dh_t = _small_transpose(_rows(dh))                                   # [r, tokens]
    da = jax.lax.optimization_barrier(dh_t @ _rows(x)).T                 # (dh^T x)^T = x^T dh
    return (dh @ a.T).astype(x.dtype), da.astype(a.dtype)


project_down.defvjp(_project_down_fwd, _project_down_bwd)


@jax.custom_vjp
def project_up(h: jax.Array, b: jax.Array) -> jax.Array:
    """``h @ b`` for ``h [..., r]``, ``b [r, out]`` with a small r (gradients as GEMMs, see above)."""
    return h @ b


def _project_up_fwd(h, b):
    return h @ b, (h, b)


def _project_up_bwd(residuals, dy):
    h, b = residuals
    db = _small_transpose(_rows(h)) @ _rows(dy)                          # h^T dy, [r, out]
    return (dy @ b.T).astype(h.dtype), db.astype(b.dtype)


project_up.defvjp(_project_up_fwd, _project_up_bwd)


LORA_INITS = ("default", "gaussian", "random")


@functools.partial(jax.jit, static_argnames=("init", "d_in", "d_out", "rank", "dtype"))
def _lora_init(key_a, key_b, *, init: str, d_in: int, d_out: int, rank: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Initial ``A [in, r]`` and ``B [r, out]``: one compiled program per shape, not one per operation."""
    if init == "gaussian":
        a = jax.random.normal(key_a, (d_in, rank), dtype) / rank
    else:  # torch kaiming_uniform_(a=sqrt(5)) on a [r, in] weight: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key_a, (d_in, rank), dtype, -bound, bound)
    if init == "random":
        bound = 1.0 / math.sqrt(rank)
        b = jax.random.uniform(key_b, (rank, d_out), dtype, -bound, bound)
    else:
        b = jnp.zeros((rank, d_out), dtype)
    return a, b


def _column_norm(weight: jnp.ndarray) -> jnp.ndarray:
    """L2 norm of each output column of a ``[in, out]`` kernel (= row norm of torch's ``[out, in]``)."""
    return jnp.linalg.norm(weight, axis=0)


# DoRA's initial magnitude and merging run once per wrapped layer, outside any jit: as eager
# operations each would compile one XLA program per operation and kernel shape (3-6 per shape);
# jitted, one per shape. ``scaling`` and ``gate`` are traced, so every alpha and gate shares it.


@jax.jit
def _dora_magnitude(kernel, a, b, scaling):
    """``||W + s A B||_col``: DoRA's initial m, which makes DoRA = base at init when B = 0."""
    return _column_norm(kernel + scaling * a @ b)


@jax.jit
def _merged_kernel(kernel, a, b, scaling, gate, magnitude):
    """``W + g * delta_W`` of LoRA (``magnitude=None``) or DoRA."""
    delta = scaling * (a @ b)
    if magnitude is not None:
        adapted = kernel + delta
        delta = magnitude / _column_norm(adapted) * adapted - kernel
    return kernel + gate * delta


class LoRALinear(PeftWrapper):
    """Gated LoRA / DoRA wrapper; ``base_layer`` is left untouched (its weights stay frozen).

    Args:
      base_layer: a Linear-like module with ``kernel [in, out]``.
      rank, alpha, dropout, use_dora, use_rslora, init: see :class:`metafit.peft.LoraConfig`.
      rngs: ``params`` stream initialises A (and B for ``init="random"``); ``dropout`` stream if dropout > 0.
      weights: start from these values instead of ``init`` (a saved adapter): ``lora_A [in, r]``,
        ``lora_B [r, out]`` and, with ``use_dora``, ``lora_magnitude_vector [out]``; shapes are checked.
        Nothing random is drawn, so no XLA program is compiled for the initialisation.
    """

    def __init__(self, base_layer: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 use_dora: bool = False, use_rslora: bool = False, init: str = "default",
                 rngs: nnx.Rngs, weights: Mapping[str, Any] | None = None):
        kernel = kernel_of(base_layer).get_value()
        d_in, d_out = kernel.shape
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.dropout_rate = dropout
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        if weights is None:
            a, b = self._initial_weights(init, d_in, d_out, kernel.dtype, rngs)
        else:
            shapes = {"lora_A": (d_in, rank), "lora_B": (rank, d_out)}
            if use_dora:
                shapes["lora_magnitude_vector"] = (d_out,)
            weights = check_weights(weights, shapes, kernel.dtype, f"LoRA on a [{d_in}, {d_out}] kernel")
            a, b = weights["lora_A"], weights["lora_B"]
        self.lora_A = nnx.LoRAParam(a)
        self.lora_B = nnx.LoRAParam(b)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.use_dora = use_dora
        if not use_dora:
            self.lora_magnitude_vector = None
        elif weights is not None:
            self.lora_magnitude_vector = DoRAMagnitude(weights["lora_magnitude_vector"])
        else:
            self.lora_magnitude_vector = DoRAMagnitude(_dora_magnitude(kernel, a, b, self.scaling))
        self.gate = new_gate()

    def _initial_weights(self, init, d_in, d_out, dtype, rngs):
        if init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init '{init}'; valid: {', '.join(LORA_INITS)}")
        key_a, key_b = rngs.params(), rngs.params()
        return _lora_init(key_a, key_b, init=init, d_in=d_in, d_out=d_out, rank=self.rank, dtype=dtype)

    def lora_weight(self) -> jnp.ndarray:
        """The low-rank update ``s * A B`` as an ``[in, out]`` matrix."""
        return self.scaling * (self.lora_A.get_value() @ self.lora_B.get_value())

    def __call__(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        h = x if self.dropout is None or not dropout_is_enabled() else self.dropout(x)  # training steps only
        a = self.lora_A.get_value().astype(h.dtype)
        b = self.lora_B.get_value().astype(h.dtype)
        # Gate and scaling multiply the [..., r] factor, r / out of the work of scaling the output;
        # the gate broadcasts from the left, so per-sample and per-token gates work the same.
        down = project_down(h, a)
        if not self.use_dora:
            down = down * (self.scaling * self.gate_like(down))
            return y + project_up(down, b).astype(y.dtype)
        lora = project_up(down, b) * self.scaling
        kernel = kernel_of(self.base_layer).get_value()
        norm = jax.lax.stop_gradient(_column_norm(kernel + self.lora_weight()))
        scale = (self.lora_magnitude_vector.get_value() / norm).astype(h.dtype)
        if h is x:  # no dropout applied: reuse the base matmul, x W = y - b
            bias = bias_of(self.base_layer)
            x_w = y if bias is None else y - bias.get_value().astype(y.dtype)
        else:
            x_w = h @ kernel.astype(h.dtype)
        lora = (scale - 1) * x_w + scale * lora
        return y + (self.gate_like(lora) * lora).astype(y.dtype)

    def merged(self) -> nnx.Module:
        """``base_layer`` with ``W <- W + g * delta_W`` (g must be a scalar gate)."""
        gate = self.gate.get_value()
        if gate.ndim != 0:
            raise ValueError(
                f"cannot merge a LoRA whose gate has shape {gate.shape} (per-sample gates); "
                "call metafit.peft.reset_gates(model) or set a scalar gate first"
            )
        magnitude = self.lora_magnitude_vector.get_value() if self.use_dora else None
        replace_value(self.base_layer, "kernel", _merged_kernel(
            kernel_of(self.base_layer).get_value(), self.lora_A.get_value(), self.lora_B.get_value(), self.scaling,
            gate, magnitude))
        return self.base_layer
