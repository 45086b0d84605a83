"""Transfer methods: PROMPT (reconstruction) and its baselines, as registered pure functions.

PROMPT (Sloman, Martinelli & Kaski, UAI 2025, arXiv 2411.03263) -- reconstructed from the
abstract and the project's paper card, not from the authors' code (none was found):

1. Proxy posterior ``q(phi*) = p(phi* | z) = N(m_q, v_q)`` (conjugate; :func:`proxy_posterior`;
   the NumPyro form is :func:`metafit.bayes.models.proxy_model`).
2. Relevance of each source point, ``r_n ∝ ∫ p(y_n | x_n, f_hat, phi) q(phi) dphi
   = N(y_n; f_hat(x_n) + m_q, sigma^2 + v_q)`` (:func:`relevance_weights`), normalised so the
   largest weight is 1 (``'max'``, default: the power posterior is never more confident
   than the full data) or so they sum to N (``'mean'``). ``f_hat`` starts from a pooled
   fit with one unknown offset and is refined ``refinements`` times by the closed-form
   power-posterior mean at fixed kernel hyperparameters (:func:`prompt_weights`).
3. Power-likelihood posterior ``p_r(f | D)`` sampled with NUTS (or fitted by SVI):
   :func:`metafit.bayes.models.prompt_linear_model` / ``prompt_gp_model``.
4. Target predictive: ``y* | x* = f(x*) + phi* + eps`` with ``f ~ p_r`` and ``phi* ~ q``,
   a Gaussian mixture over posterior draws.

Every method returns a :class:`MethodFit` whose predictive is a Gaussian mixture:
component s has mean ``mean[s, t]`` and variance ``var[s, t]`` at target point t.
Methods are pure functions of (data, key) given static options, so a sweep ``vmap`` s them.

Example:
    >>> data, _ = simulate(jax.random.PRNGKey(0), SimulatorConfig())
    >>> fit = fit_transfer("prompt", data, n_sources=4, key=jax.random.PRNGKey(1))
    >>> scores = predictive_scores(fit, data.y_target)     # {'lpd': ..., 'mse': ...}
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax

from metafit.bayes import models
from metafit.bayes.data import TransferData, validate_transfer_data
from metafit.bayes.gaussian import Gaussian, gp_condition, linear_kernel, normal_posterior, rbf_kernel
from metafit.bayes.inference import (
    Diagnostics,
    Draws,
    NutsConfig,
    SviConfig,
    check_diagnostics,
    diagnose,
    nuts_sample,
    svi_sample,
)
from metafit.bayes.models import PriorConfig
from metafit.registry import Registry


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Options shared by the transfer methods.

    Attributes:
      inference: 'nuts' or 'svi' for the sampled posteriors.
      nuts: NUTS settings.
      svi: SVI settings.
      weight_normalisation: PROMPT relevance weights scaled to max 1 ('max') or mean 1 ('mean').
      refinements: PROMPT re-fits of f_hat with the current weights before the final weights.
      min_weight: floor on a relevance weight (handlers.scale needs positive scales; a point
        at the floor contributes nothing measurable).
      max_predictive_draws: posterior draws used for the target predictive (thinned evenly).
    """

    inference: Literal["nuts", "svi"] = "nuts"
    nuts: NutsConfig = NutsConfig()
    svi: SviConfig = SviConfig()
    weight_normalisation: Literal["max", "mean"] = "max"
    refinements: int = 2
    min_weight: float = 1e-6
    max_predictive_draws: int = 400

    def __post_init__(self):
        if self.refinements < 0 or self.max_predictive_draws < 1 or not 0 < self.min_weight < 1:
            raise ValueError(f"need refinements >= 0, max_predictive_draws >= 1, 0 < min_weight < 1; got {self}")


class MethodFit(NamedTuple):
    """A method's target predictive and what produced it.

    Attributes:
      mean: [S, T] component means of the Gaussian-mixture predictive.
      var: [S, T] component variances.
      draws: posterior draws (:class:`Draws`; empty samples for closed-form methods).
      weights: [N] PROMPT relevance weights (None for other methods).
    """

    mean: jax.Array
    var: jax.Array
    draws: Draws
    weights: Optional[jax.Array] = None


# --------------------------------------------------------------------------- PROMPT pieces


def proxy_posterior(proxy: jax.Array, proxy_noise: jax.Array, prior: PriorConfig) -> Gaussian:
    """Step 1: ``q(phi*) = p(phi* | z)`` for ``phi* ~ N(phi_mean, phi_scale^2)``, ``z_j ~ N(phi*, sigma_z^2)``."""
    return normal_posterior(prior.phi_mean, prior.phi_scale**2, proxy, proxy_noise**2)


def relevance_weights(y: jax.Array, fitted: jax.Array, q: Gaussian, noise_var, *,
                      normalise: Literal["max", "mean"] = "max", min_weight: float = 1e-6) -> jax.Array:
    """Step 2: ``r_n ∝ ∫ N(y_n; fitted_n + phi, noise_var) q(phi) dphi = N(y_n; fitted_n + m_q, noise_var + v_q)``.

    Args:
      y: [N] source outcomes; fitted: [N] the transferable fit f_hat(x_n).
      q: the proxy posterior; noise_var: outcome noise variance sigma^2.
      normalise: 'max' (largest weight 1) or 'mean' (weights sum to N).
      min_weight: floor applied after normalising.

    Returns:
      [N] positive weights.
    """
    log_r = dist.Normal(fitted + q.mean, jnp.sqrt(noise_var + q.var)).log_prob(y)
    if normalise == "max":
        log_r = log_r - log_r.max()
    else:
        log_r = log_r - jax.nn.logsumexp(log_r) + math.log(y.shape[0])
    return jnp.maximum(jnp.exp(log_r), min_weight)


def prompt_weights(data: TransferData, setting: "Setting", prior: PriorConfig, q: Gaussian,
                   config: MethodConfig) -> jax.Array:
    """Relevance weights with ``f_hat`` from a pooled pilot fit, refined ``config.refinements`` times.

    The pilot treats all sources as one task with an unknown offset ``~ N(phi_mean, phi_scale^2)``;
    each refinement replaces ``f_hat`` by the power-posterior mean ``K (K + diag(s^2/r))^-1 (y - m_q)``.
    Both are GP conditionals with the setting's fixed-hyperparameter kernel (for the linear
    setting the kernel ``theta_scale^2 x^T x'`` makes this Bayesian linear regression).
    """
    x, y = data.x_source, data.y_source
    gram = setting.kernel(x, x, prior)
    noise_var = prior.noise_scale**2
    offset_cov = prior.phi_scale**2 * jnp.ones_like(gram)
    fitted = gp_condition(gram + offset_cov, gram, jnp.diag(gram), y - prior.phi_mean, noise_var).mean
    weigh = functools.partial(relevance_weights, y, q=q, noise_var=noise_var,
                              normalise=config.weight_normalisation, min_weight=config.min_weight)
    for _ in range(config.refinements):
        weights = weigh(fitted)
        fitted = gp_condition(gram, gram, jnp.diag(gram), y - q.mean, (noise_var + q.var) / weights).mean
    return weigh(fitted)


# --------------------------------------------------------------------------- settings


ResidualFn = Callable[[dict], tuple[jax.Array, jax.Array]]


class Setting(NamedTuple):
    """The models and predictive algebra of one setting (linear or GP).

    Attributes:
      prompt_model, pooled_model, oracle_model, mixture_model: NumPyro models.
      kernel: ``(x1, x2, prior) -> K``, covariance of f at fixed (prior-median) hyperparameters.
      target_moments: ``(draws, x_source, residual_fn, x_target, prior) -> (mean, var)`` [S, T],
        the moments of f(x*) for each flat posterior draw. ``residual_fn(draw)`` gives the
        source outcomes minus offsets and their noise variances (used by the GP, which
        conditions f* on them; the linear setting reads theta).
      prior_moments: ``(key, x_target, prior, n_draws) -> (mean, var)``: f(x*) under the prior.
    """

    prompt_model: Callable
    pooled_model: Callable
    oracle_model: Callable
    mixture_model: Callable
    kernel: Callable
    target_moments: Callable
    prior_moments: Callable


SETTINGS: Registry[Setting] = Registry("transfer-setting")


def _linear_target_moments(draws, x_source, residual_fn: ResidualFn, x_target, prior):
    mean = draws["theta"] @ x_target.T
    return mean, jnp.zeros_like(mean)


def _linear_prior_moments(key, x_target, prior, n_draws):
    var = prior.theta_scale**2 * jnp.sum(x_target**2, -1)  # exact: one Gaussian component
    return jnp.zeros_like(var)[None], var[None]


def _gp_target_moments(draws, x_source, residual_fn: ResidualFn, x_target, prior):
    def one(draw):
        residual, noise_var = residual_fn(draw)
        gram = rbf_kernel(x_source, x_source, draw["lengthscale"], draw["amplitude"])
        cross = rbf_kernel(x_source, x_target, draw["lengthscale"], draw["amplitude"])
        prior_var = jnp.full((x_target.shape[0],), draw["amplitude"] ** 2)
        return tuple(gp_condition(gram, cross, prior_var, residual, noise_var))

    # lax.map in batches bounds memory: every draw needs its own N x N Cholesky factor.
    return lax.map(one, draws, batch_size=64)


def _gp_prior_moments(key, x_target, prior, n_draws):
    amplitude = dist.LogNormal(math.log(prior.amplitude), prior.hyper_log_sd).sample(key, (n_draws,))
    var = jnp.broadcast_to(amplitude[:, None] ** 2, (n_draws, x_target.shape[0]))
    return jnp.zeros_like(var), var


SETTINGS.register("linear", Setting(
    models.prompt_linear_model, models.pooled_linear_model, models.oracle_linear_model, models.mixture_linear_model,
    kernel=lambda x1, x2, prior: linear_kernel(x1, x2, prior.theta_scale),
    target_moments=_linear_target_moments, prior_moments=_linear_prior_moments,
))
SETTINGS.register("gp", Setting(
    models.prompt_gp_model, models.pooled_gp_model, models.oracle_gp_model, models.mixture_gp_model,
    kernel=lambda x1, x2, prior: rbf_kernel(x1, x2, prior.lengthscale, prior.amplitude),
    target_moments=_gp_target_moments, prior_moments=_gp_prior_moments,
))


# --------------------------------------------------------------------------- methods

TransferMethod = Callable[..., MethodFit]
TRANSFER_METHODS: Registry[TransferMethod] = Registry("transfer-method")


def _posterior(model: Callable, key: jax.Array, config: MethodConfig, **kwargs) -> Draws:
    if config.inference == "nuts":
        return nuts_sample(model, key, config.nuts, **kwargs)
    return svi_sample(model, key, config.svi, **kwargs)


def _flat(draws: Draws, max_draws: int) -> dict:
    """Chains merged and thinned evenly to at most ``max_draws`` draws."""
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in draws.samples.items()}
    total = next(iter(flat.values())).shape[0]
    stride = max(1, -(-total // max_draws))
    return {k: v[::stride] for k, v in flat.items()}


@TRANSFER_METHODS.register("no_transfer")
def no_transfer(data: TransferData, *, setting: Setting, prior: PriorConfig, config: MethodConfig,
                n_sources: int, key: jax.Array) -> MethodFit:
    """Prior on f, proxy posterior on phi*: the reference that defines negative transfer."""
    q = proxy_posterior(data.proxy, data.proxy_noise, prior)
    mean, var = setting.prior_moments(key, data.x_target, prior, config.max_predictive_draws)
    return MethodFit(mean + q.mean, var + q.var + prior.noise_scale**2, Draws({}))


@TRANSFER_METHODS.register("pooling")
def pooling(data: TransferData, *, setting: Setting, prior: PriorConfig, config: MethodConfig,
            n_sources: int, key: jax.Array) -> MethodFit:
    """Naive pooling: all r_n = 1 and one phi shared by every source and the target."""
    model = functools.partial(setting.pooled_model, prior=prior)
    draws = _posterior(model, key, config, x=data.x_source, y=data.y_source, proxy=data.proxy,
                       proxy_noise=data.proxy_noise)
    flat = _flat(draws, config.max_predictive_draws)
    noise_var = prior.noise_scale**2
    mean, var = setting.target_moments(flat, data.x_source, lambda d: (data.y_source - d["phi"], noise_var),
                                       data.x_target, prior)
    return MethodFit(mean + flat["phi"][:, None], var + noise_var, draws)


@TRANSFER_METHODS.register("hierarchical_mixture")
def hierarchical_mixture(data: TransferData, *, setting: Setting, prior: PriorConfig, config: MethodConfig,
                         n_sources: int, key: jax.Array) -> MethodFit:
    """Hierarchical model with latent source assignments (summed out); ``n_sources`` components."""
    model = functools.partial(setting.mixture_model, n_components=n_sources, prior=prior)
    draws = _posterior(model, key, config, x=data.x_source, y=data.y_source, proxy=data.proxy,
                       proxy_noise=data.proxy_noise)
    flat = _flat(draws, config.max_predictive_draws)
    # GP: f* is conditioned on the latent f at the source points (noise-free up to jitter).
    residual_fn = lambda d: (d["f_source"], models.JITTER * d["amplitude"] ** 2)  # noqa: E731
    mean, var = setting.target_moments(flat, data.x_source, residual_fn, data.x_target, prior)
    return MethodFit(mean + flat["phi_target"][:, None], var + prior.noise_scale**2, draws)


@TRANSFER_METHODS.register("oracle")
def oracle(data: TransferData, *, setting: Setting, prior: PriorConfig, config: MethodConfig,
           n_sources: int, key: jax.Array) -> MethodFit:
    """Oracle: knows each source point's task; the target's phi* still comes from the proxy."""
    q = proxy_posterior(data.proxy, data.proxy_noise, prior)
    model = functools.partial(setting.oracle_model, n_sources=n_sources, prior=prior)
    draws = _posterior(model, key, config, x=data.x_source, y=data.y_source, task=data.task_source)
    flat = _flat(draws, config.max_predictive_draws)
    noise_var = prior.noise_scale**2
    residual_fn = lambda d: (data.y_source - d["phi_sources"][data.task_source], noise_var)  # noqa: E731
    mean, var = setting.target_moments(flat, data.x_source, residual_fn, data.x_target, prior)
    return MethodFit(mean + q.mean, var + q.var + noise_var, draws)


@TRANSFER_METHODS.register("prompt")
def prompt(data: TransferData, *, setting: Setting, prior: PriorConfig, config: MethodConfig,
           n_sources: int, key: jax.Array) -> MethodFit:
    """PROMPT (reconstruction): proxy posterior, relevance weights, power posterior, predictive."""
    q = proxy_posterior(data.proxy, data.proxy_noise, prior)
    weights = prompt_weights(data, setting, prior, q, config)
    model = functools.partial(setting.prompt_model, prior=prior)
    draws = _posterior(model, key, config, x=data.x_source, y=data.y_source, weights=weights,
                       proxy_mean=q.mean, proxy_var=q.var)
    flat = _flat(draws, config.max_predictive_draws)
    noise_var = prior.noise_scale**2
    power_noise = (noise_var + q.var) / weights
    mean, var = setting.target_moments(flat, data.x_source, lambda d: (data.y_source - q.mean, power_noise),
                                       data.x_target, prior)
    return MethodFit(mean + q.mean, var + q.var + noise_var, draws, weights)


# --------------------------------------------------------------------------- scoring and entry point


def predictive_scores(fit: MethodFit, y_target: jax.Array) -> dict[str, jax.Array]:
    """Mean log predictive density and MSE of the mixture predictive at the target points.

    ``lpd = mean_t log( (1/S) sum_s N(y_t; mean[s,t], var[s,t]) )``; ``mse`` uses the mixture mean.
    """
    log_p = dist.Normal(fit.mean, jnp.sqrt(fit.var)).log_prob(y_target)
    lpd = jax.nn.logsumexp(log_p, axis=-2) - math.log(fit.mean.shape[-2])
    mse = jnp.mean((fit.mean.mean(-2) - y_target) ** 2, -1)
    return {"lpd": lpd.mean(-1), "mse": mse}


def fit_transfer(method: str, data: TransferData, *, n_sources: int, key: jax.Array, setting: str = "linear",
                 prior: PriorConfig = PriorConfig(), config: MethodConfig = MethodConfig(),
                 check: bool = True) -> tuple[MethodFit, Optional[Diagnostics]]:
    """Validates ``data`` and fits one method (jit-compiled); the one-problem entry point.

    Args:
      method: a name in ``TRANSFER_METHODS`` ('prompt', 'pooling', 'hierarchical_mixture', 'oracle',
        'no_transfer').
      data: the problem (checked by :func:`validate_transfer_data` first).
      n_sources: number of sources (oracle labels range; mixture components).
      key: PRNG key. setting: 'linear' or 'gp'. prior, config: the learner's prior and options.
      check: diagnose NUTS draws and warn when they are poor.

    Returns:
      ``(fit, diagnostics)``; diagnostics is None for closed-form methods and SVI.
    """
    fn = TRANSFER_METHODS.get(method)
    validate_transfer_data(data)
    if n_sources < 1:
        raise ValueError(f"n_sources must be >= 1, got {n_sources}")
    run = jax.jit(functools.partial(fn, setting=SETTINGS.get(setting), prior=prior, config=config,
                                    n_sources=n_sources))
    fit = run(data, key=key)
    diag = None
    if fit.draws.diverging is not None:
        diag = diagnose(fit.draws)
        if check:
            check_diagnostics(diag, context=f"{method} ({setting})")
    return fit, diag
