"""Inference for the transfer models: a functional NUTS core, SVI, and diagnostics.

:func:`nuts_sample` and :func:`svi_sample` are pure functions of a key and the model's
array arguments, so they ``jit`` and ``vmap``: a whole sweep of problems is sampled in one
compiled call (:mod:`metafit.bayes.sweep`). NUTS runs all chains in one vectorised kernel
(numpyro's ``chain_method='vectorized'`` done by hand), which works on a single CPU device
without ``numpyro.set_host_device_count``; ``NutsConfig(chain_method='sequential')`` runs them
one after another in the same compiled call instead (``lax.map``), which traces and compiles
the sampler without batching its while loops: 1.5-2x less compile time, and on a CPU no lane
waits for another chain's longest trajectory.

Diagnostics (:func:`diagnose`) are computed outside the compiled code, on the returned
draws: split R-hat and effective sample size per site (numpyro.diagnostics), and the
number of divergent transitions. :func:`check_diagnostics` warns with
:class:`PosteriorDiagnosticsWarning` when they are poor and says what to try.

Example:
    >>> import numpyro, numpyro.distributions as dist
    >>> def model(y):
    ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with numpyro.plate("data", y.shape[0]):
    ...         numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> draws, diag = run_nuts(model, jax.random.PRNGKey(0), NutsConfig(num_warmup=100, num_samples=100),
    ...                        y=jnp.ones(5))
    >>> draws.samples["mu"].shape    # [chains, samples]
    (4, 100)
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from numpyro.optim import optax_to_numpyro

Samples = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class NutsConfig:
    """NUTS settings.

    Attributes:
      num_warmup: adaptation steps per chain (step size and diagonal/dense mass matrix).
      num_samples: kept draws per chain.
      num_chains: chains, run as one vectorised kernel (or one after another, see ``chain_method``).
      target_accept: target acceptance probability of the step-size adaptation.
      max_tree_depth: cap on the trajectory doubling (2**depth leapfrog steps).
      dense_mass: adapt a dense mass matrix instead of a diagonal one.
      chain_method: 'vectorized' (all chains in one batched kernel: best on an accelerator) or
        'sequential' (a ``lax.map`` over chains in the same compiled call: the unbatched sampler,
        cheaper to compile; on a CPU about as fast to run). Chain ``c`` starts from the same key
        either way.
    """

    num_warmup: int = 300
    num_samples: int = 300
    num_chains: int = 4
    target_accept: float = 0.8
    max_tree_depth: int = 8
    dense_mass: bool = False
    chain_method: Literal["vectorized", "sequential"] = "vectorized"

    def __post_init__(self):
        if self.chain_method not in ("vectorized", "sequential"):
            raise ValueError(f"chain_method must be 'vectorized' or 'sequential', got {self.chain_method!r}")
        if self.num_samples < 2 or self.num_chains < 1 or self.num_warmup < 0:
            raise ValueError(f"NUTS needs num_samples >= 2, num_chains >= 1, num_warmup >= 0; got {self}")
        if not 0.0 < self.target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {self.target_accept}")


@dataclasses.dataclass(frozen=True)
class SviConfig:
    """Stochastic variational inference settings.

    Attributes:
      steps: Adam steps on the negative ELBO.
      lr: Adam learning rate.
      guide: 'normal' (mean-field AutoNormal) or 'mvn' (full-rank AutoMultivariateNormal).
      num_samples: draws taken from the fitted guide.
      num_particles: Monte Carlo samples per ELBO estimate.
    """

    steps: int = 2000
    lr: float = 0.02
    guide: Literal["normal", "mvn"] = "mvn"
    num_samples: int = 400
    num_particles: int = 1

    def __post_init__(self):
        if self.steps < 1 or self.num_samples < 2 or self.num_particles < 1 or not self.lr > 0:
            raise ValueError(f"SVI needs steps >= 1, num_samples >= 2, num_particles >= 1 and lr > 0; got {self}")


class Draws(NamedTuple):
    """Posterior draws, chain-major.

    Attributes:
      samples: site name -> [chains, draws, ...] (latent and deterministic sites).
      diverging: [chains, draws] bool (NUTS) or None (SVI).
      num_steps: [chains, draws] leapfrog steps per NUTS draw (the cost), or None (SVI).
      losses: [steps] negative ELBO per SVI step, or None (NUTS).
    """

    samples: Samples
    diverging: Optional[jax.Array] = None
    num_steps: Optional[jax.Array] = None
    losses: Optional[jax.Array] = None


def nuts_sample(model: Callable, key: jax.Array, config: NutsConfig, **model_kwargs: Any) -> Draws:
    """Runs ``config.num_chains`` NUTS chains on ``model(**model_kwargs)``; pure and ``vmap``-able.

    Warmup adapts the step size and mass matrix (Stan's windowed scheme, numpyro's
    implementation); every site is sampled in its unconstrained space and mapped back.

    Args:
      model: a numpyro model; bind non-array options with ``functools.partial`` first so
        every entry of ``model_kwargs`` is an array (then the call traces cleanly).
      key: a PRNG key (raw ``uint32[2]``).
      config: NUTS settings (static).
      **model_kwargs: the model's array arguments (data).

    Returns:
      :class:`Draws` with ``samples[name]`` of shape [chains, num_samples, ...].
    """
    kernel = NUTS(model, target_accept_prob=config.target_accept, max_tree_depth=config.max_tree_depth,
                  dense_mass=config.dense_mass)
    keys = jax.random.split(key, config.num_chains)
    if config.chain_method == "sequential":
        # One chain's sampler, mapped over the chain keys: traced and compiled without vmap's batching
        # of NUTS's while loops (the bulk of a vectorised sampler's compile time).
        def chain(chain_key):
            z, diverging, num_steps = _run_chain(kernel, kernel.init(chain_key, config.num_warmup,
                                                                     model_kwargs=model_kwargs), config, model_kwargs)
            return jax.vmap(kernel.postprocess_fn((), model_kwargs))(z), diverging, num_steps

        samples, diverging, num_steps = lax.map(chain, keys)
        return Draws(samples, diverging, num_steps)
    # A batch of keys makes numpyro initialise (and later step) all chains with one vmap.
    state = kernel.init(keys, config.num_warmup, model_kwargs=model_kwargs)
    z, diverging, num_steps = _run_chain(kernel, state, config, model_kwargs)
    constrain = jax.vmap(jax.vmap(kernel.postprocess_fn((), model_kwargs)))
    samples = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), constrain(z))  # [draws, chains] -> [chains, draws]
    return Draws(samples, diverging.T, num_steps.T)


def _run_chain(kernel: NUTS, state: Any, config: NutsConfig, model_kwargs: dict) -> tuple[Any, jax.Array, jax.Array]:
    """Warmup then sampling from ``state``; returns the kept (unconstrained) draws, divergences and
    leapfrog steps, [num_samples, ...] (plus the chain axis of a vectorised state)."""
    # Warmup and sampling are one loop over the same transition (numpyro's kernel adapts while
    # its step counter is below num_warmup): the NUTS tree building is traced and compiled once
    # instead of once per phase, which halves the compile time (the bulk of a small posterior's
    # cost). Each step writes its draw to slot max(i - num_warmup, 0), so the warmup steps all
    # land in slot 0, which the first kept draw overwrites.
    def step(i, carry):
        state, kept = carry
        state = kernel.sample(state, (), model_kwargs)
        slot = jnp.maximum(i - config.num_warmup, 0)
        kept = jax.tree.map(lambda buffer, value: lax.dynamic_update_index_in_dim(buffer, value, slot, 0),
                            kept, (state.z, state.diverging, state.num_steps))
        return state, kept

    empty = jax.tree.map(lambda a: jnp.zeros((config.num_samples, *a.shape), a.dtype),
                         (state.z, state.diverging, state.num_steps))
    return lax.fori_loop(0, config.num_warmup + config.num_samples, step, (state, empty))[1]


def svi_sample(model: Callable, key: jax.Array, config: SviConfig, **model_kwargs: Any) -> Draws:
    """Fits an autoguide by SVI (Adam on the negative ELBO) and draws from it; pure and ``vmap``-able.

    The optimisation is a ``lax.scan`` over ``config.steps`` updates of numpyro's functional
    ``SVI.init``/``SVI.update``; draws include deterministic sites (via ``Predictive``).

    Returns:
      :class:`Draws` with ``samples[name]`` of shape [1, num_samples, ...] and the loss curve.
    """
    guide_cls = AutoMultivariateNormal if config.guide == "mvn" else AutoNormal
    guide = guide_cls(model)
    svi = SVI(model, guide, optax_to_numpyro(optax.adam(config.lr)), Trace_ELBO(num_particles=config.num_particles))
    k_init, k_draw = jax.random.split(key)
    state = svi.init(k_init, **model_kwargs)

    def step(state, _):
        state, loss = svi.update(state, **model_kwargs)
        return state, loss

    state, losses = lax.scan(step, state, None, length=config.steps)
    params = svi.get_params(state)
    model_trace = handlers.trace(handlers.seed(model, k_draw)).get_trace(**model_kwargs)
    sites = [name for name, site in model_trace.items()
             if site["type"] == "deterministic" or (site["type"] == "sample" and not site["is_observed"])]
    predictive = Predictive(model, guide=guide, params=params, num_samples=config.num_samples, return_sites=sites)
    draws = predictive(k_draw, **model_kwargs)
    return Draws({k: v[None] for k, v in draws.items()}, losses=losses)


# --------------------------------------------------------------------------- diagnostics


class PosteriorDiagnosticsWarning(UserWarning):
    """NUTS diagnostics are poor: R-hat high, effective sample size low, or divergences."""


class Diagnostics(NamedTuple):
    """Convergence summary of one posterior.

    Attributes:
      max_rhat: largest split R-hat over all scalar components of all sites.
      min_ess: smallest effective sample size (summed over chains).
      divergences: number of divergent transitions after warmup.
      draws: total kept draws (chains x samples).
      worst_site: the site holding the largest R-hat.
    """

    max_rhat: float
    min_ess: float
    divergences: int
    draws: int
    worst_site: str


def diagnose(draws: Draws) -> Diagnostics:
    """Split R-hat, ESS and divergences of ``draws`` (concrete arrays; host-side numpy)."""
    max_rhat, min_ess, worst = 1.0, np.inf, ""
    n_draws = 0
    for name, value in draws.samples.items():
        value = np.asarray(value, np.float64)
        n_draws = value.shape[0] * value.shape[1]
        if value.shape[1] < 4 or np.all(value.std(axis=(0, 1)) == 0):
            continue
        varying = value.std(axis=(0, 1)) > 0  # a constant component has no R-hat or ESS
        rhat = np.asarray(split_gelman_rubin(value))[varying]
        ess = np.asarray(effective_sample_size(value))[varying]
        if rhat.size and np.nanmax(rhat) > max_rhat:
            max_rhat, worst = float(np.nanmax(rhat)), name
        if ess.size:
            min_ess = min(min_ess, float(np.nanmin(ess)))
    divergences = 0 if draws.diverging is None else int(np.asarray(draws.diverging).sum())
    return Diagnostics(max_rhat, float(min_ess), divergences, n_draws, worst)


@dataclasses.dataclass(frozen=True)
class ConvergenceGate:
    """When a NUTS posterior counts as converged (and a table may report what it predicts).

    Thresholds follow Vehtari et al. (2021): split R-hat above 1.05 means the chains disagree;
    fewer than 100 effective draws (summed over chains) make posterior means and quantiles
    noisy; divergent transitions mean the sampler missed part of the posterior, so more than
    ``max_divergent_fraction`` of the kept draws fails the posterior. R-hat and ESS are the
    worst over every scalar component of every sampled and deterministic site
    (:class:`Diagnostics`).
    """

    max_rhat: float = 1.05
    min_ess: float = 100.0
    max_divergent_fraction: float = 0.01

    def failures(self, max_rhat: float, min_ess: float, divergences: int, draws: int, worst_site: str = "") -> list[str]:
        """What fails (empty when converged), each as a short phrase with the measured value."""
        problems = []
        if not max_rhat <= self.max_rhat:  # NaN fails too
            site = f" (site '{worst_site}')" if worst_site else ""
            problems.append(f"R-hat {max_rhat:.3f} > {self.max_rhat}{site}")
        if not min_ess >= self.min_ess:
            problems.append(f"ESS {min_ess:.0f} < {self.min_ess:.0f}")
        if divergences > self.max_divergent_fraction * draws:
            problems.append(f"{divergences} divergent transitions of {draws}")
        return problems


def check_diagnostics(diag: Diagnostics, *, gate: ConvergenceGate = ConvergenceGate(), context: str = "",
                      warn: bool = True) -> list[str]:
    """Lists what fails ``gate`` in ``diag`` and, if ``warn``, emits a :class:`PosteriorDiagnosticsWarning`."""
    problems = gate.failures(diag.max_rhat, diag.min_ess, diag.divergences, diag.draws, diag.worst_site)
    if problems and warn:
        where = f"{context}: " if context else ""
        warnings.warn(
            f"{where}poor NUTS diagnostics: {'; '.join(problems)}. Try more num_warmup/num_samples, a higher "
            "target_accept (divergences), or more chains; results from this posterior may be unreliable.",
            PosteriorDiagnosticsWarning, stacklevel=2)
    return problems


def run_nuts(model: Callable, key: jax.Array, config: NutsConfig, *, check: bool = True,
             **model_kwargs: Any) -> tuple[Draws, Diagnostics]:
    """Jit-compiles and runs :func:`nuts_sample`, then diagnoses (and warns) -- the one-posterior entry point."""
    draws = _jitted_nuts(model, config)(key, **strong_types(model_kwargs))
    diag = diagnose(draws)
    if check:
        check_diagnostics(diag, context=getattr(model, "__name__", "") or getattr(getattr(model, "func", None), "__name__", ""))
    return draws, diag


def strong_types(tree: Any) -> Any:
    """The same arrays without JAX's weak types, so ``jnp.full(n, 0.2)`` and ``jnp.ones(n)`` share
    one compiled function (a weak-typed argument is a different signature and recompiles)."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.asarray(a).dtype), tree)


@functools.lru_cache(maxsize=64)
def _jitted_nuts(model: Callable, config: NutsConfig) -> Callable:
    # Cached per (model, config) so repeated calls reuse one compiled sampler.
    return jax.jit(lambda key, **kwargs: nuts_sample(model, key, config, **kwargs))
