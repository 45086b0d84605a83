r"""Preference losses of post-training: KTO and DPO, and the per-sequence log-probabilities they use.

Every ``*_logp`` argument is a per-sequence sum of response-token log-probabilities,
:math:`\log \pi(y \mid x) = \sum_{t \in y} \log \pi(y_t \mid x, y_{<t})`
(:func:`sequence_logprob`), and every reference value comes from a frozen model.

**KTO** (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"). With the
implied reward :math:`r = \log \pi_\theta(y|x) - \log \pi_{ref}(y|x)` and the reference point
:math:`z_0 = \max(0, \widehat{KL}(\pi_\theta \| \pi_{ref}))`, detached,

.. math::
   \ell(x, y) = \begin{cases} \lambda_D \, (1 - \sigma(\beta (r - z_0))) & y \text{ desirable} \\
                              \lambda_U \, (1 - \sigma(\beta (z_0 - r))) & y \text{ undesirable} \end{cases}

and the loss is the batch mean. :math:`\widehat{KL}` (:func:`kto_kl_estimate`) is the mean reward on
*mismatched* pairs :math:`(x_i, y_j)`, :math:`j \ne i`: responses that were not written for the
prompt, as the KTO paper (and TRL) estimate it. At :math:`r = z_0 = 0` each example costs
:math:`\lambda / 2`. This is the paper's :math:`\lambda_y - v(x, y)` with its value function
:math:`v = \lambda_y \sigma(\cdot)`.

**DPO** (Rafailov et al. 2023). For a chosen :math:`y_w` and a rejected :math:`y_l`,

.. math::
   \ell = -\log \sigma\big(\beta [(\log \pi_\theta(y_w|x) - \log \pi_{ref}(y_w|x))
                               - (\log \pi_\theta(y_l|x) - \log \pi_{ref}(y_l|x))]\big),

the logistic loss of the reward margin; at :math:`\pi_\theta = \pi_{ref}` it is :math:`\log 2`.

The trainer losses (:func:`kto_objective`, :func:`dpo_objective`) take the reference values from
the batch, where :func:`metafit.posttrain.reference.reference_logprobs` put them once per dataset;
given ``reference_params`` instead they run the reference forward in every step (the slower path,
kept for data that cannot be cached and for the benchmark that measures the difference).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from metafit.train.losses import token_logprobs

KTO_KL_KEYS = ("kl_input_ids", "kl_attention_mask", "kl_loss_mask")


def check_beta(beta: float) -> None:
    """Raises ``ValueError`` unless ``beta`` is a finite number > 0 (it scales every reward)."""
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (the KL penalty strength, ~0.1), got {beta!r}")


def _check_weight(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def sequence_logprob(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    r"""Per-sequence sum of response-token log-probabilities, ``[b]``.

    .. math::  \log \pi(y \mid x) = \sum_t m_{t} \log \mathrm{softmax}(z_t)_{x_{t+1}}

    ``loss_mask[:, t] = 1`` where the token at ``t + 1`` belongs to the response (the layout of
    :func:`metafit.data.instructions.encode_sft`); the last column is ignored.
    """
    return (token_logprobs(logits, input_ids) * loss_mask[:, :-1].astype(jnp.float32)).sum(-1)


def model_sequence_logprob(graphdef: nnx.GraphDef, params: Any, input_ids, attention_mask, loss_mask) -> jax.Array:
    """:func:`sequence_logprob` of the NNX causal LM ``nnx.merge(graphdef, params)``."""
    logits = nnx.merge(graphdef, params)(input_ids, attention_mask)
    return sequence_logprob(logits, input_ids, loss_mask)


def kto_kl_estimate(policy_logp_mismatched: jax.Array, ref_logp_mismatched: jax.Array) -> jax.Array:
    r"""KTO's batch estimate of :math:`KL(\pi_\theta \| \pi_{ref})`: the mean reward on mismatched pairs.

    .. math::  \widehat{KL} = \frac{1}{m} \sum_{i} \big(\log \pi_\theta(y_{j(i)}|x_i) - \log \pi_{ref}(y_{j(i)}|x_i)\big)

    Not clipped or detached here: :func:`kto_loss` does both.
    """
    return jnp.mean(policy_logp_mismatched - ref_logp_mismatched)


def kto_loss(policy_logp: jax.Array, ref_logp: jax.Array, desirable: jax.Array, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, kl: jax.Array | float = 0.0,
             reduce: bool = True) -> jax.Array:
    r"""KTO loss (module docstring): :math:`\lambda_D(1-\sigma(\beta(r-z_0)))` or :math:`\lambda_U(1-\sigma(\beta(z_0-r)))`.

    Args:
      policy_logp, ref_logp: ``[b]`` per-sequence response log-probabilities.
      desirable: ``[b]`` 1 for a desirable response, 0 for an undesirable one.
      beta: reward scale (> 0).
      desirable_weight, undesirable_weight: :math:`\lambda_D, \lambda_U` (> 0).
      kl: :math:`z_0` from :func:`kto_kl_estimate`; detached and clipped at 0 here.
      reduce: mean over the batch (default) or the ``[b]`` per-example losses.

    Example:
      >>> kto_loss(jnp.zeros(2), jnp.zeros(2), jnp.array([1.0, 0.0]))   # r = z0 = 0: 1/2 each
      Array(0.5, dtype=float32)
    """
    check_beta(beta)
    _check_weight("desirable_weight", desirable_weight)
    _check_weight("undesirable_weight", undesirable_weight)
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.asarray(kl, jnp.float32), 0.0))
    reward = policy_logp - ref_logp
    desirable = jnp.asarray(desirable, jnp.float32)
    per_example = (desirable * desirable_weight * (1.0 - jax.nn.sigmoid(beta * (reward - z0)))
                   + (1.0 - desirable) * undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - reward))))
    return per_example.mean() if reduce else per_example


def dpo_loss(pol_chosen: jax.Array, pol_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array, *,
             beta: float = 0.1, reduce: bool = True) -> jax.Array:
    r"""DPO loss: :math:`-\log\sigma(\beta[(\pi_w - r_w) - (\pi_l - r_l)])`, mean over the batch (module docstring)."""
    check_beta(beta)
    margin = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)
    per_example = -jax.nn.log_sigmoid(beta * margin)
    return per_example.mean() if reduce else per_example


def _reference(graphdef, reference_params, batch, prefix: str, cached_key: str):
    """The batch's cached reference log-probabilities, or a frozen reference forward when given params."""
    if reference_params is None:
        return batch[cached_key]
    ids = batch[f"{prefix}input_ids"]
    return jax.lax.stop_gradient(model_sequence_logprob(graphdef, reference_params, ids,
                                                        batch[f"{prefix}attention_mask"], batch[f"{prefix}loss_mask"]))


def kto_objective(graphdef: nnx.GraphDef, *, beta: float = 0.1, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0, reference_params: Any = None) -> Callable:
    """The trainer loss ``(params, batch, key) -> (kto_loss, metrics)`` of an NNX causal LM.

    ``batch`` holds the examples (``input_ids``, ``attention_mask``, ``loss_mask``, ``desirable``,
    ``ref_logp``) and their mismatched pairs for :math:`z_0` (``kl_input_ids``, ``kl_attention_mask``,
    ``kl_loss_mask``, ``kl_ref_logp``), as built by :func:`metafit.posttrain.stages.kto_arrays`.
    With ``reference_params`` the ``ref_logp`` / ``kl_ref_logp`` entries are recomputed each step.
    """
    check_beta(beta)
    _check_weight("desirable_weight", desirable_weight)
    _check_weight("undesirable_weight", undesirable_weight)

    def loss_fn(params, batch, key):
        policy = model_sequence_logprob(graphdef, params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        policy_kl = model_sequence_logprob(graphdef, params, *(batch[k] for k in KTO_KL_KEYS))
        ref = _reference(graphdef, reference_params, batch, "", "ref_logp")
        ref_kl = _reference(graphdef, reference_params, batch, "kl_", "kl_ref_logp")
        kl = kto_kl_estimate(policy_kl, ref_kl)
        loss = kto_loss(policy, ref, batch["desirable"], beta=beta, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight, kl=kl)
        reward = policy - ref
        desirable = batch["desirable"]
        return loss, {"kl": kl,
                      "reward_desirable": (reward * desirable).sum() / jnp.maximum(desirable.sum(), 1.0),
                      "reward_undesirable": (reward * (1 - desirable)).sum() / jnp.maximum((1 - desirable).sum(), 1.0)}

    return loss_fn


def dpo_objective(graphdef: nnx.GraphDef, *, beta: float = 0.1, reference_params: Any = None) -> Callable:
    """The trainer loss ``(params, batch, key) -> (dpo_loss, metrics)`` of an NNX causal LM.

    ``batch`` holds ``chosen_{input_ids,attention_mask,loss_mask}``, ``rejected_{...}`` and the
    cached ``chosen_ref_logp`` / ``rejected_ref_logp`` (:func:`metafit.posttrain.stages.dpo_arrays`);
    with ``reference_params`` those are recomputed each step.
    """
    check_beta(beta)

    def side(params, batch, prefix):
        keys = (f"{prefix}input_ids", f"{prefix}attention_mask", f"{prefix}loss_mask")
        policy = model_sequence_logprob(graphdef, params, *(batch[k] for k in keys))
        return policy, _reference(graphdef, reference_params, batch, prefix, f"{prefix}ref_logp")

    def loss_fn(params, batch, key):
        pol_chosen, ref_chosen = side(params, batch, "chosen_")
        pol_rejected, ref_rejected = side(params, batch, "rejected_")
        margin = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)
        loss = dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta=beta)
        return loss, {"reward_margin": margin.mean(), "preference_accuracy": (margin > 0).mean()}

    return loss_fn
