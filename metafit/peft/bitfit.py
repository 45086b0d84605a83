"""BitFit (Ben Zaken et al., 2022): train only bias terms, as a gated offset.

    y = base(x) + g * delta_b,   delta_b = b_trained - b_original,   delta_b = 0 at init

The original bias stays frozen (bit-identical) inside ``base_layer``; only ``delta_b``
(a :class:`metafit.peft.core.BitFitParam`) is trained. This holds for any module whose bias
is added last: Linear, LayerNorm, Conv. g = 1 is plain BitFit, g = 0 the base model.

Reference:
  Ben Zaken, Goldberg, Ravfogel, "BitFit: Simple Parameter-efficient Fine-tuning for
  Transformer-based Masked Language-models", ACL 2022.
"""
from __future__ import annotations

from flax import nnx

from metafit.peft.core import BitFitParam, PeftWrapper, bias_of, filled, kernel_of, new_gate, replace_value


class BitFitBias(PeftWrapper):
    """Gated bias offset on ``base_layer``'s output."""

    def __init__(self, base_layer: nnx.Module):
        bias = bias_of(base_layer)
        if bias is not None:
            value = bias.get_value()
            shape, dtype = value.shape, value.dtype
        else:  # e.g. Llama projections: add a new bias the size of the output
            kernel = kernel_of(base_layer).get_value()
            shape, dtype = kernel.shape[-1:], kernel.dtype
        self.base_layer = base_layer
        self.bias_delta = BitFitParam(filled(shape, dtype, 0.0))
        self.gate = new_gate()

    def __call__(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        delta = self.bias_delta.get_value().astype(y.dtype)
        return y + self.gate_like(y) * delta

    def merged(self) -> nnx.Module:
        gate = self.gate.get_value()
        if gate.ndim != 0:
            raise ValueError(f"cannot merge BitFit with a per-sample gate of shape {gate.shape}")
        bias = bias_of(self.base_layer)
        if bias is None:
            raise TypeError(
                f"{type(self.base_layer).__name__} has no bias to merge the BitFit offset into; "
                "keep the BitFitBias wrapper (it is cheap) or build the base layer with a bias"
            )
        replace_value(self.base_layer, "bias", bias.get_value() + gate * self.bias_delta.get_value())
        return self.base_layer
