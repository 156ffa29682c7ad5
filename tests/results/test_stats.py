"""Statistics against scipy/sklearn computed independently, and degenerate data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.linear_model import LinearRegression

from neuronpatch import stats


def test_ols_matches_sklearn_and_scipy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = 0.7 * x + 0.2 + rng.normal(scale=0.3, size=40)
    fit = stats.ols(x, y)
    lr = LinearRegression().fit(x[:, None], y)
    ref = sps.linregress(x, y)
    assert fit.slope == pytest.approx(lr.coef_[0], rel=1e-10)
    assert fit.intercept == pytest.approx(lr.intercept_, rel=1e-10)
    assert fit.r_squared == pytest.approx(lr.score(x[:, None], y), rel=1e-10)
    assert fit.stderr == pytest.approx(ref.stderr, rel=1e-8)
    assert fit.p_value == pytest.approx(ref.pvalue, rel=1e-6)
    assert fit.n == 40 and fit.reason is None


def test_per_input_fits_are_row_wise():
    x = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0]])
    y = np.array([[1.0, 3.0, 5.0], [0.0, -1.0, -2.0]])
    fits = stats.per_input_fits(x, y)
    assert [f.slope for f in fits] == pytest.approx([2.0, -0.5])
    assert [f.intercept for f in fits] == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize(
    ("x", "y", "reason"),
    [
        ([1.0, 1.0, 1.0], [0.0, 1.0, 2.0], "no variance"),
        ([0.5], [1.0], "at least 2 points"),
        ([0.0, 1.0, 2.0], [3.0, 3.0, 3.0], "constant"),
    ],
)
def test_degenerate_data_gives_nan_with_reason(x, y, reason):
    fit = stats.ols(x, y)
    assert reason in fit.reason
    assert math.isnan(fit.r_squared)


def test_constant_prediction_change_has_slope_exactly_zero():
    fit = stats.ols([0.0, 1.0, 5.0], [0.0, 0.0, 0.0])
    assert fit.slope == 0.0 and fit.intercept == 0.0


def test_correlation_matches_numpy_and_ranks():
    rng = np.random.default_rng(0)
    a = rng.normal(size=12)
    p = a**3 + rng.normal(scale=0.1, size=12)
    c = stats.correlation(a, p)
    assert c.pearson_r == pytest.approx(np.corrcoef(a, p)[0, 1], rel=1e-10)
    ra, rp = np.argsort(np.argsort(a)), np.argsort(np.argsort(p))
    assert c.spearman_rho == pytest.approx(np.corrcoef(ra, rp)[0, 1], rel=1e-10)


def test_correlation_degenerate():
    assert "same on every input" in stats.correlation([1, 1, 1], [1, 2, 3]).reason
    assert "at least 3" in stats.correlation([1, 2], [1, 2]).reason


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 6))
    y = 0.9 * x + rng.normal(scale=0.2, size=(8, 6))
    s1, r1 = stats.bootstrap_ci(x, y, seed=1)
    s2, r2 = stats.bootstrap_ci(x, y, seed=1)
    assert (s1, r1) == (s2, r2)
    est = stats.ols(x, y)
    assert s1.lo < est.slope < s1.hi
    assert 0.0 <= r1.lo <= est.r_squared <= r1.hi <= 1.0


def test_bootstrap_matches_a_naive_loop():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4))
    y = 1.3 * x + rng.normal(scale=0.5, size=(6, 4))
    s, _ = stats.bootstrap_ci(x, y, n_resamples=300, seed=7)
    draws = np.random.default_rng(7).integers(0, 6, size=(300, 6))
    slopes = [sps.linregress(x[d].ravel(), y[d].ravel()).slope for d in draws]
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    assert (s.lo, s.hi) == pytest.approx((lo, hi), rel=1e-9)


def test_bootstrap_needs_two_inputs():
    s, _ = stats.bootstrap_ci([[0.0, 1.0]], [[0.0, 1.0]])
    assert math.isnan(s.lo) and "at least 2 inputs" in s.reason


def test_weight_cosine():
    assert stats.weight_cosine([1.0, 1.0], [1.0, 0.0])[0] == pytest.approx(2**-0.5)
    assert math.isnan(stats.weight_cosine([0.0, 0.0], [1.0, 0.0])[0])
