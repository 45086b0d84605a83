"""Per-sample losses for learning with noisy labels (all pure, jittable, ``[batch]`` outputs).

* :func:`cross_entropy` -- ``-log softmax(z)_ỹ``.
* :func:`consistency_loss` -- CleaR's self-consistency term
  ``-Σ_c softmax(q̂/τ)_c · log softmax(z/τ)_c`` against the model's own stored logits q̂.
* :func:`generalized_cross_entropy` -- GCE (Zhang & Sabuncu, 2018): ``(1 - p_ỹ^q) / q``,
  which is CE as ``q -> 0`` and MAE (noise-tolerant, slow) at ``q = 1``.
* :func:`small_loss_mask` / :func:`coteaching_losses` -- co-teaching (Han et al., 2018):
  each of two networks keeps the ``1 - forget`` fraction of the batch with the smallest
  loss under its peer and trains on those samples only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample ``-log softmax(logits)[label]``; logits ``[b, C]``, labels int ``[b]``."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """Per-sample ``-Σ_c target_c log softmax(logits)_c`` (targets are not differentiated)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jax.lax.stop_gradient(target_probs) * log_probs, axis=-1)


def consistency_loss(logits: jax.Array, stored_logits: jax.Array, temperature: float) -> jax.Array:
    """CleaR's consistency term: CE from ``softmax(q̂/τ)`` to ``softmax(z/τ)``.

    ``q̂`` are the logits the model itself predicted for the sample at the start of the
    epoch (stochastic routing); the term keeps predictions of samples that bypass the
    PEFT modules consistent with what the routed model learned. As in the official
    code there is no ``τ²`` factor.

    Args:
      logits: ``[b, C]`` current logits z.
      stored_logits: ``[b, C]`` stored logits q̂ (treated as constants).
      temperature: τ > 0 (0.5 for adapters, 1.0 for LoRA in the paper's code).
    """
    teacher = jax.nn.softmax(stored_logits.astype(jnp.float32) / temperature, axis=-1)
    return soft_cross_entropy(logits / temperature, teacher)


def generalized_cross_entropy(logits: jax.Array, labels: jax.Array, q: float = 0.7) -> jax.Array:
    """GCE ``(1 - p_ỹ^q) / q`` per sample (Zhang & Sabuncu, NeurIPS 2018); ``q ∈ (0, 1]``.

    Computed from log-probabilities as ``-expm1(q log p) / q`` so it stays accurate
    when ``p_ỹ`` is near 1 and the gradient is exact when it is tiny.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_p = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return -jnp.expm1(q * log_p) / q


def small_loss_mask(losses: jax.Array, keep_fraction: jax.Array | float) -> jax.Array:
    """``1.0`` for the ``round(keep_fraction · b)`` smallest losses of the batch, else ``0.0``.

    ``keep_fraction`` may be a traced value (co-teaching's forget rate follows a schedule),
    so the count is applied through ranks rather than a static ``top_k``. Ties are broken
    by index (a stable sort), and at least one sample is always kept.
    """
    batch = losses.shape[0]
    ranks = jnp.argsort(jnp.argsort(jax.lax.stop_gradient(losses), stable=True), stable=True)
    keep = jnp.maximum(jnp.round(keep_fraction * batch), 1.0)
    return (ranks < keep).astype(jnp.float32)


def coteaching_losses(logits_a: jax.Array, logits_b: jax.Array, labels: jax.Array,
                      keep_fraction: jax.Array | float) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Co-teaching's cross-update: A learns from B's small-loss samples and vice versa.

    Returns:
      ``(loss_a, loss_b, metrics)`` -- scalar mean CE of each network over the samples its
      peer selected, and the peers' selection agreement.
    """
    ce_a, ce_b = cross_entropy(logits_a, labels), cross_entropy(logits_b, labels)
    keep_by_a, keep_by_b = small_loss_mask(ce_a, keep_fraction), small_loss_mask(ce_b, keep_fraction)
    loss_a = jnp.sum(ce_a * keep_by_b) / jnp.sum(keep_by_b)
    loss_b = jnp.sum(ce_b * keep_by_a) / jnp.sum(keep_by_a)
    return loss_a, loss_b, {"selection_agreement": jnp.mean(keep_by_a == keep_by_b)}


def coteaching_keep_fraction(epoch: jax.Array | float, forget_rate: float, ramp_epochs: float) -> jax.Array:
    """Han et al.'s schedule: keep ``1 - forget_rate · min(epoch / ramp_epochs, 1)``."""
    ramp = jnp.minimum(jnp.asarray(epoch, jnp.float32) / max(ramp_epochs, 1e-9), 1.0)
    return 1.0 - forget_rate * ramp
