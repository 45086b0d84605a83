"""Closed-form Gaussian posteriors: the references the samplers are tested against.

Everything here is conjugate algebra, jittable and ``vmap``-able:

* :func:`normal_posterior` -- a scalar mean seen through iid Gaussian readings
  (the proxy posterior q(phi*) = p(phi* | z)).
* :func:`linear_posterior` -- Bayesian linear regression with a diagonal Gaussian prior
  and per-point noise variances (a power likelihood N(y; m, s^2)^r is, in the
  coefficients, the likelihood N(y; m, s^2 / r)).
* :func:`gp_condition` -- the Gaussian conditional of a latent function given noisy
  observations with per-point noise, via one Cholesky factor.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular


class Gaussian(NamedTuple):
    """A Gaussian by its mean and (co)variance."""

    mean: jax.Array
    var: jax.Array


@jax.jit
def normal_posterior(prior_mean, prior_var, readings: jax.Array, noise_var) -> Gaussian:
    """Posterior of a scalar ``mu ~ N(prior_mean, prior_var)`` after ``readings ~ N(mu, noise_var)`` iid.

    ``var = 1 / (1/prior_var + M/noise_var)``, ``mean = var (prior_mean/prior_var + sum(z)/noise_var)``.
    """
    precision = 1.0 / prior_var + readings.shape[-1] / noise_var
    var = 1.0 / precision
    return Gaussian(var * (prior_mean / prior_var + readings.sum(-1) / noise_var), var)


@jax.jit
def linear_posterior(design: jax.Array, y: jax.Array, prior_mean: jax.Array, prior_var: jax.Array,
                     noise_var: jax.Array) -> Gaussian:
    """Posterior of ``beta`` in ``y ~ N(design @ beta, diag(noise_var))``, ``beta ~ N(prior_mean, diag(prior_var))``.

    ``cov = (diag(1/prior_var) + X^T diag(1/noise_var) X)^-1`` and
    ``mean = cov (prior_mean/prior_var + X^T (y/noise_var))``.

    Args:
      design: [N, p]; y: [N]; prior_mean, prior_var: [p] (or broadcastable);
      noise_var: [N] or a scalar.

    Returns:
      ``Gaussian(mean [p], var [p, p])`` (``var`` is the full covariance).
    """
    p = design.shape[-1]
    prior_mean = jnp.broadcast_to(prior_mean, (p,))
    prior_var = jnp.broadcast_to(prior_var, (p,))
    inv_noise = jnp.broadcast_to(1.0 / noise_var, y.shape)
    precision = jnp.diag(1.0 / prior_var) + (design * inv_noise[:, None]).T @ design
    chol = jnp.linalg.cholesky(precision)
    cov = cho_solve((chol, True), jnp.eye(p))
    mean = cho_solve((chol, True), prior_mean / prior_var + design.T @ (y * inv_noise))
    return Gaussian(mean, cov)


def rbf_kernel(x1: jax.Array, x2: jax.Array, lengthscale, amplitude) -> jax.Array:
    """``k(x, x') = amplitude^2 exp(-|x - x'|^2 / (2 lengthscale^2))`` for [N, d] x [M, d] -> [N, M]."""
    sq = jnp.sum((x1[:, None, :] - x2[None, :, :]) ** 2, -1)
    return amplitude**2 * jnp.exp(-0.5 * sq / lengthscale**2)


def linear_kernel(x1: jax.Array, x2: jax.Array, scale) -> jax.Array:
    """``k(x, x') = scale^2 x^T x'``: the covariance of ``x^T theta`` under ``theta ~ N(0, scale^2 I)``."""
    return scale**2 * x1 @ x2.T


@jax.jit
def gp_condition(cov_obs: jax.Array, cross: jax.Array, prior_var: jax.Array, residual: jax.Array,
                 noise_var: jax.Array) -> Gaussian:
    """Conditional of a zero-mean Gaussian ``f*`` given ``residual = g + noise``.

    With ``C = cov_obs + diag(noise_var)`` (covariance of the observations) and
    ``cross = Cov(g, f*)`` [N, T]: ``mean = cross^T C^-1 residual`` and
    ``var = prior_var - diag(cross^T C^-1 cross)``.

    Args:
      cov_obs: [N, N] covariance of the noiseless observed function g.
      cross: [N, T] covariance between g and the predicted f*.
      prior_var: [T] prior variance of f*.
      residual: [N] observations minus their known offsets.
      noise_var: [N] or scalar observation noise variance.

    Returns:
      ``Gaussian(mean [T], var [T])`` (marginal variances, floored at 0).
    """
    n = residual.shape[-1]
    chol = jnp.linalg.cholesky(cov_obs + jnp.broadcast_to(noise_var, (n,)) * jnp.eye(n))
    alpha = cho_solve((chol, True), residual)
    half = solve_triangular(chol, cross, lower=True)
    return Gaussian(cross.T @ alpha, jnp.maximum(prior_var - jnp.sum(half**2, 0), 0.0))
