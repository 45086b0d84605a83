"""NUTS and SVI against closed forms; the oracle's consistency; diagnostics warnings.

Tolerances come from the effective sample size: a posterior mean estimated from ESS draws
has Monte Carlo sd ``sqrt(var / ESS)`` and a variance estimate has relative sd
``sqrt(2 / ESS)`` (Gaussian posterior); the checks allow 4 of those sds.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import NUTS

from metafit.bayes import (
    ConvergenceGate,
    Diagnostics,
    Draws,
    NutsConfig,
    PosteriorDiagnosticsWarning,
    PriorConfig,
    SimulatorConfig,
    SviConfig,
    check_diagnostics,
    diagnose,
    fit_transfer,
    linear_posterior,
    run_nuts,
    simulate,
    svi_sample,
)
from metafit.bayes.methods import MethodConfig
from metafit.bayes.models import prompt_model

PRIOR = PriorConfig(theta_scale=1.5, noise_scale=0.5)
NUTS_CONFIG = NutsConfig(num_warmup=300, num_samples=500, num_chains=4)
# One model object for every call, so run_nuts compiles it once for the whole module.
MODEL = functools.partial(prompt_model, prior=PRIOR, function="linear")


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2)).astype(np.float32)
    y = (x @ np.array([1.0, -0.5]) + 0.7 + 0.5 * rng.normal(size=30)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y), dict(x_target=jnp.zeros((1, 2)), proxy_mean=jnp.asarray(0.3),
                                                 proxy_var=jnp.asarray(0.5))


def closed_form(x, y, extra, noise_var):
    """(theta, phi_source) posterior: design [x, 1], prior N((0, 0, m_q), diag(s^2, s^2, v_q))."""
    design = jnp.concatenate([x, jnp.ones((x.shape[0], 1))], 1)
    prior_mean = jnp.array([0.0, 0.0, extra["proxy_mean"]])
    prior_var = jnp.array([PRIOR.theta_scale**2] * 2 + [extra["proxy_var"]])
    return linear_posterior(design, y, prior_mean, prior_var, noise_var)


def assert_matches(draws: Draws, expected):
    value = np.concatenate([np.asarray(draws.samples["theta"]), np.asarray(draws.samples["phi_source"])[..., None]], -1)
    ess = effective_sample_size(value)
    mean, var = value.mean((0, 1)), value.var((0, 1))
    want_mean, want_var = np.asarray(expected.mean), np.diag(np.asarray(expected.var))
    assert np.all(ess > 300), ess
    np.testing.assert_array_less(np.abs(mean - want_mean), 4 * np.sqrt(want_var / ess))
    np.testing.assert_array_less(np.abs(var / want_var - 1), 4 * np.sqrt(2 / ess))


@pytest.fixture(scope="module")
def conjugate_draws(regression):
    """NUTS with every weight 1 and with every weight 0.2, counting how often the NUTS transition is traced."""
    x, y, extra = regression
    traced = []
    real_sample = NUTS.sample

    def counting_sample(self, *args, **kwargs):
        traced.append(1)  # runs once per trace of the transition, never per compiled step
        return real_sample(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NUTS, "sample", counting_sample)
        ones = run_nuts(MODEL, jax.random.PRNGKey(0), NUTS_CONFIG, x=x, y=y, weights=jnp.ones(30), **extra)
        fifths = run_nuts(MODEL, jax.random.PRNGKey(1), NUTS_CONFIG, x=x, y=y, weights=jnp.full(30, 0.2), **extra)
    return {1.0: ones, 0.2: fifths, "traced": len(traced)}


def test_nuts_matches_the_conjugate_posterior_with_all_weights_one(regression, conjugate_draws):
    x, y, extra = regression
    draws, diag = conjugate_draws[1.0]
    assert draws.samples["theta"].shape == (4, 500, 2) and diag.divergences == 0 and diag.max_rhat < 1.02
    assert_matches(draws, closed_form(x, y, extra, PRIOR.noise_scale**2))


def test_nuts_transition_is_compiled_once_for_warmup_sampling_and_both_weightings(conjugate_draws):
    # warmup and sampling share one loop, and weights of another value (weak-typed jnp.full vs
    # jnp.ones) reuse the compiled sampler: one trace of NUTS's tree building in all
    assert conjugate_draws["traced"] == 1


def test_power_likelihood_with_weight_w_is_the_posterior_with_noise_variance_over_w(regression, conjugate_draws):
    x, y, extra = regression
    w = 0.2
    draws, _ = conjugate_draws[w]
    assert_matches(draws, closed_form(x, y, extra, PRIOR.noise_scale**2 / w))
    wider = closed_form(x, y, extra, PRIOR.noise_scale**2)
    assert np.all(np.diag(closed_form(x, y, extra, PRIOR.noise_scale**2 / w).var) > np.diag(wider.var))


def test_svi_full_rank_guide_recovers_the_conjugate_posterior(regression):
    x, y, extra = regression
    config = SviConfig(steps=1500, lr=0.02, guide="mvn", num_samples=2000)
    draws = jax.jit(lambda k: svi_sample(MODEL, k, config, x=x, y=y, weights=jnp.ones(30), **extra))(
        jax.random.PRNGKey(2))
    want = closed_form(x, y, extra, PRIOR.noise_scale**2)
    got = np.concatenate([draws.samples["theta"][0], draws.samples["phi_source"][0][:, None]], -1)
    # SVI is exact in the family here (Gaussian posterior, full-rank guide) up to optimisation noise.
    np.testing.assert_allclose(got.mean(0), want.mean, atol=0.05)
    np.testing.assert_allclose(got.std(0), np.sqrt(np.diag(want.var)), rtol=0.15)
    assert draws.losses.shape == (1500,) and float(draws.losses[-100:].mean()) < float(draws.losses[:100].mean())


def oracle_closed_form(data, n_sources: int, prior: PriorConfig):
    """The oracle model is conjugate: (theta, phi_1..K) with design [x, onehot(task)]."""
    design = jnp.concatenate([data.x_source, jax.nn.one_hot(data.task_source, n_sources)], 1)
    d = data.x_source.shape[1]
    prior_mean = jnp.concatenate([jnp.zeros(d), jnp.full(n_sources, prior.phi_mean)])
    prior_var = jnp.concatenate([jnp.full(d, prior.theta_scale**2), jnp.full(n_sources, prior.phi_scale**2)])
    return linear_posterior(design, data.y_source, prior_mean, prior_var, prior.noise_scale**2)


def test_oracle_recovers_theta_as_data_grow():
    prior = PriorConfig()
    errors, spreads, posts = [], [], []
    sim = SimulatorConfig(n_sources=3, source_size=(1000,), n_features=2, heterogeneity=2.0, n_target=5)
    data, truth = simulate(jax.random.PRNGKey(3), sim)  # one compiled simulation: the small problem is a subset
    first_ten = np.concatenate([np.arange(10) + 1000 * k for k in range(3)])
    small = data._replace(x_source=data.x_source[first_ten], y_source=data.y_source[first_ten],
                          task_source=data.task_source[first_ten])
    for subset in (small, data):
        posts.append(oracle_closed_form(subset, 3, prior))
        errors.append(float(jnp.abs(posts[-1].mean[:2] - truth.theta).max()))
        spreads.append(float(jnp.sqrt(jnp.diag(posts[-1].var)[:2]).max()))
    assert all(a > b for a, b in zip(spreads, spreads[1:]))            # concentrates ~ 1/sqrt(n)
    assert all(e < 4 * s for e, s in zip(errors, spreads)) and errors[-1] < 0.05   # ... on the true theta
    # The oracle method's NUTS posterior is that closed form (the 30-point problem, tolerance from ESS;
    # sequential chains compile in half the time of vectorised ones, which the conjugate tests above use).
    config = MethodConfig(nuts=NutsConfig(num_warmup=200, num_samples=250, num_chains=2, chain_method="sequential"))
    fit, diag = fit_transfer("oracle", small, n_sources=3, key=jax.random.PRNGKey(4), config=config)
    theta = np.asarray(fit.draws.samples["theta"])
    ess = effective_sample_size(theta)
    post = posts[0]
    sd = np.sqrt(np.diag(np.asarray(post.var))[:2])
    np.testing.assert_array_less(np.abs(theta.mean((0, 1)) - np.asarray(post.mean[:2])), 4 * sd / np.sqrt(ess))
    assert np.all(ess > 100) and diag.divergences == 0


def test_poor_diagnostics_warn_and_good_ones_do_not():
    rng = np.random.default_rng(0)
    stuck = {"theta": jnp.asarray(rng.normal(size=(2, 100)) + np.array([[0.0], [5.0]]))}  # chains disagree
    diag = diagnose(Draws(stuck, jnp.zeros((2, 100), bool).at[0, :3].set(True)))  # 3 of 200 > 1 %
    assert diag.max_rhat > 1.5 and diag.divergences == 3 and diag.worst_site == "theta"
    with pytest.warns(PosteriorDiagnosticsWarning, match="R-hat .* divergent"):
        check_diagnostics(diag)
    healthy = diagnose(Draws({"theta": jnp.asarray(rng.normal(size=(4, 400)))}, jnp.zeros((4, 400), bool)))
    assert check_diagnostics(healthy, warn=False) == [] and isinstance(healthy, Diagnostics)
    # The gate's edges: 16 divergences of 1600 draws (1 %) pass, 17 fail; R-hat 1.05 passes, NaN fails.
    gate = ConvergenceGate()
    assert gate.failures(1.05, 100.0, 16, 1600) == [] and gate.failures(1.0, 100.0, 17, 1600) == [
        "17 divergent transitions of 1600"]
    assert gate.failures(float("nan"), 99.0, 0, 1600) == ["R-hat nan > 1.05", "ESS 99 < 100"]
