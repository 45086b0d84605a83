"""NumPyro models for transfer from unknown sources (PROMPT reconstruction and baselines).

Every model is a plain function with named sample sites, ``plate`` s over source points and
proxy readings, and shape checks on its inputs. Outcomes follow::

    y_n = f(x_n) + phi_{t_n} + eps_n,   eps_n ~ N(0, sigma^2)   (sigma = prior.noise_scale, known)

with ``f(x) = x^T theta`` (``*_linear_model``) or ``f ~ GP(0, k_rbf)`` (``*_gp_model``; kernel
lengthscale and amplitude get log-normal priors and are sampled). The task label ``t_n`` is
unknown to every model except the oracle.

PROMPT (reconstruction, see :mod:`metafit.bayes.methods` for the whole pipeline):
  the power-likelihood posterior over the transferable part,
  ``p_r(f | D) ∝ p(f) prod_n [∫ N(y_n; f(x_n) + phi, sigma^2) q(phi) dphi]^{r_n}``,
  where ``q = N(m_q, v_q)`` is the proxy posterior of the target's ``phi*``; the inner
  integral is ``N(y_n; f(x_n) + m_q, sigma^2 + v_q)``: each source point is read as a
  draw from the target task, down-weighted by its relevance ``r_n``.
  Linear: ``numpyro.handlers.scale(scale=r)`` on the observed site. GP: the latent f is
  integrated out, using ``N(y; f, s^2)^r = N(y; f, s^2/r) (2 pi s^2)^{(1-r)/2} r^{-1/2}``,
  so the marginal is ``N(y; m_q, K + diag(s^2/r))`` plus a ``factor`` for the constant.

Baselines:
  pooled  -- one shared phi for every source and the target (the proxy reads it too);
  oracle  -- one phi per source with the true labels (the target's phi* comes from q);
  mixture -- hierarchical: phi_k ~ N(mu, tau^2), each point's source a latent categorical
             marginalised out (MixtureSameFamily); the target's phi* ~ N(mu, tau^2) is read
             by the proxy. phi_k are ordered to remove label switching.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints

from metafit.bayes.gaussian import rbf_kernel

# Relative diagonal jitter for Cholesky factors of RBF Gram matrices in float32.
JITTER = 1e-4


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """The learner's prior beliefs (shared by every method).

    Attributes:
      theta_scale: sd of each linear coefficient, theta ~ N(0, theta_scale^2 I).
      phi_mean: prior mean of a task's non-transferable effect phi.
      phi_scale: prior sd of phi (and scale of the hierarchical tau's half-Cauchy prior).
      noise_scale: the outcome noise sd sigma, treated as known.
      lengthscale: prior median of the GP lengthscale (log-normal prior).
      amplitude: prior median of the GP amplitude (log-normal prior).
      hyper_log_sd: sd of log lengthscale and log amplitude.
    """

    theta_scale: float = 1.0
    phi_mean: float = 0.0
    phi_scale: float = 1.0
    noise_scale: float = 0.5
    lengthscale: float = 1.0
    amplitude: float = 1.0
    hyper_log_sd: float = 0.5

    def __post_init__(self):
        for name in ("theta_scale", "phi_scale", "noise_scale", "lengthscale", "amplitude", "hyper_log_sd"):
            if not getattr(self, name) > 0:
                raise ValueError(f"prior.{name} must be > 0, got {getattr(self, name)}")


def _check_shape(name: str, value: Optional[jax.Array], shape: tuple[int, ...]) -> None:
    if value is not None and jnp.shape(value) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {jnp.shape(value)}")


def _source_shapes(x: jax.Array, y: Optional[jax.Array], **per_point: Optional[jax.Array]) -> tuple[int, int]:
    if jnp.ndim(x) != 2:
        raise ValueError(f"x must have shape [N, d], got {jnp.shape(x)}")
    n, d = x.shape
    for name, value in dict(y=y, **per_point).items():
        _check_shape(name, value, (n,))
    return n, d


# --------------------------------------------------------------------------- shared sites


def proxy_model(proxy: jax.Array, *, proxy_noise: jax.Array, prior: PriorConfig) -> None:
    """Step 1 of PROMPT: ``phi_target ~ N(phi_mean, phi_scale^2)``, ``proxy_j ~ N(phi_target, proxy_noise^2)``.

    Its posterior is q(phi*); :func:`metafit.bayes.methods.proxy_posterior` gives it in closed form.
    """
    phi = numpyro.sample("phi_target", dist.Normal(prior.phi_mean, prior.phi_scale))
    _proxy_readings(phi, proxy, proxy_noise)


def _proxy_readings(phi: jax.Array, proxy: jax.Array, proxy_noise: jax.Array) -> None:
    if jnp.ndim(proxy) != 1:
        raise ValueError(f"proxy must have shape [M] (readings of the scalar phi*), got {jnp.shape(proxy)}")
    with numpyro.plate("proxy_readings", proxy.shape[0]):
        numpyro.sample("proxy", dist.Normal(phi, proxy_noise), obs=proxy)


def _theta(d: int, prior: PriorConfig) -> jax.Array:
    return numpyro.sample("theta", dist.Normal(0.0, prior.theta_scale).expand([d]).to_event(1))


def _kernel(x: jax.Array, prior: PriorConfig) -> tuple[jax.Array, jax.Array]:
    """Samples the RBF hyperparameters; returns (Gram matrix at x, amplitude)."""
    lengthscale = numpyro.sample("lengthscale", dist.LogNormal(math.log(prior.lengthscale), prior.hyper_log_sd))
    amplitude = numpyro.sample("amplitude", dist.LogNormal(math.log(prior.amplitude), prior.hyper_log_sd))
    return rbf_kernel(x, x, lengthscale, amplitude), amplitude


def _hierarchy(n_components: int, prior: PriorConfig) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Population (mu, tau) of the non-transferable effects, ordered source effects and mixture weights."""
    mu = numpyro.sample("phi_mean", dist.Normal(prior.phi_mean, prior.phi_scale))
    tau = numpyro.sample("phi_spread", dist.HalfCauchy(prior.phi_scale))
    # Ordered phi_k (flat base + factor for the population density) identify the components:
    # without it every chain may pick its own labelling and R-hat is meaningless.
    phi = numpyro.sample("phi_sources", dist.ImproperUniform(constraints.ordered_vector, (), (n_components,)))
    numpyro.factor("phi_sources_prior", dist.Normal(mu, tau).log_prob(phi).sum())
    weights = numpyro.sample("source_probs", dist.Dirichlet(jnp.ones(n_components)))
    return mu, tau, phi, weights


def _new_task(mu: jax.Array, tau: jax.Array, proxy: jax.Array, proxy_noise: jax.Array) -> None:
    # Non-centred: phi* = mu + tau * eta avoids the funnel between tau and phi*.
    eta = numpyro.sample("phi_target_std", dist.Normal(0.0, 1.0))
    _proxy_readings(numpyro.deterministic("phi_target", mu + tau * eta), proxy, proxy_noise)


def _mixture_likelihood(f: jax.Array, phi: jax.Array, weights: jax.Array, y: Optional[jax.Array],
                        noise_scale: float) -> None:
    """y_n ~ sum_k w_k N(f_n + phi_k, sigma^2): the discrete source of each point summed out."""
    with numpyro.plate("source_points", f.shape[0]):
        components = dist.Normal(f[:, None] + phi, noise_scale)
        numpyro.sample("y", dist.MixtureSameFamily(dist.Categorical(probs=weights), components), obs=y)


def _power_scale(noise_scale: float, proxy_var: jax.Array) -> jax.Array:
    """sd of a source point read as a target draw: sigma^2 + v_q (phi* integrated over q)."""
    return jnp.sqrt(noise_scale**2 + proxy_var)


# --------------------------------------------------------------------------- linear setting


def prompt_linear_model(x: jax.Array, y: Optional[jax.Array] = None, *, weights: jax.Array,
                        proxy_mean: jax.Array, proxy_var: jax.Array, prior: PriorConfig) -> None:
    """PROMPT power-likelihood posterior, linear f: ``prod_n N(y_n; x_n^T theta + m_q, sigma^2 + v_q)^{r_n}``."""
    n, d = _source_shapes(x, y, weights=weights)
    theta = _theta(d, prior)
    with numpyro.plate("source_points", n), handlers.scale(scale=weights):
        numpyro.sample("y", dist.Normal(x @ theta + proxy_mean, _power_scale(prior.noise_scale, proxy_var)), obs=y)


def pooled_linear_model(x: jax.Array, y: Optional[jax.Array] = None, *, proxy: jax.Array,
                        proxy_noise: jax.Array, prior: PriorConfig) -> None:
    """Naive pooling: one phi for all sources and the target; every r_n = 1."""
    n, d = _source_shapes(x, y)
    theta = _theta(d, prior)
    phi = numpyro.sample("phi", dist.Normal(prior.phi_mean, prior.phi_scale))
    with numpyro.plate("source_points", n):
        numpyro.sample("y", dist.Normal(x @ theta + phi, prior.noise_scale), obs=y)
    _proxy_readings(phi, proxy, proxy_noise)


def oracle_linear_model(x: jax.Array, y: Optional[jax.Array] = None, *, task: jax.Array, n_sources: int,
                        prior: PriorConfig) -> None:
    """Oracle: the source labels are known; one phi_k per source."""
    n, d = _source_shapes(x, y, task=task)
    theta = _theta(d, prior)
    with numpyro.plate("sources", n_sources):
        phi = numpyro.sample("phi_sources", dist.Normal(prior.phi_mean, prior.phi_scale))
    with numpyro.plate("source_points", n):
        numpyro.sample("y", dist.Normal(x @ theta + phi[task], prior.noise_scale), obs=y)


def mixture_linear_model(x: jax.Array, y: Optional[jax.Array] = None, *, proxy: jax.Array, proxy_noise: jax.Array,
                         n_components: int, prior: PriorConfig) -> None:
    """Hierarchical mixture over latent source assignments (marginalised), linear f."""
    n, d = _source_shapes(x, y)
    theta = _theta(d, prior)
    mu, tau, phi, weights = _hierarchy(n_components, prior)
    _mixture_likelihood(x @ theta, phi, weights, y, prior.noise_scale)
    _new_task(mu, tau, proxy, proxy_noise)


# --------------------------------------------------------------------------- GP setting


def prompt_gp_model(x: jax.Array, y: Optional[jax.Array] = None, *, weights: jax.Array, proxy_mean: jax.Array,
                    proxy_var: jax.Array, prior: PriorConfig) -> None:
    """PROMPT power-likelihood posterior of the GP hyperparameters, f integrated out (module docstring)."""
    n, _ = _source_shapes(x, y, weights=weights)
    gram, _ = _kernel(x, prior)
    var = _power_scale(prior.noise_scale, proxy_var) ** 2
    numpyro.sample("y", dist.MultivariateNormal(jnp.full((n,), proxy_mean), gram + jnp.diag(var / weights)), obs=y)
    numpyro.factor("power_constant", jnp.sum(0.5 * (1.0 - weights) * jnp.log(2 * jnp.pi * var) - 0.5 * jnp.log(weights)))


def pooled_gp_model(x: jax.Array, y: Optional[jax.Array] = None, *, proxy: jax.Array, proxy_noise: jax.Array,
                    prior: PriorConfig) -> None:
    """Naive pooling, GP f: ``y ~ N(phi 1, K + sigma^2 I)`` with one phi (read by the proxy too)."""
    n, _ = _source_shapes(x, y)
    gram, _ = _kernel(x, prior)
    phi = numpyro.sample("phi", dist.Normal(prior.phi_mean, prior.phi_scale))
    numpyro.sample("y", dist.MultivariateNormal(jnp.full((n,), phi), gram + prior.noise_scale**2 * jnp.eye(n)), obs=y)
    _proxy_readings(phi, proxy, proxy_noise)


def oracle_gp_model(x: jax.Array, y: Optional[jax.Array] = None, *, task: jax.Array, n_sources: int,
                    prior: PriorConfig) -> None:
    """Oracle, GP f: ``y ~ N(phi[task], K + sigma^2 I)`` with known labels."""
    n, _ = _source_shapes(x, y, task=task)
    gram, _ = _kernel(x, prior)
    with numpyro.plate("sources", n_sources):
        phi = numpyro.sample("phi_sources", dist.Normal(prior.phi_mean, prior.phi_scale))
    numpyro.sample("y", dist.MultivariateNormal(phi[task], gram + prior.noise_scale**2 * jnp.eye(n)), obs=y)


def mixture_gp_model(x: jax.Array, y: Optional[jax.Array] = None, *, proxy: jax.Array, proxy_noise: jax.Array,
                     n_components: int, prior: PriorConfig) -> None:
    """Hierarchical mixture, GP f: the mixture does not integrate f analytically, so f is latent
    (non-centred, ``f = chol(K) eta``) and kept as the deterministic site ``f_source``."""
    n, _ = _source_shapes(x, y)
    gram, amplitude = _kernel(x, prior)
    chol = jnp.linalg.cholesky(gram + JITTER * amplitude**2 * jnp.eye(n))
    with numpyro.plate("source_points", n):
        eta = numpyro.sample("f_std", dist.Normal(0.0, 1.0))
    f = numpyro.deterministic("f_source", chol @ eta)
    mu, tau, phi, weights = _hierarchy(n_components, prior)
    _mixture_likelihood(f, phi, weights, y, prior.noise_scale)
    _new_task(mu, tau, proxy, proxy_noise)
