"""Label noise: closed-form transition matrices, and samples that match them within sampling error."""
import jax
import numpy as np
import pytest

from metafit.data.noise import (add_label_noise, asymmetric_transition, empirical_transition,
                                symmetric_transition)
from metafit.data.text import hashed_bag_of_words, keyword_corpus


def test_transition_matrices_in_closed_form():
    np.testing.assert_allclose(symmetric_transition(4, 0.4),
                               0.6 * np.eye(4) + 0.1 * np.ones((4, 4)))
    expected = 0.7 * np.eye(3)
    expected[0, 2] = expected[1, 0] = expected[2, 1] = 0.3  # c -> (c - 1) mod C
    np.testing.assert_allclose(asymmetric_transition(3, 0.3), expected)
    for matrix in (symmetric_transition(5, 0.6), asymmetric_transition(5, 0.2)):
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="rate"):
        symmetric_transition(3, 1.5)


@pytest.mark.parametrize("kind,rate", [("symmetric", 0.2), ("symmetric", 0.6), ("asymmetric", 0.4)])
def test_noisy_labels_match_the_transition_matrix_within_sampling_error(kind, rate):
    num_classes, per_class = 5, 4000
    labels = np.repeat(np.arange(num_classes), per_class)
    noisy = add_label_noise(kind, jax.random.key(0), labels, num_classes=num_classes, rate=rate)
    empirical = empirical_transition(labels, noisy.labels, num_classes)
    sigma = np.sqrt(noisy.transition * (1 - noisy.transition) / per_class)
    assert np.all(np.abs(empirical - noisy.transition) <= 5 * sigma + 1e-12)
    assert np.array_equal(noisy.is_noisy, noisy.labels != labels)
    assert np.array_equal(noisy.clean_labels, labels)
    expected_rate = rate * (num_classes - 1) / num_classes if kind == "symmetric" else rate
    assert abs(noisy.noise_rate - expected_rate) < 5 * np.sqrt(expected_rate / labels.size)
    # a pure function of the key
    again = add_label_noise(kind, jax.random.key(0), labels, num_classes=num_classes, rate=rate)
    assert np.array_equal(again.labels, noisy.labels)


def test_instance_dependent_noise_records_valid_rows_and_average_rate():
    corpus = keyword_corpus(3000, 4, seed=2)
    features = hashed_bag_of_words(corpus.texts)
    noisy = add_label_noise("instance", jax.random.key(1), corpus.labels, num_classes=4, rate=0.3,
                            features=features)
    rows = noisy.sample_transition
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(rows >= 0)
    # the flip probability differs between samples of one class (it depends on the input)
    flip = 1 - rows[np.arange(len(rows)), corpus.labels]
    assert flip.std() > 0.05 and abs(flip.mean() - 0.3) < 0.02
    assert abs(noisy.noise_rate - flip.mean()) < 5 * np.sqrt(0.3 * 0.7 / len(rows))
    np.testing.assert_allclose(noisy.transition.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="features"):
        add_label_noise("instance", jax.random.key(1), corpus.labels, num_classes=4, rate=0.3)


def test_no_noise_and_unknown_kind():
    labels = np.arange(10) % 3
    assert not add_label_noise("none", jax.random.key(0), labels, num_classes=3, rate=0.5).is_noisy.any()
    with pytest.raises(KeyError, match="did you mean 'symmetric'"):
        add_label_noise("symetric", jax.random.key(0), labels, num_classes=3, rate=0.5)
