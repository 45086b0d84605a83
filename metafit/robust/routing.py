"""CleaR's routing: per-layer, per-sample Bernoulli gates on the PEFT modules.

For sample i and routing group (transformer layer) l,

    g_{i,l} ~ Bernoulli(r · p_i),

where r is the gate rate (the routing probability of a surely-clean sample) and p_i the
sample's clean probability (1 during warm-up). A gated PEFT module computes
``h' = h + g · Δ(h)``: with g = 0 the sample bypasses it and its loss sends no gradient
to that module. All PEFT modules of one layer share the layer's gate (as in the
official code, where the attention-output and FFN-output adapters of a layer read the
same mask).

``per_batch=True`` couples the draws across the batch: one uniform ``u_l`` per layer,
``g_{i,l} = [u_l < r p_i]``. Marginals are unchanged; with p ≡ 1 the whole batch takes
the same path, which is what the official LoRA code does during warm-up.

At inference the gates are either sampled (``stochastic``: Bernoulli(r)), replaced by
their expectation (``expected``: g = r, i.e. the mean update of each layer), or set to
one (``full``: the plain PEFT model).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

InferenceRouting = Literal["stochastic", "expected", "full"]


def routing_gates(key: jax.Array, clean_prob: jax.Array, num_groups: int, rate: float | jax.Array,
                  *, per_batch: bool | jax.Array = False) -> jax.Array:
    """Samples gates ``g[i, l] ~ Bernoulli(rate · clean_prob[i])`` as float32 ``[b, num_groups]``.

    Args:
      key: PRNG key.
      clean_prob: ``[b]`` clean probability of each sample (ones during warm-up).
      num_groups: number of routing groups (transformer layers).
      rate: r, the gate probability of a sample with clean probability 1.
      per_batch: share one uniform per layer across the batch (may be a traced bool).
    """
    batch = clean_prob.shape[0]
    per_sample_u = jax.random.uniform(key, (batch, num_groups))
    shared_u = jnp.broadcast_to(per_sample_u[:1], per_sample_u.shape)
    uniforms = jnp.where(per_batch, shared_u, per_sample_u)
    return (uniforms < rate * clean_prob[:, None]).astype(jnp.float32)


def inference_gates(key: jax.Array, batch: int, num_groups: int, rate: float,
                    mode: InferenceRouting = "stochastic") -> jax.Array:
    """Gates for evaluation: sampled Bernoulli(r), their expectation r, or all ones."""
    if mode == "stochastic":
        return routing_gates(key, jnp.ones((batch,)), num_groups, rate)
    if mode == "expected":
        return jnp.full((batch, num_groups), rate, jnp.float32)
    if mode == "full":
        return jnp.ones((batch, num_groups), jnp.float32)
    raise ValueError(f"unknown inference routing '{mode}'; valid: stochastic, expected, full")
