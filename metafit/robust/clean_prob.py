"""Which training samples look clean: per-sample loss EMA and a 2-component GMM.

Samples with wrong labels are fitted late, so their training loss stays high while clean
samples' drops. Modelling the (smoothed) per-sample losses as a mixture of two Gaussians,

    ℓ̄_i ~ π_0 N(μ_0, σ_0²) + π_1 N(μ_1, σ_1²),   μ_0 < μ_1,

the posterior of the low-mean component ``p_i = P(z_i = 0 | ℓ̄_i)`` is the sample's
clean probability (Arazo et al. 2019; DivideMix; CleaR). Losses are smoothed over epochs
with an exponential moving average ``ℓ̄_i ← m ℓ̄_i + (1 - m) ℓ_i`` (CleaR: m = 0.9).
The mixture is fitted by scikit-learn's EM (:class:`sklearn.mixture.GaussianMixture`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class CleanProbability(NamedTuple):
    """Result of :func:`gmm_clean_probability`.

    Attributes:
      prob: float32 ``[n]`` posterior of the low-loss ("clean") component.
      means: ``[2]`` component means, clean first.
      stds: ``[2]`` component standard deviations, clean first.
      weights: ``[2]`` mixing weights, clean first.
    """

    prob: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray


def ema_losses(previous: np.ndarray | None, current: np.ndarray, momentum: float = 0.9) -> np.ndarray:
    """``m · previous + (1 - m) · current``; the first epoch (``previous is None``) returns ``current``."""
    current = np.asarray(current, np.float32)
    if previous is None:
        return current
    return (momentum * np.asarray(previous, np.float32) + (1.0 - momentum) * current).astype(np.float32)


def gmm_clean_probability(losses: np.ndarray, *, seed: int = 0, max_iter: int = 100, tol: float = 1e-3,
                          reg_covar: float = 1e-6) -> CleanProbability:
    """Fits a 2-component 1-D GMM to ``losses`` and returns each sample's clean probability.

    Args:
      losses: ``[n]`` per-sample (smoothed) training losses.
      seed: ``random_state`` of the EM initialisation (k-means), so the fit is reproducible.
      max_iter, tol, reg_covar: passed to :class:`sklearn.mixture.GaussianMixture`
        (its defaults; ``reg_covar`` keeps a collapsed component's variance positive).

    Returns:
      A :class:`CleanProbability`; ``prob[i]`` is the posterior of the lower-mean component.

    Example:
        >>> losses = np.r_[np.random.default_rng(0).normal(0.2, 0.05, 900), np.full(100, 2.0)]
        >>> gmm_clean_probability(losses).prob[:900].mean() > 0.99
        True
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(losses, np.float64).reshape(-1, 1)
    if not np.isfinite(x).all():
        raise ValueError("per-sample losses contain non-finite values; cannot fit the clean/noisy mixture")
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar,
                          random_state=seed).fit(x)
    order = np.argsort(gmm.means_[:, 0])  # clean component = lower mean loss
    prob = gmm.predict_proba(x)[:, order[0]].astype(np.float32)
    return CleanProbability(prob, gmm.means_[order, 0], np.sqrt(gmm.covariances_[order].reshape(-1)),
                            gmm.weights_[order])
