"""The one spread convention of every metafit table: mean ± sample standard deviation over seeds.

Reproduction tables report few seeds (often 3), so the spread is the *sample* standard deviation
(``ddof = 1``, the unbiased variance) and an interval is a Student-t interval, not ``± 1.96 σ``:
with n = 3 the 95 % t-quantile is 4.30, more than twice the normal one.

>>> mean_sd([1.0, 2.0, 3.0])
(2.0, 1.0)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CONVENTION = "mean ± sample standard deviation (ddof = 1) over seeds; one seed shows its value alone"


def finite_values(values: Sequence[float | None]) -> np.ndarray:
    """The finite values of ``values``: ``None`` (a job that did not run) and NaN/inf are dropped."""
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], np.float64)


def mean_sd(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of the finite values.

    One value has no spread: its sd is 0.0 (tables then show the value alone). No values: NaNs.
    """
    finite = finite_values(values)
    if finite.size == 0:
        return float("nan"), float("nan")
    sd = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), sd


def t_halfwidth(values: Sequence[float | None], level: float = 0.95) -> float:
    """Half-width of the two-sided Student-t confidence interval of the mean:
    ``t_{(1+level)/2, n-1} · s / √n``. NaN with fewer than two finite values (no interval exists)."""
    from scipy.stats import t

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    finite = finite_values(values)
    if finite.size < 2:
        return float("nan")
    return float(t.ppf((1.0 + level) / 2.0, finite.size - 1) * finite.std(ddof=1) / math.sqrt(finite.size))


def format_mean_sd(values: Sequence[float | None], digits: int = 2, scale: float = 1.0) -> str:
    """``"m ± s"`` over several finite values, ``"m"`` for one, ``"not run"`` for none."""
    finite = finite_values(values) * scale
    if finite.size == 0:
        return "not run"
    mean, sd = mean_sd(list(finite))
    return f"{mean:.{digits}f}" if finite.size == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"
