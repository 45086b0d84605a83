import math

"""Closed-form checks of CleaR's parts: losses, GMM clean probability, routing gates, metrics, tasks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.robust.clean_prob import ema_losses, gmm_clean_probability
from metafit.robust.losses import (consistency_loss, coteaching_keep_fraction, coteaching_losses, cross_entropy,
                                   generalized_cross_entropy, small_loss_mask)
from metafit.robust.backbones import make_backbone
from metafit.robust.methods import CEConfig, ClearConfig, CoteachingConfig, GCEConfig, method_config
from metafit.robust.metrics import clean_auroc, mean_std, memorisation, peak_and_last, summarise_seeds
from metafit.robust.routing import inference_gates, routing_gates
from metafit.robust.tasks import encoded_splits, noise_key, noisy_task


def logits_and_labels(b=6, c=4, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (b, c)), jax.random.randint(k2, (b,), 0, c)


def test_cross_entropy_matches_log_softmax():
    logits, labels = logits_and_labels()
    expected = -jax.nn.log_softmax(logits)[jnp.arange(6), labels]
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-6)


def test_gce_limits_are_ce_and_mae():
    logits, labels = logits_and_labels()
    p = jax.nn.softmax(logits)[jnp.arange(6), labels]
    # q -> 0: (1 - p^q)/q -> -log p (CE);  q = 1: 1 - p (MAE up to a factor 2)
    np.testing.assert_allclose(generalized_cross_entropy(logits, labels, 1e-5), cross_entropy(logits, labels),
                               rtol=1e-3)
    np.testing.assert_allclose(generalized_cross_entropy(logits, labels, 1.0), 1 - p, rtol=1e-5)


def test_consistency_is_soft_ce_at_temperature_and_its_gradient():
    logits, _ = logits_and_labels()
    stored = jax.random.normal(jax.random.key(3), logits.shape)
    tau = 0.5
    teacher = jax.nn.softmax(stored / tau)
    expected = -(teacher * jax.nn.log_softmax(logits / tau)).sum(-1)
    np.testing.assert_allclose(consistency_loss(logits, stored, tau), expected, rtol=1e-6)
    # d/dz of CE(t, softmax(z/τ)) = (softmax(z/τ) - t) / τ; q̂ is a constant
    grad = jax.grad(lambda z: consistency_loss(z, stored, tau).sum())(logits)
    np.testing.assert_allclose(grad, (jax.nn.softmax(logits / tau) - teacher) / tau, atol=1e-6)
    assert not np.any(jax.grad(lambda s: consistency_loss(logits, s, tau).sum())(stored))


def test_small_loss_mask_keeps_the_smallest_with_a_traced_fraction():
    losses = jnp.array([0.5, 3.0, 0.1, 2.0, 0.7, 9.0])
    mask = jax.jit(small_loss_mask)(losses, jnp.float32(0.5))
    np.testing.assert_array_equal(mask, [1, 0, 1, 0, 1, 0])
    assert small_loss_mask(losses, 0.0).sum() == 1  # never an empty batch


def test_coteaching_trains_each_network_on_its_peers_selection():
    labels = jnp.array([0, 0, 0, 0])
    # network A is confident on samples 0, 1; network B on samples 2, 3
    logits_a = jnp.array([[5.0, 0], [5.0, 0], [0, 5.0], [0, 5.0]])
    logits_b = jnp.array([[0, 5.0], [0, 5.0], [5.0, 0], [5.0, 0]])
    loss_a, loss_b, _ = coteaching_losses(logits_a, logits_b, labels, 0.5)
    ce_a, ce_b = cross_entropy(logits_a, labels), cross_entropy(logits_b, labels)
    np.testing.assert_allclose(loss_a, ce_a[2:].mean(), rtol=1e-6)  # B's small-loss samples
    np.testing.assert_allclose(loss_b, ce_b[:2].mean(), rtol=1e-6)  # A's small-loss samples
    np.testing.assert_allclose(coteaching_keep_fraction(1.0, 0.4, 2.0), 0.8)
    np.testing.assert_allclose(coteaching_keep_fraction(5.0, 0.4, 2.0), 0.6)


def test_gmm_clean_probability_separates_planted_bimodal_losses():
    rng = np.random.default_rng(0)
    clean = rng.normal(0.3, 0.1, 800).clip(0)
    noisy = rng.normal(2.5, 0.4, 200)
    order = rng.permutation(1000)
    losses = np.concatenate([clean, noisy])[order]
    is_noisy = (np.arange(1000) >= 800)[order]
    estimate = gmm_clean_probability(losses, seed=0)
    assert estimate.means[0] < estimate.means[1]
    np.testing.assert_allclose(estimate.means, [0.3, 2.5], atol=0.1)
    np.testing.assert_allclose(estimate.weights, [0.8, 0.2], atol=0.02)
    assert estimate.prob[~is_noisy].mean() > 0.99 and estimate.prob[is_noisy].mean() < 0.01
    assert clean_auroc(estimate.prob, is_noisy) > 0.999


def test_gmm_rejects_non_finite_losses():
    with pytest.raises(ValueError, match="non-finite"):
        gmm_clean_probability(np.array([0.1, np.nan, 2.0]))


def test_loss_ema():
    np.testing.assert_allclose(ema_losses(None, [1.0, 2.0]), [1.0, 2.0])
    np.testing.assert_allclose(ema_losses(np.array([1.0, 2.0]), [3.0, 0.0], 0.9), [1.2, 1.8], rtol=1e-6)


def test_routing_gate_frequencies_are_rate_times_clean_prob():
    clean_prob = jnp.array([1.0, 0.5, 0.0, 0.8])
    draws = jax.vmap(lambda k: routing_gates(k, clean_prob, 3, 0.7))(jax.random.split(jax.random.key(0), 4000))
    freq = np.asarray(draws.mean(axis=(0, 2)))
    expected = 0.7 * np.asarray(clean_prob)
    sigma = np.sqrt(expected * (1 - expected) / (4000 * 3))
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-9), (freq, expected)
    assert draws.shape == (4000, 4, 3) and set(np.unique(draws)) <= {0.0, 1.0}


def test_per_batch_routing_shares_each_layers_gate():
    gates = routing_gates(jax.random.key(1), jnp.ones(8), 6, 0.5, per_batch=True)
    assert np.all(gates == gates[:1])  # every sample takes the same path in each layer
    assert 0 < gates.mean() < 1


def test_inference_gates():
    assert np.all(inference_gates(jax.random.key(0), 5, 3, 0.7, "expected") == 0.7)
    assert np.all(inference_gates(jax.random.key(0), 5, 3, 0.7, "full") == 1.0)
    stochastic = inference_gates(jax.random.key(0), 500, 3, 0.7, "stochastic")
    assert abs(float(stochastic.mean()) - 0.7) < 0.05
    with pytest.raises(ValueError, match="valid"):
        inference_gates(jax.random.key(0), 5, 3, 0.7, "random")


def test_metrics():
    assert peak_and_last([0.5, 0.9, 0.7]) == (0.9, 0.7)
    noisy_labels = np.array([0, 1, 2, 1])
    is_noisy = np.array([False, True, True, False])
    assert memorisation(np.array([0, 1, 0, 1]), noisy_labels, is_noisy) == 0.5
    assert np.isnan(memorisation(np.array([0, 1, 0, 1]), noisy_labels, np.zeros(4, bool)))
    assert clean_auroc(np.array([0.9, 0.1, 0.2, 0.8]), is_noisy) == 1.0
    assert np.isnan(clean_auroc(np.array([0.9, 0.8]), np.zeros(2, bool)))


def test_mean_std_over_seeds_by_hand():
    # non-finite and missing values are skipped; the spread is the sample sd: sqrt(((1-2)^2 + (3-2)^2) / 1)
    assert mean_std([1.0, 3.0, float("nan"), None]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert all(np.isnan(mean_std([float("nan")])))
    row = summarise_seeds([{"last_test_accuracy": 0.5, "last_clean_auroc": 0.9},
                           {"last_test_accuracy": 0.75}], realised_rate=0.375)
    assert row == {"last_test_accuracy_mean": 0.625, "last_test_accuracy_std": pytest.approx(0.25 / math.sqrt(2)),
                   "last_clean_auroc_mean": 0.9, "last_clean_auroc_std": 0.0, "seeds": 2,
                   "realised_noise_rate": 0.375}


def test_method_config_takes_coteachings_forget_rate_from_the_noise_rate():
    configs = {"clear": ClearConfig(warmup_epochs=1), "coteaching": CoteachingConfig()}
    assert method_config("clear", 0.4, configs) is configs["clear"]
    assert method_config("ce", 0.4, configs) == CEConfig()
    assert method_config("gce", 0.4, {}) == GCEConfig()
    assert method_config("coteaching", 0.4, configs).forget_rate == 0.4
    assert method_config("coteaching", 0.4, {"coteaching": CoteachingConfig(forget_rate=0.2)}).forget_rate == 0.2


def test_noisy_tasks_pair_methods_and_differ_across_rates_and_seeds():
    from metafit.data.text import keyword_tokenizer

    splits = encoded_splits("keywords", keyword_tokenizer(num_classes=3), max_len=8, num_examples=90, num_classes=3,
                            val_fraction=0.1, test_fraction=0.2, test_size=10)
    assert (splits.train.size, splits.val.size, splits.test.size) == (63, 9, 10)
    assert splits.train.input_ids.shape == (63, 8) and len(splits.train_texts) == 63
    task = noisy_task(splits, "symmetric", 0.4, seed=0)
    np.testing.assert_array_equal(task.noise.clean_labels, splits.train.labels)
    np.testing.assert_array_equal(task.train.labels, task.noise.labels)
    assert task.val is splits.val and task.test is splits.test  # evaluation labels stay clean
    again = noisy_task(splits, "symmetric", 0.4, seed=0)
    np.testing.assert_array_equal(again.train.labels, task.train.labels)  # every method of a seed: same labels
    assert not np.array_equal(noisy_task(splits, "symmetric", 0.4, seed=1).train.labels, task.train.labels)
    assert not np.array_equal(noisy_task(splits, "symmetric", 0.2, seed=0).train.labels, task.train.labels)
    assert jax.random.key_data(noise_key(0, 0.4)).tolist() == \
        jax.random.key_data(jax.random.fold_in(jax.random.key(1_000_003), 400)).tolist()


def test_make_backbone_names_the_valid_backbones():
    with pytest.raises(ValueError, match="valid: tiny, all-minilm-l6-v2"):
        make_backbone("bert-large")
