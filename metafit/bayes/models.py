"""NumPyro models for transfer from unknown sources (PROMPT reconstruction and baselines).

Every model is a plain function with named sample sites, ``plate`` s over source points,
sources and proxy readings, and shape checks on its inputs. Outcomes follow::

    y_n = f(x_n) + phi_{t_n} + eps_n,   eps_n ~ N(0, sigma^2)   (sigma = prior.noise_scale, known)

The transferable function ``f`` is shared by all tasks; its prior is chosen by name from
``FUNCTION_PRIORS``:

* ``'linear'``: ``f(x) = x^T theta``, ``theta ~ N(0, theta_scale^2 I)`` (site ``theta``).
* ``'gp'``: ``f ~ GP(0, a^2 exp(-|x-x'|^2 / 2 l^2))`` with log-normal priors on ``l`` and ``a``
  (sites ``lengthscale``, ``amplitude``), represented by the Hilbert-space approximation
  (Solin & Saerkkae 2020; ``numpyro.contrib.hsgp``): ``f(x) = Phi(x) (sqrt(S_l,a) * beta)``,
  ``beta ~ N(0, I)`` (site ``basis_weights``). The low-rank form keeps every leapfrog step
  O(N m) instead of an N x N Cholesky, and makes f latent, so the mixture can use it too.

Each model records ``f_target`` = f at ``x_target`` (a deterministic site) for the predictive.
The task label ``t_n`` is unknown to every model except the oracle.

PROMPT (reconstruction; the whole pipeline is in :mod:`metafit.bayes.methods`):
  the power-likelihood posterior
  ``p_r(f, phi | D) ∝ p(f) q(phi) prod_n N(y_n; f(x_n) + phi, sigma^2)^{r_n}``,
  tempered point by point by the relevance ``r_n`` through ``numpyro.handlers.scale``. The
  weighted sources are read as one task like the target: their shared offset ``phi_source``
  has the proxy posterior ``q = N(m_q, v_q)`` as its prior, and is a nuisance -- the target's
  own ``phi*`` is taken from q alone at prediction time, so sources never overrule what the
  proxy says about the target. (Integrating phi out point by point instead,
  ``N(y_n; f(x_n) + m_q, sigma^2 + v_q)``, would treat the offset as independent noise per
  point; within a source it is shared, so f would absorb any gap between a relevant
  source's offset and m_q. On the few problems compared by hand the two forms scored alike.)

Baselines:
  pooled  -- one phi shared by every source and the target (the proxy reads it too);
  oracle  -- one phi per source with the true labels (the target's phi* comes from q);
  mixture -- hierarchical: phi_k ~ N(mu, tau^2), each point's source a latent categorical
             summed out (MixtureSameFamily); the target's phi* ~ N(mu, tau^2) is read by the
             proxy. phi_k are ordered so that chains cannot disagree by relabelling.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.hsgp.laplacian import eigenfunctions, sqrt_eigenvalues
from numpyro.distributions import constraints

from metafit.bayes.gaussian import linear_kernel, rbf_kernel
from metafit.registry import Registry

# Hilbert-space GP: about HSGP_BASIS eigenfunctions in all (HSGP_BASIS ** (1/d) per input
# dimension), on a box HSGP_BOUNDARY times wider than the inputs. Riutort-Mayol et al.
# (2023) ask for m >= 1.75 c L / lengthscale per dimension: 48 covers lengthscales >= ~0.4
# for 1-D inputs spanning +-8 with c = 1.5.
HSGP_BASIS = 48
HSGP_BOUNDARY = 1.5


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """The learner's prior beliefs (shared by every method).

    Attributes:
      theta_scale: sd of each linear coefficient, theta ~ N(0, theta_scale^2 I).
      phi_mean: prior mean of a task's non-transferable effect phi.
      phi_scale: prior sd of phi (and scale of the hierarchical tau's half-normal prior); the
        default 3 is weakly informative for the effects the sweeps simulate (sd 0.25 to 4).
      noise_scale: the outcome noise sd sigma, treated as known.
      lengthscale: prior median of the GP lengthscale (log-normal prior).
      amplitude: prior median of the GP amplitude (log-normal prior).
      hyper_log_sd: sd of log lengthscale and log amplitude.
    """

    theta_scale: float = 1.0
    phi_mean: float = 0.0
    phi_scale: float = 3.0
    noise_scale: float = 0.5
    lengthscale: float = 1.0
    amplitude: float = 1.0
    hyper_log_sd: float = 0.5

    def __post_init__(self):
        for name in ("theta_scale", "phi_scale", "noise_scale", "lengthscale", "amplitude", "hyper_log_sd"):
            if not getattr(self, name) > 0:
                raise ValueError(f"prior.{name} must be > 0, got {getattr(self, name)}")


# --------------------------------------------------------------------------- transferable function priors


class FunctionPrior(NamedTuple):
    """A prior over the transferable function f.

    Attributes:
      sample: ``(x [N, d], x_target [T, d], prior) -> (f(x) [N], f(x_target) [T])``; creates
        the sample sites of f's parameters.
      kernel: ``(x1, x2, prior) -> K``, f's covariance at fixed (prior-median) hyperparameters;
        closed-form pilot fits use it.
      prior_moments: ``(key, x_target, prior, n_draws) -> (mean, var)`` [S, T] of f(x*) under
        the prior: a Gaussian mixture over S hyperparameter draws.
    """

    sample: Callable
    kernel: Callable
    prior_moments: Callable


FUNCTION_PRIORS: Registry[FunctionPrior] = Registry("transferable-function")


def linear_function(x: jax.Array, x_target: jax.Array, prior: PriorConfig) -> tuple[jax.Array, jax.Array]:
    """``f(x) = x^T theta`` with ``theta ~ N(0, theta_scale^2 I)`` (site ``theta``)."""
    theta = numpyro.sample("theta", dist.Normal(0.0, prior.theta_scale).expand([x.shape[-1]]).to_event(1))
    return x @ theta, x_target @ theta


def _linear_prior_moments(key, x_target, prior, n_draws):
    var = prior.theta_scale**2 * jnp.sum(x_target**2, -1)  # exact: one Gaussian component
    return jnp.zeros_like(var)[None], var[None]


def hsgp_function(x: jax.Array, x_target: jax.Array, prior: PriorConfig) -> tuple[jax.Array, jax.Array]:
    """RBF GP f in Hilbert-space form on a box around both input sets (module docstring)."""
    d = x.shape[-1]
    lengthscale = numpyro.sample("lengthscale", dist.LogNormal(math.log(prior.lengthscale), prior.hyper_log_sd))
    amplitude = numpyro.sample("amplitude", dist.LogNormal(math.log(prior.amplitude), prior.hyper_log_sd))
    per_dim = max(6, round(HSGP_BASIS ** (1.0 / d)))
    centre = x.mean(0)
    reach = jnp.maximum(jnp.abs(x - centre).max(0), jnp.abs(x_target - centre).max(0))
    half_width = (HSGP_BOUNDARY * reach)[:, None]  # [d, 1]: the box is [-L, L] per dimension
    # sqrt of the RBF spectral density a^2 (2 pi)^(d/2) l^d exp(-l^2 |w|^2 / 2), in log space: the
    # density underflows to 0 at high frequencies, where d sqrt(s)/ds = inf would make NaN gradients.
    freq_sq = jnp.sum(sqrt_eigenvalues(half_width, per_dim, d) ** 2, 0)
    log_density = 2 * jnp.log(amplitude) + 0.5 * d * math.log(2 * math.pi) + d * jnp.log(lengthscale) \
        - 0.5 * lengthscale**2 * freq_sq
    spectral = jnp.exp(0.5 * log_density)
    with numpyro.plate("basis", per_dim**d):
        beta = numpyro.sample("basis_weights", dist.Normal(0.0, 1.0))
    weights = spectral * beta
    return (eigenfunctions(x - centre, half_width, per_dim) @ weights,
            eigenfunctions(x_target - centre, half_width, per_dim) @ weights)


def _gp_prior_moments(key, x_target, prior, n_draws):
    amplitude = dist.LogNormal(math.log(prior.amplitude), prior.hyper_log_sd).sample(key, (n_draws,))
    var = jnp.broadcast_to(amplitude[:, None] ** 2, (n_draws, x_target.shape[0]))
    return jnp.zeros_like(var), var


FUNCTION_PRIORS.register("linear", FunctionPrior(
    linear_function, lambda x1, x2, prior: linear_kernel(x1, x2, prior.theta_scale), _linear_prior_moments))
FUNCTION_PRIORS.register("gp", FunctionPrior(
    hsgp_function, lambda x1, x2, prior: rbf_kernel(x1, x2, prior.lengthscale, prior.amplitude), _gp_prior_moments))


# --------------------------------------------------------------------------- shared sites


def _shapes(x: jax.Array, x_target: jax.Array, y: Optional[jax.Array], **per_point: Optional[jax.Array]) -> int:
    """Checks [N, d] inputs, [T, d] target inputs and [N] per-point arrays; returns N."""
    if jnp.ndim(x) != 2:
        raise ValueError(f"x must have shape [N, d], got {jnp.shape(x)}")
    n, d = x.shape
    if jnp.ndim(x_target) != 2 or x_target.shape[1] != d:
        raise ValueError(f"x_target must have shape [T, {d}], got {jnp.shape(x_target)}")
    for name, value in dict(y=y, **per_point).items():
        if value is not None and jnp.shape(value) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {jnp.shape(value)}")
    return n


def _transferable(x: jax.Array, x_target: jax.Array, prior: PriorConfig, function: str) -> jax.Array:
    f_source, f_target = FUNCTION_PRIORS.get(function).sample(x, x_target, prior)
    numpyro.deterministic("f_target", f_target)
    return f_source


def _proxy_readings(phi: jax.Array, proxy: jax.Array, proxy_noise: jax.Array) -> None:
    if jnp.ndim(proxy) != 1:
        raise ValueError(f"proxy must have shape [M] (readings of the scalar phi*), got {jnp.shape(proxy)}")
    with numpyro.plate("proxy_readings", proxy.shape[0]):
        numpyro.sample("proxy", dist.Normal(phi, proxy_noise), obs=proxy)


def proxy_model(proxy: jax.Array, *, proxy_noise: jax.Array, prior: PriorConfig) -> None:
    """Step 1 of PROMPT: ``phi_target ~ N(phi_mean, phi_scale^2)``, ``proxy_j ~ N(phi_target, proxy_noise^2)``.

    Its posterior is q(phi*); :func:`metafit.bayes.methods.proxy_posterior` gives it in closed form.
    """
    phi = numpyro.sample("phi_target", dist.Normal(prior.phi_mean, prior.phi_scale))
    _proxy_readings(phi, proxy, proxy_noise)


# --------------------------------------------------------------------------- models


def prompt_model(x: jax.Array, y: Optional[jax.Array] = None, *, x_target: jax.Array, weights: jax.Array,
                 proxy_mean: jax.Array, proxy_var: jax.Array, prior: PriorConfig, function: str = "linear") -> None:
    """PROMPT power-likelihood posterior ``p(f) q(phi) prod_n N(y_n; f(x_n) + phi, sigma^2)^{r_n}``.

    Args:
      x: [N, d] source inputs; y: [N] outcomes (None samples them).
      x_target: [T, d] where ``f_target`` is recorded.
      weights: [N] positive relevance weights r_n (the power of each point's likelihood).
      proxy_mean, proxy_var: moments of the proxy posterior q(phi*), the prior of ``phi_source``.
      prior: the learner's prior; function: name in ``FUNCTION_PRIORS``.
    """
    n = _shapes(x, x_target, y, weights=weights)
    f = _transferable(x, x_target, prior, function)
    phi = numpyro.sample("phi_source", dist.Normal(proxy_mean, jnp.sqrt(proxy_var)))
    with numpyro.plate("source_points", n), handlers.scale(scale=weights):
        numpyro.sample("y", dist.Normal(f + phi, prior.noise_scale), obs=y)


def pooled_model(x: jax.Array, y: Optional[jax.Array] = None, *, x_target: jax.Array, proxy: jax.Array,
                 proxy_noise: jax.Array, prior: PriorConfig, function: str = "linear") -> None:
    """Naive pooling: one ``phi`` for all sources and the target (every r_n = 1)."""
    n = _shapes(x, x_target, y)
    f = _transferable(x, x_target, prior, function)
    phi = numpyro.sample("phi", dist.Normal(prior.phi_mean, prior.phi_scale))
    with numpyro.plate("source_points", n):
        numpyro.sample("y", dist.Normal(f + phi, prior.noise_scale), obs=y)
    _proxy_readings(phi, proxy, proxy_noise)


def oracle_model(x: jax.Array, y: Optional[jax.Array] = None, *, x_target: jax.Array, task: jax.Array,
                 n_sources: int, prior: PriorConfig, function: str = "linear") -> None:
    """Oracle: the source labels ``task`` are known; one ``phi_sources[k]`` per source."""
    n = _shapes(x, x_target, y, task=task)
    f = _transferable(x, x_target, prior, function)
    with numpyro.plate("sources", n_sources):
        phi = numpyro.sample("phi_sources", dist.Normal(prior.phi_mean, prior.phi_scale))
    with numpyro.plate("source_points", n):
        numpyro.sample("y", dist.Normal(f + phi[task], prior.noise_scale), obs=y)


def mixture_model(x: jax.Array, y: Optional[jax.Array] = None, *, x_target: jax.Array, proxy: jax.Array,
                  proxy_noise: jax.Array, n_components: int, prior: PriorConfig, function: str = "linear") -> None:
    """Hierarchical mixture over latent source assignments, summed out of the likelihood.

    ``mu ~ N(phi_mean, phi_scale^2)``, ``tau ~ HalfNormal(phi_scale)``, ordered
    ``phi_1 < ... < phi_K`` with ``phi_k = mu + tau eta_k``, ``eta_k ~ N(0, 1)`` (non-centred), source weights
    ``w ~ Dirichlet(1)``, ``y_n ~ sum_k w_k N(f(x_n) + phi_k, sigma^2)``; the target is a new
    task ``phi* = mu + tau eta`` (non-centred) seen through the proxy.
    """
    n = _shapes(x, x_target, y)
    f = _transferable(x, x_target, prior, function)
    mu = numpyro.sample("phi_mean", dist.Normal(prior.phi_mean, prior.phi_scale))
    tau = numpyro.sample("phi_spread", dist.HalfNormal(prior.phi_scale))
    # Non-centred: phi_k = mu + tau * eta_k with eta_k ~ N(0, 1). The centred form's funnel between tau
    # and the phi_k made thousands of divergences; tau > 0, so ordering eta orders phi (no label switching).
    eta = numpyro.sample("phi_sources_std", dist.ImproperUniform(constraints.ordered_vector, (), (n_components,)))
    numpyro.factor("phi_sources_std_prior", dist.Normal(0.0, 1.0).log_prob(eta).sum())
    phi = numpyro.deterministic("phi_sources", mu + tau * eta)
    probs = numpyro.sample("source_probs", dist.Dirichlet(jnp.ones(n_components)))
    with numpyro.plate("source_points", n):
        # The latent source of each point is summed out: log sum_k w_k N(y_n; f(x_n) + phi_k, sigma^2).
        components = dist.Normal(f[:, None] + phi, prior.noise_scale)
        numpyro.sample("y", dist.MixtureSameFamily(dist.Categorical(probs=probs), components), obs=y)
    # Non-centred phi* avoids the funnel between tau and a task seen only through the proxy.
    eta_target = numpyro.sample("phi_target_std", dist.Normal(0.0, 1.0))
    _proxy_readings(numpyro.deterministic("phi_target", mu + tau * eta_target), proxy, proxy_noise)


def mixture_responsibilities(y: jax.Array, f: jax.Array, phi: jax.Array, probs: jax.Array,
                             noise_scale: float) -> jax.Array:
    """Posterior over each point's latent source given the mixture's parameters.

    ``P(t_n = k | y_n, f, phi, w) = w_k N(y_n; f_n + phi_k, sigma^2) / sum_j w_j N(y_n; f_n + phi_j, sigma^2)``
    (a softmax of the log joint, as :func:`mixture_model` sums the same terms with logsumexp).
    Averaged over posterior draws it is ``P(t_n = k | D)``, the assignments the model summed out.

    Args:
      y: [..., N] outcomes; f: [..., N] the transferable mean at the points; phi: [..., K] source
        offsets; probs: [..., K] source weights; leading axes (draws) broadcast.

    Returns:
      [..., N, K] probabilities summing to 1 over K.
    """
    log_joint = jnp.log(probs)[..., None, :] + dist.Normal(f[..., :, None] + phi[..., None, :], noise_scale).log_prob(
        y[..., :, None])
    return jax.nn.softmax(log_joint, axis=-1)

