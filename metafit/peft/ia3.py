"""IA3 (Liu et al., 2022): learned rescaling vectors l (init 1), gated.

    attention-like target:  y = base(x) * (1 + g (l - 1)),   l: [out]
    feed-forward target:    y = base(x * (1 + g (l - 1))),   l: [in]

g = 1 gives plain IA3 (``y = base(x) * l``), g = 0 the base model. As in HF PEFT, the
output rescaling also scales the bias.

Reference:
  Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
  In-Context Learning", NeurIPS 2022.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.peft.core import IA3Param, PeftWrapper, bias_of, filled, kernel_of, new_gate, replace_value


class IA3Linear(PeftWrapper):
    """Gated IA3 around a Linear-like ``base_layer``; ``feedforward`` rescales the input instead."""

    def __init__(self, base_layer: nnx.Module, *, feedforward: bool = False):
        kernel = kernel_of(base_layer).get_value()
        size = kernel.shape[0] if feedforward else kernel.shape[1]
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.ia3_l = IA3Param(filled((size,), kernel.dtype, 1.0))
        self.gate = new_gate()

    def _scale(self, like: jnp.ndarray) -> jnp.ndarray:
        l = self.ia3_l.get_value().astype(like.dtype)
        return 1 + self.gate_like(like) * (l - 1)

    def __call__(self, x, *args, **kwargs):
        if self.feedforward:
            return self.base_layer(x * self._scale(x), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return y * self._scale(y)

    def merged(self) -> nnx.Module:
        gate = self.gate.get_value()
        if gate.ndim != 0:
            raise ValueError(f"cannot merge IA3 with a per-sample gate of shape {gate.shape}")
        bias = bias_of(self.base_layer)
        bias = None if self.feedforward or bias is None else bias.get_value()  # an input rescaling leaves it
        kernel, bias = _merged_weights(kernel_of(self.base_layer).get_value(), bias, self.ia3_l.get_value(), gate,
                                       feedforward=self.feedforward)
        replace_value(self.base_layer, "kernel", kernel)
        if bias is not None:
            replace_value(self.base_layer, "bias", bias)
        return self.base_layer


@functools.partial(jax.jit, static_argnames="feedforward")
def _merged_weights(kernel, bias, l, gate, *, feedforward: bool):
    """Kernel (and bias of an output rescaling) times ``1 + g (l - 1)``: one program per shape, not per operation."""
    scale = 1 + gate * (l - 1)
    if feedforward:
        return kernel * scale[:, None], None
    return kernel * scale[None, :], None if bias is None else bias * scale
