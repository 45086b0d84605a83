"""Deep-kernel GP vs a numpy exact GP, EI vs numeric integration, greedy portfolio vs brute force."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.hpo import metadataset
from metafit.hpo.acquisition import expected_improvement, greedy_portfolio, portfolio, suggest
from metafit.hpo.surrogate import Surrogate
from metafit.hpo.surrogate import gp_nll as _gp_nll
from metafit.hpo.surrogate import gp_posterior as _gp_posterior

gp_nll, gp_posterior = jax.jit(_gp_nll), jax.jit(_gp_posterior)  # one compilation each, not one per operation
from hpo_fixtures import TINY_SPACE, meta_file  # noqa: F401 (a fixture)


def numpy_gp(z, y, z_star, mean, scale, length, noise):
    def kern(a, b):
        sq = ((a[:, None] - b[None]) ** 2).sum(-1)
        return scale**2 * np.exp(-0.5 * sq / length**2)

    k = kern(z, z) + noise**2 * np.eye(len(z))
    ks = kern(z, z_star)
    inv = np.linalg.inv(k)
    post_mean = mean + ks.T @ inv @ (y - mean)
    post_var = scale**2 - np.einsum("ij,ik,kj->j", ks, inv, ks)
    r = y - mean
    nll = 0.5 * r @ inv @ r + 0.5 * np.linalg.slogdet(k)[1] + 0.5 * len(y) * np.log(2 * np.pi)
    return post_mean, post_var, nll


@pytest.fixture(scope="module")
def gp_case():
    rng = np.random.default_rng(0)
    z, z_star, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)), rng.normal(size=7)
    params = {"mean": jnp.asarray(0.3), "log_scale": jnp.log(1.5), "log_length": jnp.log(0.8),
              "log_noise": jnp.log(0.2)}
    return z, z_star, y, params


def test_gp_posterior_and_marginal_likelihood_match_numpy(gp_case):
    z, z_star, y, params = gp_case
    ref_mean, ref_var, ref_nll = numpy_gp(z, y, z_star, 0.3, 1.5, 0.8, 0.2)
    mask = jnp.ones(7)
    mean, var = gp_posterior(params, jnp.asarray(z), jnp.asarray(y), mask, jnp.asarray(z_star))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-5)
    assert float(gp_nll(params, jnp.asarray(z), jnp.asarray(y), mask)) == pytest.approx(ref_nll, rel=1e-5)


def test_padding_with_masked_points_changes_nothing(gp_case):
    """Fixed shapes: masked rows (any values) leave the posterior and likelihood of the real points as they are."""
    z, z_star, y, params = gp_case
    pad_z = np.concatenate([z, np.full((5, 3), 9.0)])
    pad_y = np.concatenate([y, np.full(5, -4.0)])
    mask = jnp.asarray([1.0] * 7 + [0.0] * 5)
    full = gp_posterior(params, jnp.asarray(z), jnp.asarray(y), jnp.ones(7), jnp.asarray(z_star))
    padded = gp_posterior(params, jnp.asarray(pad_z), jnp.asarray(pad_y), mask, jnp.asarray(z_star))
    np.testing.assert_allclose(padded[0], full[0], atol=1e-5)
    np.testing.assert_allclose(padded[1], full[1], atol=1e-5)
    assert float(gp_nll(params, jnp.asarray(pad_z), jnp.asarray(pad_y), mask)) == pytest.approx(
        float(gp_nll(params, jnp.asarray(z), jnp.asarray(y), jnp.ones(7))), rel=1e-5)


def test_expected_improvement_matches_numeric_integral():
    mean, std, best = np.asarray([0.2, 0.5, -0.1]), np.asarray([0.3, 0.1, 0.05]), 0.25
    y = np.linspace(-3, 3, 200001)
    for m, s, ei in zip(mean, std, expected_improvement(mean, std, best)):
        density = np.exp(-0.5 * ((y - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))
        assert ei == pytest.approx(np.trapezoid(np.maximum(best - y, 0) * density, y), rel=1e-4, abs=1e-8)


def test_greedy_portfolio_picks_best_average_then_best_complement():
    rng = np.random.default_rng(1)
    losses = rng.uniform(size=(5, 8))
    chosen = greedy_portfolio(losses, 3)
    assert chosen[0] == int(np.argmin(losses.sum(0)))
    second = min((c for c in range(8) if c != chosen[0]),
                 key=lambda c: np.minimum(losses[:, chosen[0]], losses[:, c]).sum())
    assert chosen[1] == second
    best_pair = min(itertools.combinations(range(8), 2), key=lambda p: losses[:, list(p)].min(1).sum())
    assert losses[:, chosen[:2]].min(1).sum() >= losses[:, list(best_pair)].min(1).sum() - 1e-12  # greedy <= optimal


@pytest.fixture(scope="module")
def surrogate(meta_file):
    meta = metadataset.load(meta_file, TINY_SPACE)
    return meta, Surrogate.fit(meta.drop_tasks([0, 2, 3]), steps=60, seed=0)  # 1 step: conditioned r = 0.82 < 0.85


def test_surrogate_fits_training_tasks_and_uses_the_target_curve_prefix(surrogate):
    """In-sample final losses are ranked right; a held-out task's first-fidelity losses make its finals predictable."""
    meta, model = surrogate
    configs, last = list(meta.configs), [TINY_SPACE.fidelities - 1] * len(meta.configs)
    in_sample, std = model.predict(meta.features[2], configs, last)
    assert np.corrcoef(in_sample, meta.loss[2, :, -1])[0, 1] > 0.9 and (std > 0).all()
    from metafit.hpo import surrogate as module

    before = module._posterior_jit._cache_size()
    history = [{"config": c, "curve": [meta.loss[1, i, 0], np.nan, np.nan, np.nan], "status": "ok"}
               for i, c in enumerate(configs)]
    conditioned, _ = model.predict(meta.features[1], configs, last, history)
    assert np.corrcoef(conditioned, meta.loss[1, :, -1])[0, 1] > 0.85
    assert module._posterior_jit._cache_size() == before  # padded context: more rows, no recompilation
    cost = model.predict_cost(meta.features[1], configs)
    assert np.corrcoef(cost, meta.cost[1])[0, 1] > 0.8


def test_portfolio_and_suggest_choose_among_candidates(surrogate):
    meta, model = surrogate
    configs = list(meta.configs)
    chosen = portfolio(model, 3, configs, meta.features[1])
    assert len(chosen) == 3 and all(c in configs for c in chosen)
    history = [{"config": chosen[0], "curve": [meta.loss[1, configs.index(chosen[0]), 0], np.nan, np.nan, np.nan],
                "status": "ok"}]
    point, fidelity = suggest(model, history, configs, meta.features[1], refit_steps=5)
    assert point in configs
    assert fidelity == 0 or (point == chosen[0] and fidelity == 1)  # a new config starts low; a promotion is one up


def test_cost_model_trains_in_one_compiled_loop(surrogate):
    """Any number of steps runs in the one compiled loop (no per-step dispatch, no recompilation)."""
    from metafit.hpo import surrogate as module

    meta, model = surrogate
    before = module._cost_fit._cache_size()
    x, y = module._cost_rows(meta.drop_tasks([0, 2, 3]), model.feature_mean, model.feature_std)
    params, _ = module._train_cost(x, y, seed=0, steps=300)  # the steps Surrogate.fit takes
    assert module._cost_fit._cache_size() == before
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(model.cost_params)):
        np.testing.assert_array_equal(got, want)  # the same training as the fixture's
