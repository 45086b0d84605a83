"""Synthetic label noise with the noise process recorded.

A noise model corrupts clean labels ``y`` into observed labels ``ỹ`` by sampling
``ỹ_i ~ Categorical(R_i)`` where ``R_i`` is sample ``i``'s row of flip probabilities.
For class-conditional noise ``R_i = T[y_i]`` with a transition matrix
``T[a, b] = P(ỹ = b | y = a)``:

* symmetric (as in CleaR's code):  ``T = (1 - η) I + (η / C) 1 1ᵀ`` -- the label is
  redrawn uniformly over all C classes with probability η, so the expected fraction
  of *changed* labels is ``η (C - 1) / C``;
* asymmetric (pair flip):  ``c -> (c - 1) mod C`` with probability η.

Instance-dependent noise (Xia et al., 2020, "Part-dependent label noise") makes the
flip distribution depend on the input features ``x_i``: a per-sample flip rate
``q_i ~ N(η, 0.1²)`` truncated to [0, 1], a random projection ``W_{y_i} ∈ R^{d×C}``,
``R_i = q_i · softmax(x_i W_{y_i})`` with the true class excluded, and
``R_i[y_i] = 1 - q_i``. Its recorded ``transition`` is the class-average of the rows.

Every function returns a :class:`NoisyLabels` with the noisy labels, the clean ones,
the mask of corrupted samples, the requested transition matrix and the per-sample rows,
so robustness metrics (memorisation, clean-probability AUROC) can use the truth.

Example:
    >>> noisy = add_label_noise("symmetric", jax.random.key(0), labels, num_classes=5, rate=0.4)
    >>> noisy.is_noisy.mean()     # about 0.4 * 4 / 5 = 0.32
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metafit.registry import Registry

NOISE_MODELS: Registry[Callable[..., "NoisyLabels"]] = Registry("label-noise")


class NoisyLabels(NamedTuple):
    """Observed labels together with the noise process that produced them.

    Attributes:
      labels: int32 ``[n]`` observed (noisy) labels ỹ -- what training sees.
      clean_labels: int32 ``[n]`` true labels y.
      is_noisy: bool ``[n]``, ``ỹ != y``.
      transition: float ``[C, C]`` requested ``T[a, b] = P(ỹ=b | y=a)`` (class average
        of ``sample_transition`` for instance-dependent noise).
      sample_transition: float ``[n, C]`` the row each label was drawn from.
    """

    labels: np.ndarray
    clean_labels: np.ndarray
    is_noisy: np.ndarray
    transition: np.ndarray
    sample_transition: np.ndarray

    @property
    def noise_rate(self) -> float:
        """Realised fraction of corrupted labels."""
        return float(self.is_noisy.mean())


def symmetric_transition(num_classes: int, rate: float) -> np.ndarray:
    """``T = (1 - η) I + (η / C) 1 1ᵀ`` (uniform relabelling with probability η)."""
    _check_rate(rate)
    return (1.0 - rate) * np.eye(num_classes) + rate / num_classes * np.ones((num_classes, num_classes))


def asymmetric_transition(num_classes: int, rate: float) -> np.ndarray:
    """Pair flip ``c -> (c - 1) mod C`` with probability η: ``T = (1 - η) I + η P``."""
    _check_rate(rate)
    shift = np.roll(np.eye(num_classes), -1, axis=1)  # shift[c, c-1] = 1
    return (1.0 - rate) * np.eye(num_classes) + rate * shift


def sample_noisy_labels(key: jax.Array, rows: np.ndarray) -> np.ndarray:
    """Draws ``ỹ_i ~ Categorical(rows[i])`` for every row (rows sum to 1)."""
    rows = np.asarray(rows, np.float64)
    if not np.allclose(rows.sum(axis=1), 1.0, atol=1e-6) or (rows < 0).any():
        raise ValueError("every transition row must be a probability vector (non-negative, sums to 1)")
    logits = jnp.log(jnp.asarray(rows, jnp.float32))  # log 0 = -inf: that class is never drawn
    return np.asarray(jax.random.categorical(key, logits, axis=-1), np.int32)


def class_conditional_noise(key: jax.Array, labels: np.ndarray, transition: np.ndarray) -> NoisyLabels:
    """Corrupts ``labels`` with a class-conditional transition matrix ``T`` (``[C, C]``)."""
    labels = np.asarray(labels, np.int32)
    transition = np.asarray(transition, np.float64)
    rows = transition[labels]
    noisy = sample_noisy_labels(key, rows)
    return NoisyLabels(noisy, labels, noisy != labels, transition, rows)


@NOISE_MODELS.register("none")
def no_noise(key: jax.Array, labels: np.ndarray, *, num_classes: int, rate: float = 0.0,
             features: np.ndarray | None = None) -> NoisyLabels:
    """Identity noise (rate is ignored): clean training through the same code path."""
    return class_conditional_noise(key, labels, np.eye(num_classes))


@NOISE_MODELS.register("symmetric")
def symmetric_noise(key: jax.Array, labels: np.ndarray, *, num_classes: int, rate: float,
                    features: np.ndarray | None = None) -> NoisyLabels:
    """Symmetric noise, :func:`symmetric_transition`."""
    return class_conditional_noise(key, labels, symmetric_transition(num_classes, rate))


@NOISE_MODELS.register("asymmetric")
def asymmetric_noise(key: jax.Array, labels: np.ndarray, *, num_classes: int, rate: float,
                     features: np.ndarray | None = None) -> NoisyLabels:
    """Pair-flip noise, :func:`asymmetric_transition`."""
    return class_conditional_noise(key, labels, asymmetric_transition(num_classes, rate))


@NOISE_MODELS.register("instance")
def instance_dependent_noise(key: jax.Array, labels: np.ndarray, *, num_classes: int, rate: float,
                             features: np.ndarray | None = None, rate_std: float = 0.1) -> NoisyLabels:
    """Instance-dependent noise of Xia et al. (2020); needs ``features`` ``[n, d]``.

    Maths: ``q_i ~ TruncNormal(η, rate_std², [0, 1])``, ``W ~ N(0, 1)^{C×d×C}``,
    ``s_i = x_i W_{y_i}`` with ``s_i[y_i] = -∞``, ``R_i = q_i softmax(s_i)``,
    ``R_i[y_i] = 1 - q_i``. The expected corruption rate is η and harder-looking
    inputs (features aligned with another class's projection) flip more often to it.
    """
    _check_rate(rate)
    if features is None:
        raise ValueError("instance-dependent noise needs per-sample features, e.g. "
                         "metafit.data.text.hashed_bag_of_words(texts)")
    labels = np.asarray(labels, np.int32)
    features = jnp.asarray(features, jnp.float32)
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"features has {features.shape[0]} rows but there are {labels.shape[0]} labels")
    rate_key, proj_key, draw_key = jax.random.split(key, 3)
    lower, upper = (0.0 - rate) / rate_std, (1.0 - rate) / rate_std
    flip_rate = rate + rate_std * jax.random.truncated_normal(rate_key, lower, upper, labels.shape)
    projections = jax.random.normal(proj_key, (num_classes, features.shape[1], num_classes))
    # project onto every class's W then pick the true class's: avoids an [n, d, C] gather
    scores = jnp.einsum("nd,kdc->nkc", features, projections)[jnp.arange(labels.shape[0]), labels]
    true_class = jax.nn.one_hot(labels, num_classes, dtype=bool)
    flip_dist = jax.nn.softmax(jnp.where(true_class, -jnp.inf, scores), axis=-1)
    rows = flip_rate[:, None] * flip_dist + (1.0 - flip_rate)[:, None] * true_class
    rows = np.asarray(rows, np.float64)
    rows /= rows.sum(axis=1, keepdims=True)  # float32 round-off
    noisy = sample_noisy_labels(draw_key, rows)
    return NoisyLabels(noisy, labels, noisy != labels, class_average(rows, labels, num_classes), rows)


def add_label_noise(kind: str, key: jax.Array, labels: np.ndarray, *, num_classes: int, rate: float,
                    features: np.ndarray | None = None) -> NoisyLabels:
    """Corrupts ``labels`` with the noise model registered as ``kind``.

    Args:
      kind: ``none``, ``symmetric``, ``asymmetric`` or ``instance``.
      key: a ``jax.random`` key; the result is a pure function of it.
      labels: int ``[n]`` clean labels.
      num_classes: C.
      rate: η in [0, 1].
      features: ``[n, d]`` input features (only ``instance`` uses them).
    """
    return NOISE_MODELS.get(kind)(key, labels, num_classes=num_classes, rate=rate, features=features)


def class_average(rows: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``T[a] = mean of rows[i] over samples with label a`` (identity row for an absent class)."""
    transition = np.eye(num_classes)
    for c in range(num_classes):
        if (labels == c).any():
            transition[c] = rows[labels == c].mean(axis=0)
    return transition


def empirical_transition(clean_labels: np.ndarray, noisy_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised confusion counts ``T̂[a, b] = #{y=a, ỹ=b} / #{y=a}``."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (np.asarray(clean_labels), np.asarray(noisy_labels)), 1.0)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
