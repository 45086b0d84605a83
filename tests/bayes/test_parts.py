"""Closed forms, relevance weights, the simulator, the HSGP prior and bad input (no sampling here)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.bayes import (
    MethodConfig,
    PriorConfig,
    SimulatorConfig,
    TransferData,
    TransferDataError,
    fit_transfer,
    linear_posterior,
    normal_posterior,
    prompt_weights,
    proxy_posterior,
    rbf_kernel,
    relevance_weights,
    simulate,
    validate_transfer_data,
)
from metafit.bayes.gaussian import Gaussian, gp_condition, linear_kernel
from metafit.bayes.models import HSGP_BOUNDARY
from metafit.registry import UnknownNameError


def test_normal_posterior_by_hand():
    # prior N(0, 9), readings [1, 2] with noise var 1: precision 1/9 + 2, mean = var * 3.
    q = normal_posterior(0.0, 9.0, jnp.array([1.0, 2.0]), 1.0)
    assert np.isclose(q.var, 1 / (1 / 9 + 2)) and np.isclose(q.mean, 3 / (1 / 9 + 2))
    q = proxy_posterior(jnp.array([1.0, 2.0]), jnp.asarray(1.0), PriorConfig(phi_mean=0.0, phi_scale=3.0))
    assert np.isclose(q.mean, 3 / (1 / 9 + 2))


def test_linear_posterior_matches_numpy_and_weights_divide_noise():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    post = linear_posterior(jnp.asarray(x), jnp.asarray(y), jnp.zeros(3), jnp.full(3, 4.0), 0.5)
    precision = np.eye(3) / 4.0 + x.T @ x / 0.5
    np.testing.assert_allclose(post.var, np.linalg.inv(precision), rtol=1e-4)
    np.testing.assert_allclose(post.mean, np.linalg.solve(precision, x.T @ y / 0.5), rtol=1e-4)
    # A likelihood to the power w is the likelihood with noise variance / w.
    tempered = linear_posterior(jnp.asarray(x), jnp.asarray(y), jnp.zeros(3), jnp.full(3, 4.0), 0.5 / 0.3)
    powered = np.linalg.inv(np.eye(3) / 4.0 + 0.3 * x.T @ x / 0.5)
    np.testing.assert_allclose(tempered.var, powered, rtol=1e-4)


def test_gp_condition_equals_linear_regression_for_the_linear_kernel():
    # f(x*) given y under theta ~ N(0, s^2 I) is Bayesian linear regression: the two closed forms agree.
    rng = np.random.default_rng(1)
    x, xt, y = (jnp.asarray(a, jnp.float32) for a in (rng.normal(size=(15, 2)), rng.normal(size=(4, 2)), rng.normal(size=15)))
    cond = gp_condition(linear_kernel(x, x, 2.0), linear_kernel(x, xt, 2.0), jnp.diag(linear_kernel(xt, xt, 2.0)), y, 0.3)
    post = linear_posterior(x, y, 0.0, 4.0, 0.3)
    np.testing.assert_allclose(cond.mean, xt @ post.mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(cond.var, jnp.einsum("td,de,te->t", xt, post.var, xt), rtol=1e-3, atol=1e-4)


def test_relevance_weights_hand_built():
    y, fitted = jnp.array([0.0, 1.0, 3.0]), jnp.zeros(3)
    q = Gaussian(jnp.asarray(0.5), jnp.asarray(0.25))  # predictive sd^2 = 0.25 + 0.25 = 0.5
    z2 = (np.array([0.0, 1.0, 3.0]) - 0.5) ** 2 / 0.5
    np.testing.assert_allclose(relevance_weights(y, fitted, q, 0.25), np.exp(-z2 / 2), rtol=1e-5)
    np.testing.assert_allclose(relevance_weights(y, fitted, q, 0.25, normalise="max"), np.exp(-z2 / 2) / np.exp(-0.25),
                               rtol=1e-5)
    np.testing.assert_allclose(relevance_weights(y, fitted, q, 0.25, normalise="mean").sum(), 3.0, rtol=1e-5)
    far = relevance_weights(jnp.array([0.5, 100.0]), jnp.zeros(2), q, 0.25, min_weight=1e-6)
    assert far[0] == 1.0 and far[1] == 1e-6  # the floor keeps handlers.scale's scale positive


def test_prompt_weights_pick_the_source_that_resembles_the_target():
    # f = 0 (all inputs zero), source A has offset 1 (the target's), source B offset 5.
    y = jnp.concatenate([1.0 + 0.1 * jnp.sin(jnp.arange(10.0)), 5.0 + 0.1 * jnp.cos(jnp.arange(10.0))])
    data = TransferData(jnp.zeros((20, 2)), y, jnp.repeat(jnp.arange(2), 10), jnp.array([1.0, 1.1]), jnp.asarray(0.1),
                        jnp.zeros((3, 2)), jnp.zeros(3))
    prior = PriorConfig()
    weights = prompt_weights(data, lambda a, b, p: linear_kernel(a, b, 1.0), prior,
                             proxy_posterior(data.proxy, data.proxy_noise, prior), MethodConfig())
    assert weights[:10].min() > 0.7 and weights[10:].max() < 1e-5


def test_hsgp_prior_covariance_approximates_the_rbf_kernel():
    from numpyro import handlers

    from metafit.bayes.models import hsgp_function

    x = jnp.linspace(-3, 3, 7)[:, None]
    prior = PriorConfig(lengthscale=1.0, amplitude=1.5, hyper_log_sd=1e-3)

    @jax.jit  # one compiled program, not one per eager operation and column
    def basis_cov():  # Var f = Phi diag(S) Phi^T: read S and Phi off the model with beta = identity columns
        seeded = handlers.seed(handlers.substitute(hsgp_function, {"lengthscale": 1.0, "amplitude": 1.5}), 0)
        with handlers.trace() as tr:
            seeded(x, x, prior)
        m = tr["basis_weights"]["value"].shape[0]
        column = lambda unit: handlers.substitute(hsgp_function, {"lengthscale": 1.0, "amplitude": 1.5,  # noqa: E731
                                                                  "basis_weights": unit})(x, x, prior)[0]
        features = jax.vmap(column, out_axes=1)(jnp.eye(m))
        return features @ features.T

    np.testing.assert_allclose(basis_cov(), rbf_kernel(x, x, 1.0, 1.5), atol=0.03 * 1.5**2)
    assert HSGP_BOUNDARY > 1


SIMULATOR = SimulatorConfig(n_sources=3, source_size=(5, 6, 7), n_features=2, n_proxy=2, n_target=4)


@pytest.fixture(scope="module")
def simulated():
    # heterogeneity passed (traced) in every call of the module, so they all share one compiled simulator
    return simulate(jax.random.PRNGKey(0), SIMULATOR, heterogeneity=SIMULATOR.heterogeneity)


@pytest.fixture(scope="module")
def problem(simulated):
    return simulated[0]


def test_simulator_shapes_truth_and_common_random_numbers(simulated):
    config = SIMULATOR
    data, truth = simulated
    assert data.x_source.shape == (18, 2) and data.proxy.shape == (2,) and data.x_target.shape == (4, 2)
    np.testing.assert_array_equal(data.task_source, np.repeat([0, 1, 2], [5, 6, 7]))
    np.testing.assert_allclose(data.y_source, truth.f_source + truth.phi_source[data.task_source], atol=2.5)
    # same key, different heterogeneity: the same standard-normal draws, rescaled
    _, wide = simulate(jax.random.PRNGKey(0), config, heterogeneity=2 * config.heterogeneity)
    np.testing.assert_allclose(wide.phi_source, 2 * truth.phi_source, rtol=1e-5)
    gp, gp_truth = simulate(jax.random.PRNGKey(0), SimulatorConfig(setting="gp", n_features=1))
    assert gp_truth.theta.shape == (0,) and np.isfinite(gp.y_source).all()
    with pytest.raises(ValueError, match="n_sources must be >= 1"):
        SimulatorConfig(n_sources=0)
    with pytest.raises(ValueError, match="source_size needs 1 entry or one per source"):
        SimulatorConfig(n_sources=3, source_size=(5, 6))


@pytest.mark.parametrize("change, message", [
    (dict(proxy=None), "no proxy"),
    (dict(proxy=jnp.zeros((0,))), "no proxy: proxy has 0 readings"),
    (dict(proxy=jnp.zeros((2, 1))), r"proxy must have shape \[M\]"),
    (dict(proxy=jnp.asarray(0.3)), r"proxy must have shape \[M\]"),
    (dict(x_source=jnp.zeros((0, 2)), y_source=jnp.zeros(0), task_source=jnp.zeros(0, int)), "empty source set"),
    (dict(y_source=jnp.full(18, jnp.nan)), "y_source has 18 non-finite"),
    (dict(x_target=jnp.zeros((3, 3))), "x_target has 3 features but x_source has 2"),
    (dict(y_source=jnp.zeros(9)), r"y_source must have shape \[N\] with N=18"),
    (dict(proxy_noise=jnp.asarray(-1.0)), "proxy_noise must be > 0"),
])
def test_bad_input_is_refused_with_a_clear_error(problem, change, message):
    bad = problem._replace(**change)
    with pytest.raises(TransferDataError, match=message):
        validate_transfer_data(bad)
    with pytest.raises(TransferDataError, match=message):  # the public entry point checks before compiling
        fit_transfer("prompt", bad, n_sources=3, key=jax.random.PRNGKey(0))


def test_unknown_method_or_function_prior_names_the_valid_ones(problem):
    with pytest.raises(UnknownNameError, match="did you mean 'prompt'"):
        fit_transfer("prompty", problem, n_sources=3, key=jax.random.PRNGKey(0))
    with pytest.raises(UnknownNameError, match="valid names: gp, linear"):
        fit_transfer("no_transfer", problem, n_sources=3, key=jax.random.PRNGKey(0), function="spline")


def test_no_transfer_is_the_closed_form_prior_predictive(problem):
    fit, diag = fit_transfer("no_transfer", problem, n_sources=3, key=jax.random.PRNGKey(0))
    prior = PriorConfig()
    q = proxy_posterior(problem.proxy, problem.proxy_noise, prior)
    expected_var = prior.theta_scale**2 * (problem.x_target**2).sum(-1) + q.var + prior.noise_scale**2
    assert diag is None and fit.mean.shape == (1, 4)
    np.testing.assert_allclose(fit.mean[0], q.mean, rtol=1e-6)
    np.testing.assert_allclose(fit.var[0], expected_var, rtol=1e-5)
    assert math.isfinite(float(q.mean))
