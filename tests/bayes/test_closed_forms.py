"""Pooling and the hierarchical mixture against conjugate and enumerated closed forms.

* Pooling with a linear f is conjugate: (theta, phi) has a Gaussian posterior, the proxy being
  one more observation of phi (design row [0, 1], noise sigma_z^2); the model's log joint must
  equal that posterior's log density plus the log evidence, at any point.
* The mixture with 2 components, f = 0 (inputs 0), mu and tau held fixed, 6 points: given the
  assignments t (2^6 = 64 of them) the offsets are independent conjugate normals and the
  Dirichlet(1, 1) weights integrate to p(t) = n_a! n_b! / (n + 1)!. The ordered model's
  (phi_1, phi_2) is the sorted pair of the exchangeable model, so E[phi_1] = E[min(phi_a, phi_b)]
  (Clark's formula per t), and P(t_n = lower component) sums Phi over t. Given t the weights are
  Beta(1 + n_a, 1 + n_b), so E[w_1 w_2] = sum_t p(t | y) a b / ((a + b)(a + b + 1)); it is the
  posterior quantity the weight prior moves most (0.2155 under Dirichlet(1, 1), 0.2234 under
  Dirichlet(2, 2), 6 sds of its estimate apart); the offsets move by less than their sd. The exact
  log-joint test checks the weight prior's density term itself.

Tolerances are 4 Monte Carlo sds from each estimate's ESS, as in test_posteriors.py.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size
from numpyro.infer.util import log_density
from scipy.stats import dirichlet, multivariate_normal, norm

from metafit.bayes import NutsConfig, PriorConfig, linear_posterior, mixture_responsibilities, run_nuts
from metafit.bayes.models import mixture_model, pooled_model

PRIOR = PriorConfig(theta_scale=1.5, phi_mean=0.2, phi_scale=2.0, noise_scale=0.5)


def within_mc_error(draws: np.ndarray, want_mean: np.ndarray, want_sd: np.ndarray) -> None:
    """Posterior mean within 4 Monte Carlo sds (sd / sqrt(ESS)) of the closed form, per component."""
    ess = effective_sample_size(draws)
    assert np.all(ess > 200), ess
    np.testing.assert_array_less(np.abs(draws.mean((0, 1)) - want_mean), 4 * want_sd / np.sqrt(ess) + 1e-3)


def test_pooled_posterior_is_the_conjugate_normal_normal_posterior():
    """The pooled model's log joint minus the closed-form posterior's log density is the log evidence
    at every (theta, phi): so its posterior is exactly that Gaussian (the sampler itself is checked
    against the same algebra in test_posteriors.py)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 2)).astype(np.float32)
    y = (x @ np.array([0.8, -0.4]) + 1.3 + 0.5 * rng.normal(size=25)).astype(np.float32)
    proxy = np.array([0.9, 1.4], np.float32)
    kwargs = dict(x=jnp.asarray(x), y=jnp.asarray(y), x_target=jnp.zeros((1, 2)), proxy=jnp.asarray(proxy),
                  proxy_noise=jnp.asarray(0.7))
    model = functools.partial(pooled_model, prior=PRIOR, function="linear")
    # (theta, phi): design [x, 1] for the sources, [0, 0, 1] for each proxy reading.
    design = np.concatenate([np.c_[x, np.ones(25)], np.c_[np.zeros((2, 2)), np.ones(2)]])
    noise_var = np.r_[np.full(25, PRIOR.noise_scale**2), np.full(2, 0.7**2)]
    prior_mean = np.array([0.0, 0.0, PRIOR.phi_mean])
    prior_var = np.array([PRIOR.theta_scale**2] * 2 + [PRIOR.phi_scale**2])
    outcomes = np.r_[y, proxy]
    post = linear_posterior(jnp.asarray(design, jnp.float32), jnp.asarray(outcomes), jnp.asarray(prior_mean),
                            jnp.asarray(prior_var), jnp.asarray(noise_var))
    evidence = multivariate_normal(design @ prior_mean, design @ np.diag(prior_var) @ design.T + np.diag(noise_var))
    log_joint = jax.jit(lambda p: log_density(model, (), kwargs, {"theta": p[:2], "phi": p[2]})[0])
    for point in rng.normal(np.asarray(post.mean), 0.3, size=(5, 3)):
        joint = log_joint(jnp.asarray(point, jnp.float32))
        posterior = multivariate_normal(np.asarray(post.mean), np.asarray(post.var)).logpdf(point)
        np.testing.assert_allclose(float(joint) - posterior, evidence.logpdf(outcomes), rtol=1e-5, atol=1e-3)


MU, TAU, SIGMA = 0.0, 1.5, 0.5
WEIGHT_CONCENTRATION = 1.0  # mixture_model's source weights: Dirichlet(1, 1)
Y_MIX = np.array([-1.3, -0.9, -1.1, 0.8, 1.2, 0.1], np.float32)  # two groups and one point between them


def enumerated_mixture() -> dict[str, np.ndarray]:
    """E[phi_1], E[phi_2] (ordered), P(point n in the lower component) and E[w_1 w_2], by summing over all 2^n
    assignments."""
    n = Y_MIX.size
    log_weights, lower, upper, p_lower, weight_product = [], [], [], [], []
    for labels in itertools.product((0, 1), repeat=n):
        labels = np.array(labels)
        moments, log_evidence = [], 0.0
        for k in (0, 1):
            members = Y_MIX[labels == k]
            var = 1.0 / (1.0 / TAU**2 + members.size / SIGMA**2)
            mean = var * (MU / TAU**2 + members.sum() / SIGMA**2)
            moments.append((mean, var))
            cov = SIGMA**2 * np.eye(members.size) + TAU**2  # y_G ~ N(mu 1, sigma^2 I + tau^2 1 1^T)
            if members.size:
                _, logdet = np.linalg.slogdet(cov)
                resid = members - MU
                log_evidence += -0.5 * (resid @ np.linalg.solve(cov, resid) + logdet + members.size * math.log(2 * math.pi))
        a, b = np.bincount(labels, minlength=2) + WEIGHT_CONCENTRATION  # w | t ~ Beta(a, b)
        log_prior = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # p(t), up to a constant
        log_weights.append(log_prior + log_evidence)
        weight_product.append(a * b / ((a + b) * (a + b + 1)))
        (m_a, v_a), (m_b, v_b) = moments
        spread = math.sqrt(v_a + v_b)
        alpha = (m_a - m_b) / spread
        expected_max = m_a * norm.cdf(alpha) + m_b * norm.cdf(-alpha) + spread * norm.pdf(alpha)  # Clark (1961)
        upper.append(expected_max)
        lower.append(m_a + m_b - expected_max)
        a_below_b = norm.cdf((m_b - m_a) / spread)
        p_lower.append(np.where(labels == 0, a_below_b, 1.0 - a_below_b))
    post = np.exp(np.array(log_weights) - np.logaddexp.reduce(log_weights))
    return {"phi": np.array([post @ np.array(lower), post @ np.array(upper)]), "lower": post @ np.array(p_lower),
            "weight_product": post @ np.array(weight_product)}


def conditioned_mixture():
    return handlers.condition(functools.partial(mixture_model, n_components=2, prior=PRIOR, function="linear"),
                              {"phi_mean": jnp.asarray(MU), "phi_spread": jnp.asarray(TAU)})


MIXTURE_DATA = dict(x=jnp.zeros((Y_MIX.size, 1)), y=jnp.asarray(Y_MIX), x_target=jnp.zeros((1, 1)),
                    proxy=jnp.array([0.0]), proxy_noise=jnp.asarray(1.0))


def test_mixture_likelihood_is_the_sum_over_every_assignment():
    """The model's log joint = its prior terms + log sum over all 2^6 assignments of prod_n w_t N(y_n; phi_t, s^2)."""
    eta, probs, theta, eta_target = np.array([-0.7, 0.6]), np.array([0.3, 0.7]), 0.4, -0.2
    params = {"phi_sources_std": jnp.asarray(eta, jnp.float32), "source_probs": jnp.asarray(probs, jnp.float32),
              "theta": jnp.array([theta], jnp.float32), "phi_target_std": jnp.asarray(eta_target, jnp.float32)}
    joint = jax.jit(lambda p: log_density(conditioned_mixture(), (), MIXTURE_DATA, p)[0])(params)
    phi = MU + TAU * eta
    labels = np.array(list(itertools.product((0, 1), repeat=Y_MIX.size)))  # [64, 6]
    by_assignment = (np.log(probs)[labels] + norm.logpdf(Y_MIX, phi[labels], SIGMA)).sum(1)
    prior_terms = (norm.logpdf(theta, 0, PRIOR.theta_scale) + norm.logpdf(eta).sum()
                   + dirichlet.logpdf(probs, [WEIGHT_CONCENTRATION] * 2)
                   + norm.logpdf(eta_target) + norm.logpdf(0.0, MU + TAU * eta_target, 1.0)
                   + norm.logpdf(MU, PRIOR.phi_mean, PRIOR.phi_scale) + math.log(2) + norm.logpdf(TAU, 0, PRIOR.phi_scale))
    np.testing.assert_allclose(float(joint), prior_terms + np.logaddexp.reduce(by_assignment), rtol=1e-5)


@pytest.fixture(scope="module")
def mixture_draws():
    # Sequential chains: the unbatched sampler compiles in half the time of the vectorised one (its
    # closed-form check is test_posteriors.py's); 4 x 500 draws leave an ESS near 1000 per component.
    config = NutsConfig(num_warmup=300, num_samples=500, num_chains=4, chain_method="sequential")
    draws, diag = run_nuts(conditioned_mixture(), jax.random.PRNGKey(1), config, check=False, **MIXTURE_DATA)
    assert diag.max_rhat < 1.02 and diag.divergences <= 0.01 * diag.draws, diag
    return draws


@pytest.mark.slow  # compiling NUTS for the mixture: the most expensive test of the package
def test_mixture_offsets_match_the_enumerated_posterior(mixture_draws):
    phi = np.asarray(mixture_draws.samples["phi_sources"])
    assert np.all(phi[..., 0] <= phi[..., 1])  # ordered: no label switching
    want = enumerated_mixture()
    within_mc_error(phi, want["phi"], phi.std((0, 1)))


@pytest.mark.slow
def test_mixture_assignments_match_the_enumerated_posterior(mixture_draws):
    samples = mixture_draws.samples
    n = Y_MIX.size
    resp = mixture_responsibilities(jnp.asarray(Y_MIX), jnp.zeros(n), samples["phi_sources"], samples["source_probs"],
                                    SIGMA)
    np.testing.assert_allclose(np.asarray(resp).sum(-1), 1.0, rtol=1e-5)
    lower = np.asarray(resp[..., 0])  # [chains, draws, n]
    want = enumerated_mixture()["lower"]
    assert want[:3].min() > 0.9 and want[3:5].max() < 0.1 and 0.2 < want[5] < 0.8  # the data are what they seem
    within_mc_error(lower, want, lower.std((0, 1)))


@pytest.mark.slow
def test_mixture_weights_match_the_enumerated_posterior(mixture_draws):
    """E[w_1 w_2] (label-free) depends on the weight prior: with Dirichlet(2, 2) in the model this fails."""
    weight_product = np.prod(np.asarray(mixture_draws.samples["source_probs"]), -1)  # [chains, draws]
    within_mc_error(weight_product[..., None], enumerated_mixture()["weight_product"], weight_product.std())
