"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) after a projection.

The wrapped projection's output h gets a gated residual bottleneck:

    h' = h + g * ( act(h W_down + b_down) W_up + b_up ),   W_down: [d, m], W_up: [m, d]

``W_up = b_up = 0`` at init, so the model equals the base model until trained (Houlsby's
near-identity initialisation). With Bernoulli g this is CleaR's routing
``g (h + A(h)) + (1 - g) h``. Houlsby: after attention-output and FFN-output projections;
Pfeiffer: after the FFN output only (see :class:`metafit.peft.AdapterConfig`).

References:
  Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019.
  Pfeiffer et al., "AdapterFusion", EACL 2021.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.peft.core import AdapterParam, PeftWrapper, filled, kernel_of, new_gate

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


class BottleneckAdapter(PeftWrapper):
    """Gated residual bottleneck applied to ``base_layer``'s output (features = kernel's out dim)."""

    def __init__(self, base_layer: nnx.Module, *, bottleneck: int, activation: str = "gelu",
                 init_scale: float = 1e-2, rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation '{activation}'; valid: {', '.join(ACTIVATIONS)}")
        kernel = kernel_of(base_layer).get_value()
        features, dtype = kernel.shape[1], kernel.dtype
        self.base_layer = base_layer
        self.activation = activation
        self.down = AdapterParam(init_scale * jax.random.normal(rngs.params(), (features, bottleneck), dtype))
        self.down_bias = AdapterParam(filled((bottleneck,), dtype, 0.0))
        self.up = AdapterParam(filled((bottleneck, features), dtype, 0.0))
        self.up_bias = AdapterParam(filled((features,), dtype, 0.0))
        self.gate = new_gate()

    def __call__(self, x, *args, **kwargs):
        h = self.base_layer(x, *args, **kwargs)
        dtype = h.dtype
        z = ACTIVATIONS[self.activation](h @ self.down.get_value().astype(dtype)
                                         + self.down_bias.get_value().astype(dtype))
        z = z @ self.up.get_value().astype(dtype) + self.up_bias.get_value().astype(dtype)
        return h + self.gate_like(z) * z
