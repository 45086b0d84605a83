"""Metrics of learning with noisy labels.

* peak / last test accuracy -- noisy training often peaks early, then memorises and
  declines; the gap between the two measures that damage.
* memorisation -- training accuracy *with respect to the noisy labels* on the samples
  whose label was corrupted: 1.0 means the model fitted every wrong label.
* clean-probability AUROC -- how well a clean-probability estimate ranks truly clean
  samples above corrupted ones (0.5 = chance; undefined without both kinds).

:func:`summarise_seeds` turns per-seed summaries into the mean ± std row of a results table.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from metafit.stats import mean_sd


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``predictions == labels`` (``predictions`` may be logits ``[n, C]``)."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    return float(np.mean(predictions == np.asarray(labels)))


def peak_and_last(curve: Sequence[float]) -> tuple[float, float]:
    """``(max(curve), curve[-1])`` of a per-epoch accuracy curve."""
    if len(curve) == 0:
        raise ValueError("empty accuracy curve")
    return float(np.max(curve)), float(curve[-1])


def memorisation(predictions: np.ndarray, noisy_labels: np.ndarray, is_noisy: np.ndarray) -> float:
    """Training accuracy on the corrupted samples, measured against their *noisy* labels.

    Returns NaN when no sample is corrupted (nothing to memorise).
    """
    is_noisy = np.asarray(is_noisy, bool)
    if not is_noisy.any():
        return float("nan")
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    return float(np.mean(predictions[is_noisy] == np.asarray(noisy_labels)[is_noisy]))


def clean_auroc(clean_prob: np.ndarray, is_noisy: np.ndarray) -> float:
    """AUROC of ``clean_prob`` as a score for "label is clean"; NaN if only one kind exists."""
    from sklearn.metrics import roc_auc_score

    is_clean = ~np.asarray(is_noisy, bool)
    if is_clean.all() or not is_clean.any():
        return float("nan")
    return float(roc_auc_score(is_clean, np.asarray(clean_prob, np.float64)))


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of the finite values; NaNs when
    there are none. The convention of every metafit table (:mod:`metafit.stats`)."""
    return mean_sd(values)


def summarise_seeds(summaries: Sequence[dict[str, float]], realised_rate: float) -> dict[str, float]:
    """``<metric>_mean`` and ``<metric>_std`` over seeds of every metric of the first summary,
    plus ``seeds`` and the ``realised_noise_rate`` (fraction of training labels actually corrupted)."""
    row: dict[str, float] = {}
    for key in summaries[0]:
        mean, std = mean_std([s.get(key, float("nan")) for s in summaries])
        row[f"{key}_mean"], row[f"{key}_std"] = mean, std
    row["seeds"] = len(summaries)
    row["realised_noise_rate"] = realised_rate
    return row
