"""Fits of a metric against ln α: one series (`fit_log_slope`, scipy's linregress) and many at
once (`fit_log_slopes`, row for row the same), monotonicity, and the α grid rule."""

import numpy as np
import pytest
from scipy import stats

from spectra_lens.errors import SpectraError
from spectra_lens.stats.fits import LogSlopeFit, fit_log_slope, fit_log_slopes


def test_fit_log_slope_equals_linregress():
    alphas = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    values = np.array([2.1, 1.8, 1.2, 0.9, 0.2])
    fit = fit_log_slope(alphas, values)
    expected = stats.linregress(np.log(alphas), values)
    assert isinstance(fit, LogSlopeFit)
    assert fit.slope == pytest.approx(expected.slope)
    assert fit.intercept == pytest.approx(expected.intercept)
    assert fit.std_error == pytest.approx(expected.stderr)
    assert fit.intercept_stderr == pytest.approx(expected.intercept_stderr)
    assert fit.r_squared == pytest.approx(expected.rvalue**2)
    assert fit.is_monotonic


def test_fit_log_slopes_rows_equal_single_fits():
    rng = np.random.default_rng(8)
    alphas = np.array([2.0, 0.5, 1.0, 0.25, 4.0])  # unsorted on purpose
    values = np.vstack(
        [
            -0.7 * np.log(alphas) + 0.01 * rng.normal(size=5),  # monotonic within noise
            np.sin(3 * alphas),  # not monotonic
            np.full(5, 0.3),  # constant: linregress gives r = NaN
            np.log(alphas) + rng.normal(size=5),
        ]
    )
    table = fit_log_slopes(alphas, values, atol=0.05)
    for i, row in table.iterrows():
        fit = fit_log_slope(alphas, values[i], atol=0.05)
        for name in ("slope", "intercept", "std_error", "intercept_stderr", "r_squared", "p_value"):
            assert row[name] == pytest.approx(getattr(fit, name), rel=1e-9, abs=1e-12, nan_ok=True)
        assert row["is_monotonic"] == fit.is_monotonic
    assert table["is_monotonic"].tolist() == [True, False, True, False]


def test_two_alphas_give_an_exact_line():
    table = fit_log_slopes([1.0, np.e], np.array([[1.0, 3.0], [2.0, 2.0]]))
    assert table["slope"].tolist() == pytest.approx([2.0, 0.0])
    assert table["std_error"].tolist() == [0.0, 0.0]
    assert table["p_value"].tolist() == [0.0, 1.0]


def test_monotonic_tolerance():
    alphas = [0.5, 1.0, 2.0]
    assert fit_log_slope(alphas, [1.0, 0.5, 0.5 + 1e-9]).is_monotonic
    assert not fit_log_slope(alphas, [1.0, 0.5, 0.6]).is_monotonic
    assert fit_log_slope(alphas, [1.0, 0.5, 0.6], atol=0.2).is_monotonic


@pytest.mark.parametrize(
    "alphas, values, message",
    [
        ([1.0], [1.0], "at least 2 values"),
        ([0.0, 1.0], [1.0, 2.0], "finite and > 0"),
        ([1.0, np.inf], [1.0, 2.0], "finite and > 0"),
        ([1.0, 1.0], [1.0, 2.0], "distinct"),
        ([0.5, 1.0, 1.0], [1.0, 2.0, 3.0], "distinct"),
        (2.0, [1.0], "single number"),
        ([0.5, 1.0], [1.0, 2.0, 3.0], "one entry per alpha"),
    ],
)
def test_bad_alphas(alphas, values, message):
    with pytest.raises(SpectraError, match=message):
        fit_log_slope(alphas, values)


def test_bad_values_shape():
    with pytest.raises(SpectraError, match="values must be 1-D"):
        fit_log_slope([0.5, 1.0], [[1.0, 2.0]])
    with pytest.raises(SpectraError, match=r"values must be 2-D \(series, alpha\)"):
        fit_log_slopes([0.5, 1.0], [1.0, 2.0])
