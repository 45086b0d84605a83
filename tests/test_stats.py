import math

import pytest

from metafit import stats


def test_mean_sd_is_the_sample_standard_deviation():
    # values 2, 4, 4, 4, 5, 5, 7, 9: sum of squared deviations 32, so s = sqrt(32 / 7)
    assert stats.mean_sd([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx((5.0, math.sqrt(32 / 7)))
    assert stats.mean_sd([3.0]) == (3.0, 0.0)
    assert all(math.isnan(v) for v in stats.mean_sd([None, float("nan")]))


def test_t_halfwidth_uses_the_student_quantile():
    # n = 3, s = 1: t_{0.975, 2} = 4.302653 (tables), half-width = 4.302653 / sqrt(3)
    assert stats.t_halfwidth([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(stats.t_halfwidth([1.0]))
    with pytest.raises(ValueError, match="level"):
        stats.t_halfwidth([1.0, 2.0], level=95)


def test_format_mean_sd():
    assert stats.format_mean_sd([0.1, 0.3], digits=1, scale=100) == "20.0 ± 14.1"
    assert stats.format_mean_sd([0.5]) == "0.50"
    assert stats.format_mean_sd([None]) == "not run"
