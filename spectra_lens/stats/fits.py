"""Fits of a metric against ln α over a grid of scales: the gain of a head is the slope."""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from spectra_lens.errors import SpectraError
from spectra_lens.stats.inference import _t_pvalue, pearson
from spectra_lens.validate import check_alphas

__all__ = ["LogSlopeFit", "fit_log_slope", "fit_log_slopes"]


@dataclass(frozen=True)
class LogSlopeFit:
    """values ≈ intercept + slope · ln α by least squares (scipy.stats.linregress on ln α)."""

    slope: float
    intercept: float
    std_error: float  # standard error of the slope, as linregress's `stderr`
    intercept_stderr: float
    r_squared: float
    p_value: float  # two-sided t test of slope = 0
    is_monotonic: bool  # values non-increasing or non-decreasing in α, within atol


def fit_log_slope(alphas, values, *, atol: float = 1e-6) -> LogSlopeFit:
    """values = intercept + slope · ln α + ε by least squares (scipy.stats.linregress).

    `is_monotonic`: with α sorted, every step of values is >= −atol, or every step is <= atol.
    """
    log_alpha, values = _check_alphas(alphas, values)
    if values.ndim != 1:
        raise SpectraError(f"values must be 1-D, one per alpha; got shape {values.shape}")
    fit = stats.linregress(log_alpha, values)
    return LogSlopeFit(
        slope=float(fit.slope),
        intercept=float(fit.intercept),
        std_error=float(fit.stderr),
        intercept_stderr=float(fit.intercept_stderr),
        r_squared=float(fit.rvalue**2),
        p_value=float(fit.pvalue),
        is_monotonic=bool(_is_monotonic(log_alpha, values[None, :], atol)[0]),
    )


def fit_log_slopes(alphas, values, *, atol: float = 1e-6) -> pd.DataFrame:
    """values[i] = intercept_i + slope_i · ln α + ε for every row i, with linregress's semantics.

    `values` has shape (series, alpha), e.g. one row per head. Returns one row per series with
    the fields of `LogSlopeFit` as columns; row i equals `fit_log_slope(alphas, values[i])`.
    """
    log_alpha, values = _check_alphas(alphas, values)
    if values.ndim != 2:
        raise SpectraError(f"values must be 2-D (series, alpha); got shape {values.shape}")
    n = log_alpha.size
    dx = log_alpha - log_alpha.mean()
    y_mean = values.mean(axis=1)
    dy = values - y_mean[:, None]
    ssxm = np.mean(dx**2)
    ssym = np.mean(dy**2, axis=1)
    ssxym = np.mean(dy * dx, axis=1)
    r = pearson(ssxm, ssym, ssxym)
    # linregress's convention for a constant series: r = NaN if the covariance is 0, else 0.
    r = np.where(ssym == 0, np.where(ssxym == 0, np.nan, 0.0), r)
    slope = ssxym / ssxm
    if n == 2:
        std_error = np.zeros_like(slope)
        p_value = np.where(values[:, 0] == values[:, 1], 1.0, 0.0)
    else:
        std_error = np.sqrt((1 - r**2) * ssym / ssxm / (n - 2))
        p_value = _t_pvalue(r, n)
    return pd.DataFrame(
        {
            "slope": slope,
            "intercept": y_mean - slope * log_alpha.mean(),
            "std_error": std_error,
            "intercept_stderr": std_error * np.sqrt(ssxm + log_alpha.mean() ** 2),
            "r_squared": r**2,
            "p_value": p_value,
            "is_monotonic": _is_monotonic(log_alpha, values, atol),
        }
    )


def _is_monotonic(log_alpha: np.ndarray, values: np.ndarray, atol: float) -> np.ndarray:
    steps = np.diff(values[:, np.argsort(log_alpha)], axis=1)
    return np.all(steps >= -atol, axis=1) | np.all(steps <= atol, axis=1)


def _check_alphas(alphas, values) -> tuple[np.ndarray, np.ndarray]:
    """(ln α, values): the grid rule is `validate.check_alphas` with at least 2 values (a slope
    needs two); α keeps the caller's order, which is the order of values on the last axis."""
    check_alphas(alphas, at_least=2)
    alphas = np.asarray(alphas, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.shape[-1:] != alphas.shape:
        raise SpectraError(
            f"values must have one entry per alpha on the last axis ({alphas.size}); "
            f"got shape {values.shape}"
        )
    return np.log(alphas), values
