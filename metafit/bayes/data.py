"""Transfer data from several unknown sources, and a simulator for it.

The generative story (PROMPT card, reconstruction)::

    phi_k  ~ N(c, tau^2)                 k = 1..K   non-transferable effect of source k
    phi*   ~ N(c, tau^2)                            the target's non-transferable effect
    mu_k   ~ N(0, s_x^2 I)                          each task's own input region (covariate shift)
    x_n    ~ N(mu_{t_n} + kappa * phi_{t_n} * e, I)  (kappa != 0: inputs confounded with phi)
    y_n    = f(x_n) + phi_{t_n} + eps_n,  eps_n ~ N(0, sigma^2)
    z_j    ~ N(phi*, sigma_z^2)          j = 1..M   proxy readings of the target

with ``f(x) = x^T theta`` (linear setting) or ``f ~ GP(0, k_rbf)`` (GP setting). ``f`` is
shared by every task (transferable); the learner never sees the task labels ``t_n`` and
never sees a target outcome, only the proxy ``z``. ``c`` is where the true population of
``phi`` sits: the learner's prior on ``phi`` is centred at ``PriorConfig.phi_mean`` (0 by
default), so ``prior_misspecification = c != 0`` misspecifies it; so does a
``heterogeneity`` ``tau`` far from the learner's ``phi_scale``. Tasks also differ in where
their inputs lie (``covariate_shift`` s_x, independent of phi); ``confounding`` kappa
(``e = 1/sqrt(d)``, off by default) additionally moves a task's inputs with its phi, so that
x predicts phi and a pooled fit explains task offsets through f (an adversarial case for
any method that must estimate f without the labels).

Every random choice comes from the key; the knobs a sweep varies (``heterogeneity``,
``proxy_noise``, ``prior_misspecification``) may be traced arrays, so
``jax.vmap(simulate, ...)`` builds a whole sweep in one call.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metafit.bayes.gaussian import rbf_kernel


class TransferDataError(ValueError):
    """Transfer data the methods cannot use (wrong shape, missing proxy, no sources, NaN...)."""


class TransferData(NamedTuple):
    """What a transfer method sees, plus the held-out target outcomes it is scored on.

    Attributes:
      x_source: [N, d] source inputs, pooled over all (unlabelled) sources.
      y_source: [N] source outcomes.
      task_source: [N] int source label of each point. Hidden: only the oracle reads it.
      proxy: [M] proxy readings of the target's non-transferable effect phi*.
      proxy_noise: [] the proxy's noise sd sigma_z (known to the learner).
      x_target: [T] x d target inputs at which to predict.
      y_target: [T] target outcomes, for evaluation only (no method reads them).
    """

    x_source: jax.Array
    y_source: jax.Array
    task_source: jax.Array
    proxy: jax.Array
    proxy_noise: jax.Array
    x_target: jax.Array
    y_target: jax.Array


class TransferTruth(NamedTuple):
    """The simulator's hidden truth, for tests and oracle checks.

    Attributes:
      theta: [d] the linear coefficients (GP setting: shape [0]).
      phi_source: [K] each source's non-transferable effect.
      phi_target: [] the target's.
      f_source: [N] transferable mean f(x) at the source inputs.
      f_target: [T] transferable mean at the target inputs.
    """

    theta: jax.Array
    phi_source: jax.Array
    phi_target: jax.Array
    f_source: jax.Array
    f_target: jax.Array


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
    """Knobs of the transfer simulator (see the module docstring for the model).

    Attributes:
      setting: 'linear' (f = x^T theta) or 'gp' (f ~ GP with an RBF kernel).
      n_sources: number of latent source tasks K.
      source_size: points per source; one entry for all sources or one per source.
      n_features: input dimension d.
      heterogeneity: tau, the sd of phi across tasks.
      proxy_noise: sigma_z, the sd of each proxy reading.
      n_proxy: M, the number of proxy readings.
      prior_misspecification: c, the centre of the true phi population (the learner's
        prior is centred at PriorConfig.phi_mean).
      covariate_shift: s_x, sd of each task's input mean (independent of phi).
      confounding: kappa, how far a task's phi moves its inputs (0: no confounding).
      noise_scale: sigma, the outcome noise sd.
      theta_scale: sd of the true theta (linear) or the GP amplitude (gp).
      lengthscale: the true GP lengthscale (gp only).
      n_target: T, target points to score predictions on.
    """

    setting: Literal["linear", "gp"] = "linear"
    n_sources: int = 4
    source_size: tuple[int, ...] = (50,)
    n_features: int = 3
    heterogeneity: float = 1.0
    proxy_noise: float = 0.5
    n_proxy: int = 1
    prior_misspecification: float = 0.0
    covariate_shift: float = 0.5
    confounding: float = 0.0
    noise_scale: float = 0.5
    theta_scale: float = 1.0
    lengthscale: float = 1.0
    n_target: int = 50

    def __post_init__(self):
        if self.n_sources < 1:
            raise ValueError(f"n_sources must be >= 1 (the empty source set leaves nothing to transfer), "
                             f"got {self.n_sources}")
        if len(self.source_size) not in (1, self.n_sources):
            raise ValueError(f"source_size needs 1 entry or one per source ({self.n_sources}), "
                             f"got {len(self.source_size)}: {self.source_size}")
        if min(self.source_size) < 1:
            raise ValueError(f"every source needs at least one point, got source_size={self.source_size}")
        for name in ("n_features", "n_proxy", "n_target"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("proxy_noise", "noise_scale", "theta_scale", "lengthscale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.heterogeneity < 0 or self.covariate_shift < 0:
            raise ValueError(f"heterogeneity and covariate_shift must be >= 0, got {self.heterogeneity}, "
                             f"{self.covariate_shift}")

    @property
    def sizes(self) -> tuple[int, ...]:
        """Points in each source."""
        return self.source_size * self.n_sources if len(self.source_size) == 1 else self.source_size

    def task_labels(self) -> np.ndarray:
        """[N] int32 source label of each pooled point (static: a function of the sizes only)."""
        return np.repeat(np.arange(self.n_sources, dtype=np.int32), self.sizes)


@functools.partial(jax.jit, static_argnames="config")
def simulate(
    key: jax.Array,
    config: SimulatorConfig,
    *,
    heterogeneity: Optional[jax.Array] = None,
    proxy_noise: Optional[jax.Array] = None,
    prior_misspecification: Optional[jax.Array] = None,
) -> tuple[TransferData, TransferTruth]:
    """Draws one transfer problem.

    Args:
      key: a PRNG key.
      config: the simulator knobs (shapes are static).
      heterogeneity, proxy_noise, prior_misspecification: optional (traceable) overrides of
        the config's values, so a sweep can ``vmap`` over them. The standard-normal draws
        depend only on ``key``, so one key across a sweep gives common random numbers.

    Returns:
      ``(data, truth)``.

    Example:
      >>> data, truth = simulate(jax.random.PRNGKey(0), SimulatorConfig(n_sources=3))
      >>> data.x_source.shape, data.proxy.shape
      ((150, 3), (1,))
    """
    tau = config.heterogeneity if heterogeneity is None else heterogeneity
    sigma_z = config.proxy_noise if proxy_noise is None else proxy_noise
    centre = config.prior_misspecification if prior_misspecification is None else prior_misspecification
    task = jnp.asarray(config.task_labels())
    n, d, t = task.shape[0], config.n_features, config.n_target
    k_phi, k_shift, k_x, k_f, k_noise, k_proxy = jax.random.split(key, 6)

    phi = centre + tau * jax.random.normal(k_phi, (config.n_sources + 1,))
    phi_source, phi_target = phi[:-1], phi[-1]
    direction = jnp.full((d,), 1.0 / np.sqrt(d))
    task_all = jnp.concatenate([task, jnp.full((t,), config.n_sources)])  # the target is task K
    region = config.covariate_shift * jax.random.normal(k_shift, (config.n_sources + 1, d))
    region = region + config.confounding * phi[:, None] * direction
    x_all = region[task_all] + jax.random.normal(k_x, (n + t, d))
    shift = phi[task_all]

    if config.setting == "linear":
        theta = config.theta_scale * jax.random.normal(k_f, (d,))
        f_all = x_all @ theta
    else:
        theta = jnp.zeros((0,))
        cov = rbf_kernel(x_all, x_all, config.lengthscale, config.theta_scale)
        chol = jnp.linalg.cholesky(cov + 1e-5 * config.theta_scale**2 * jnp.eye(n + t))
        f_all = chol @ jax.random.normal(k_f, (n + t,))

    y_all = f_all + shift + config.noise_scale * jax.random.normal(k_noise, (n + t,))
    proxy = phi_target + sigma_z * jax.random.normal(k_proxy, (config.n_proxy,))
    data = TransferData(
        x_source=x_all[:n], y_source=y_all[:n], task_source=task, proxy=proxy,
        proxy_noise=jnp.asarray(sigma_z, jnp.float32), x_target=x_all[n:], y_target=y_all[n:],
    )
    truth = TransferTruth(theta, phi_source, phi_target, f_all[:n], f_all[n:])
    return data, truth


def validate_transfer_data(data: TransferData, *, batch_ndim: int = 0) -> None:
    """Checks shapes and values before any compute, with errors that say what to fix.

    Args:
      data: concrete (not traced) arrays; ``proxy`` may be None to be reported as missing.
      batch_ndim: leading batch axes shared by every field (a vmapped sweep has 1).

    Raises:
      TransferDataError: no proxy / proxy of the wrong shape, an empty source set,
        mismatched shapes, or non-finite values (naming the field and how many).
    """
    if not isinstance(data, TransferData):
        raise TransferDataError(f"expected a TransferData, got {type(data).__name__}")
    if data.proxy is None:
        raise TransferDataError(
            "no proxy: PROMPT-style transfer needs proxy readings z of the target's non-transferable effect "
            "phi*, as an array of shape [M] with M >= 1 (e.g. proxy=jnp.array([0.3]))")
    lead = "[batch..., ]" if batch_ndim else ""
    shapes = {name: np.shape(value) for name, value in data._asdict().items()}
    batch = shapes["x_source"][:batch_ndim]

    def core(name: str, ndim: int, what: str) -> tuple[int, ...]:
        shape = shapes[name]
        if len(shape) != batch_ndim + ndim or shape[:batch_ndim] != batch:
            raise TransferDataError(f"{name} must have shape {lead}{what}, got {shape}")
        return shape[batch_ndim:]

    n, d = core("x_source", 2, "[N, d]")
    if n == 0:
        raise TransferDataError("empty source set: x_source has 0 rows; transfer needs at least one source point")
    for name in ("y_source", "task_source"):
        if core(name, 1, "[N]") != (n,):
            raise TransferDataError(f"{name} must have shape {lead}[N] with N={n} (rows of x_source), got {shapes[name]}")
    proxy_shape = shapes["proxy"][batch_ndim:]
    if len(shapes["proxy"]) != batch_ndim + 1 or shapes["proxy"][:batch_ndim] != batch:
        raise TransferDataError(
            f"proxy must have shape {lead}[M]: M readings of the scalar target effect phi*; got {shapes['proxy']}"
            " (several readings go along one axis, e.g. jnp.array([z1, z2]))")
    if proxy_shape[0] == 0:
        raise TransferDataError("no proxy: proxy has 0 readings; pass at least one reading of phi* (shape [M], M >= 1)")
    core("proxy_noise", 0, "[] (a scalar)")
    t, d_target = core("x_target", 2, "[T, d]")
    if d_target != d:
        raise TransferDataError(f"x_target has {d_target} features but x_source has {d}")
    if core("y_target", 1, "[T]") != (t,):
        raise TransferDataError(f"y_target must have shape {lead}[T] with T={t} (rows of x_target), got {shapes['y_target']}")
    for name, value in data._asdict().items():
        bad = int(np.size(value) - np.isfinite(np.asarray(value)).sum())
        if bad:
            raise TransferDataError(f"{name} has {bad} non-finite value(s) (NaN or inf); drop or impute them first")
    if np.any(np.asarray(data.proxy_noise) <= 0):
        raise TransferDataError(f"proxy_noise must be > 0 (the proxy's noise sd), got {np.asarray(data.proxy_noise)}")
