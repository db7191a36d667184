"""Statistics of per-token attention records: correlation, partial correlation, the cluster
bootstrap over sequences, Benjamini–Hochberg FDR, consistency and replication across shards, and
fits of a metric against ln α.

Records are one row per (token, head) with columns `shard`, `sequence`, `position`, `layer`,
`head` and float metrics. Tokens of one sequence are not independent, so the sequence is the
resampling unit: token-level t-test p-values are reported (they treat tokens as independent and
are optimistic under clustering), and a head is called significant on a Wald test of Fisher's z
whose standard error comes from the sequence bootstrap, with BH across heads. Every correlation is built from `Moments`, sums that merge
exactly across shards.

The observational run uses the per-document moments path (`DocumentMoments`, `head_statistics`,
`cluster_wald`, `agreement`): the document is the independent unit, tests are document-clustered
(CR2 with Bell–McCaffrey degrees of freedom by default), the bootstrap resamples documents, and
every statistic is computed from per-(document, head) moment matrices, so analysis memory is
O(documents × heads) and merging shards, runs or ranks is concatenation. The record-based
functions above it (`head_correlations`, `shard_consistency`, `replication`) cluster by
sequence or shard and remain for per-token tables.
"""

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from jaxtyping import Float, Int
from scipy import stats

from spectra_lens.errors import SpectraError
from spectra_lens.io import npz_bytes

__all__ = [
    "CLUSTER_TESTS",
    "CONTROLS",
    "DocumentMoments",
    "LogSlopeFit",
    "MOMENT_VARIABLES",
    "Moments",
    "VERDICTS",
    "VERDICT_RULE",
    "agreement",
    "agreement_summary",
    "cluster_mean",
    "cluster_wald",
    "document_folds",
    "document_replication",
    "fdr",
    "fit_log_slope",
    "fit_log_slopes",
    "fold_consistency",
    "head_correlations",
    "head_statistics",
    "layer_statistics",
    "moments_from_records",
    "partial_correlation",
    "pearson_from_moments",
    "replication",
    "shard_consistency",
    "t_interval",
    "verdict",
]

# The partial correlation on one covariate has n - 3 degrees of freedom.
_MIN_TOKENS = 4
_HEAD_KEYS = ("layer", "head")


@dataclass(frozen=True)
class Moments:
    """Sums n, Σx, Σy, Σx², Σy², Σxy; r = S_xy / √(S_xx S_yy) with S_ab = Σab − ΣaΣb / n.

    Sums add, so the moments of shards merge exactly: `a + b` (or `a.merge(b, c)`) equals the
    moments of the concatenated data. Each field is an array, one entry per group (e.g. per head);
    all fields have the same shape. Raw sums lose digits when |mean| >> std: r is shift-invariant,
    so subtract a common shift (one data value serves) from x and from y before summing.
    """

    n: Float[np.ndarray, "*group"]
    sx: Float[np.ndarray, "*group"]
    sy: Float[np.ndarray, "*group"]
    sxx: Float[np.ndarray, "*group"]
    syy: Float[np.ndarray, "*group"]
    sxy: Float[np.ndarray, "*group"]

    @classmethod
    def from_arrays(cls, x, y, *, axis: int = -1) -> "Moments":
        """Σ over `axis` of 1, x, y, x², y², xy: shape (..., n) gives moments of shape (...)."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.shape != y.shape:
            raise SpectraError(f"x and y must have the same shape; got {x.shape} and {y.shape}")
        sx = np.asarray(x.sum(axis=axis))
        return cls(
            n=np.full(sx.shape, x.shape[axis], dtype=float),
            sx=sx,
            sy=np.asarray(y.sum(axis=axis)),
            sxx=np.asarray((x * x).sum(axis=axis)),
            syy=np.asarray((y * y).sum(axis=axis)),
            sxy=np.asarray((x * y).sum(axis=axis)),
        )

    @classmethod
    def from_groups(cls, x, y, groups, n_groups: int) -> "Moments":
        """Σ_{i: g_i = k} of 1, x, y, x², y², xy for k = 0..n_groups-1 (shape (n_groups,))."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        groups = np.asarray(groups)
        if not x.shape == y.shape == groups.shape or x.ndim != 1:
            raise SpectraError(
                "x, y and groups must be 1-D arrays of one length; "
                f"got shapes {x.shape}, {y.shape}, {groups.shape}"
            )

        def total(weights=None):
            return np.bincount(groups, weights, minlength=n_groups).astype(float)

        return cls(total(), total(x), total(y), total(x * x), total(y * y), total(x * y))

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(
            *(np.asarray(getattr(self, f.name) + getattr(other, f.name)) for f in fields(self))
        )

    def merge(self, *others: "Moments") -> "Moments":
        """Moments of the union of the data: the field-wise sum."""
        merged = self
        for other in others:
            merged = merged + other
        return merged

    def sum(self, axis: int | None = None) -> "Moments":
        """Merge the groups along `axis`, e.g. moments of shape (head, shard) -> (head,)."""
        return self._map(lambda a: np.asarray(a.sum(axis=axis)))

    def resample(self, counts: np.ndarray) -> "Moments":
        """Σ_k c_bk · m_gk: moments of shape (group, unit) to (group, b) for count rows c_b."""
        stacked = np.stack([getattr(self, f.name) for f in fields(self)])
        *lead, n_units = stacked.shape
        merged = stacked.reshape(-1, n_units) @ counts.T
        return Moments(*merged.reshape(*lead, counts.shape[0]))

    def pearson(self) -> Float[np.ndarray, "*group"]:
        """Pearson r per group; NaN where n < 2 or either variance is zero."""
        with np.errstate(divide="ignore", invalid="ignore"):
            cxx = self.sxx - self.sx**2 / self.n
            cyy = self.syy - self.sy**2 / self.n
            cxy = self.sxy - self.sx * self.sy / self.n
            r = cxy / np.sqrt(cxx * cyy)
        r = np.where((self.n >= 2) & (cxx > 0) & (cyy > 0), r, np.nan)
        return np.asarray(np.clip(r, -1.0, 1.0))  # rounding can leave |r| a hair above 1

    def _map(self, fn) -> "Moments":
        return Moments(*(fn(getattr(self, f.name)) for f in fields(self)))


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


def fdr(pvalues) -> np.ndarray:
    """q_(i) = min_{j ≥ i} m p_(j) / j over the m non-NaN p-values (Benjamini–Hochberg).

    NaN p-values stay NaN and do not count in m. The result has the shape of the input.
    """
    p = np.asarray(pvalues, dtype=float)
    q = np.full(p.shape, np.nan)
    present = ~np.isnan(p)
    bad = present & ~((p >= 0) & (p <= 1))
    if bad.any():
        raise SpectraError(f"p-values must lie in [0, 1] or be NaN; got {p[bad][:5].tolist()}")
    if present.any():
        q[present] = stats.false_discovery_control(p[present], method="bh")
    return q


def partial_correlation(x, y, z) -> tuple[float, float]:
    """r(x, y | z) = Pearson r of the residuals of x and of y after least squares on [1, z].

    `z` is one covariate of shape (n,) or k covariates of shape (n, k). Returns (r, p) with the
    two-sided p from the t distribution with n − 2 − k degrees of freedom.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    z = np.asarray(z, dtype=float)
    z = z[:, None] if z.ndim == 1 else z
    if not (x.ndim == y.ndim == 1 and x.shape[0] == y.shape[0] == z.shape[0]) or z.ndim != 2:
        raise SpectraError(
            "partial_correlation expects x and y of shape (n,) and z of shape (n,) or (n, k); "
            f"got {x.shape}, {y.shape}, {z.shape}"
        )
    n, k = z.shape
    if n < k + 3:
        raise SpectraError(f"partial correlation on {k} covariate(s) needs n >= {k + 3}; got {n}")
    design = np.column_stack([np.ones(n), z])
    coef, *_ = np.linalg.lstsq(design, np.column_stack([x, y]), rcond=None)
    residuals = np.column_stack([x, y]) - design @ coef
    r = float(Moments.from_arrays(residuals[:, 0], residuals[:, 1]).pearson())
    return r, float(_t_pvalue(r, n, n_covariates=k))


def head_correlations(
    records: pd.DataFrame,
    *,
    x: str = "q_norm",
    ys: Sequence[str] = ("entropy", "max_attn", "k_eff_exp"),
    log_x: bool = True,
    min_position: int = 1,
    n_boot: int = 1000,
    ci: float = 0.95,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """r(f(x), y) per head with f = ln when log_x, token-level tests and a sequence bootstrap CI.

    Tokens at position < `min_position` are dropped (position 0 sees only itself), and for each
    pair of columns the tokens where either value is NaN. For every y in `ys` the columns are:

    - `r_{y}`, `p_{y}`, `q_{y}`: Pearson r, two-sided t-test p (n − 2 df), BH q over heads;
    - `rho_{y}`, `p_rho_{y}`, `q_rho_{y}`: Spearman rho (average ranks for ties), as scipy;
    - `partial_r_{y}`, `partial_p_{y}`, `partial_q_{y}`: r controlling for z = ln(position + 1),
      r_xy·z = (r_xy − r_xz r_yz) / sqrt((1 − r_xz²)(1 − r_yz²)), p with n − 3 df;
    - `partial_p_{y}_cluster`, `partial_q_{y}_cluster`, `partial_r_{y}_ci_low/high`: the same
      clustering-aware test and interval for the partial r (see `p_{y}_cluster` below);
    - `r_{y}_ci_low`, `r_{y}_ci_high`: percentile interval of r over `n_boot` resamples of
      sequences with replacement (NaN for a head seen in fewer than 2 sequences).

    If "entropy" is in `ys`, also `r_entropy_norm`, `p_entropy_norm`, `q_entropy_norm` against the
    entropy divided by its bound log(visible keys). Further columns: `layer`, `head`,
    `n_tokens`, `n_sequences`, `mean_{x}` and `mean_{y}` (of the raw values), and for the first y
    (the original project's names) `correlation` = r, `p_value` = p, and `significant`:
    the clustering-aware `q_{y}_cluster` < alpha. `p_{y}_cluster` is the Wald p of Fisher's
    z = atanh(r) with the standard error of z over the sequence bootstrap, and `q_{y}_cluster`
    its BH q over heads; this is what controls the false discovery rate. `significant_partial`
    is the same decision for the position-controlled partial r. Rows are sorted by layer, head.

    The token-level p-values treat tokens as independent, which clustering by sequence makes
    optimistic; the `*_cluster` tests and the bootstrap intervals are the clustering-aware ones. All heads share one
    resampling of the sequence ids (sequences a head has no tokens in contribute nothing), so
    results are reproducible from `seed`. Cost: one (head·sequence) × (sequence·boot) product.
    """
    ys = (ys,) if isinstance(ys, str) else tuple(ys)
    if not ys:
        raise SpectraError("ys must name at least one metric column; got ()")
    if n_boot < 1:
        raise SpectraError(f"n_boot must be >= 1; got {n_boot}")
    _check_probability("ci", ci)
    _check_probability("alpha", alpha)
    targets = ys + (("entropy_norm",) if "entropy" in ys else ())
    tokens = _Tokens.build(records, x=x, ys=targets, log_x=log_x, min_position=min_position)
    sequence, sequence_ids = tokens.codes("sequence")
    n_sequences = sequence_ids.size
    counts = _bootstrap_counts(n_sequences, n_boot, seed)

    cell = tokens.head * n_sequences + sequence
    per_cell = np.bincount(cell, minlength=tokens.n_heads * n_sequences)
    seen = (per_cell.reshape(tokens.n_heads, n_sequences) > 0).sum(axis=1)
    columns = {
        **tokens.key_columns(),
        "n_tokens": tokens.n_tokens,
        "n_sequences": seen,
    }
    for name in dict.fromkeys((x, *ys)):
        columns[f"mean_{name}"] = tokens.head_mean(name)
    log_position = np.log1p(tokens.columns["position"].astype(float))
    x_terms = {}  # ranks of f(x) and r(f(x), z) depend only on which tokens a pair keeps
    for y in ys:
        pair = tokens.pair(y)
        kept = pair.mask.tobytes()
        if kept not in x_terms:
            r_xz = pair.moments(b=log_position[pair.mask]).pearson()[:, 0]
            x_terms[kept] = pair.ranks(pair.a), r_xz
        x_ranks, r_xz = x_terms[kept]
        by_sequence = pair.moments(cells=sequence[pair.mask], n_cells=n_sequences)
        by_head = by_sequence.sum(axis=1)
        r = by_head.pearson()
        rho = pair.moments(a=x_ranks, b=pair.ranks(pair.b)).pearson()[:, 0]
        r_yz = pair.moments(a=log_position[pair.mask]).pearson()[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            partial = (r - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2))
        partial = np.clip(partial, -1.0, 1.0)
        boot = by_sequence.resample(counts).pearson()
        low, high = _percentile_interval(boot, ci)
        enough = (by_sequence.n > 0).sum(axis=1) >= 2
        # The partial r resampled with the same sequences: its clustering-aware test.
        cells = dict(cells=sequence[pair.mask], n_cells=n_sequences)
        z = log_position[pair.mask]
        boot_xz = pair.moments(b=z, **cells).resample(counts).pearson()
        boot_yz = pair.moments(a=z, **cells).resample(counts).pearson()
        with np.errstate(divide="ignore", invalid="ignore"):
            boot_partial = np.clip((boot - boot_xz * boot_yz)
                                   / np.sqrt((1 - boot_xz**2) * (1 - boot_yz**2)), -1.0, 1.0)
        partial_low, partial_high = _percentile_interval(boot_partial, ci)
        columns |= _with_q(
            {
                f"r_{y}": r,
                f"p_{y}": _t_pvalue(r, by_head.n),
                f"p_{y}_cluster": np.where(enough, _cluster_pvalue(r, boot), np.nan),
                f"rho_{y}": rho,
                f"p_rho_{y}": _t_pvalue(rho, by_head.n),
                f"partial_r_{y}": partial,
                f"partial_p_{y}": _t_pvalue(partial, by_head.n, n_covariates=1),
                f"partial_p_{y}_cluster": np.where(
                    enough, _cluster_pvalue(partial, boot_partial), np.nan),
                f"partial_r_{y}_ci_low": np.where(enough, partial_low, np.nan),
                f"partial_r_{y}_ci_high": np.where(enough, partial_high, np.nan),
                f"r_{y}_ci_low": np.where(enough, low, np.nan),
                f"r_{y}_ci_high": np.where(enough, high, np.nan),
            }
        )
    if "entropy" in ys:
        pair = tokens.pair("entropy_norm")
        by_head = pair.moments()
        r = by_head.pearson()[:, 0]
        columns |= _with_q({"r_entropy_norm": r, "p_entropy_norm": _t_pvalue(r, by_head.n[:, 0])})

    summary = pd.DataFrame(columns)
    first = ys[0]
    summary["correlation"] = summary[f"r_{first}"]
    summary["p_value"] = summary[f"p_{first}"]
    summary["significant"] = summary[f"q_{first}_cluster"] < alpha
    summary["significant_partial"] = summary[f"partial_q_{first}_cluster"] < alpha
    _warn_undefined(summary, [f"r_{y}" for y in ys])
    return summary


def shard_consistency(
    records: pd.DataFrame,
    *,
    x: str = "q_norm",
    y: str = "entropy",
    log_x: bool = True,
    alpha: float = 0.05,
    threshold: float = 0.8,
    min_position: int = 1,
) -> pd.DataFrame:
    """Share of shards whose r(f(x), y) is significant with the sign of the pooled r, per head.

    Per-shard r and two-sided token-level p are in `r_shard_{id}`, `p_shard_{id}`; `r_pooled`,
    `p_pooled` come from the merged per-shard moments. A shard counts (`n_shards`) when the head
    has at least 3 tokens there and r is defined. `frac_same_sign` is the share of counted shards
    whose r has the pooled sign, `frac_significant_same_sign` the share that also has p < alpha,
    and `consistent` is frac_significant_same_sign >= threshold with n_shards >= 2. The per-shard
    p-values treat tokens as independent; agreement across shards is the safeguard.
    """
    _check_probability("alpha", alpha)
    if not 0 < threshold <= 1:
        raise SpectraError(f"threshold must lie in (0, 1]; got {threshold}")
    tokens = _Tokens.build(
        records, x=x, ys=(y,), log_x=log_x, min_position=min_position, extra=("shard",)
    )
    shard, shard_ids = tokens.codes("shard")
    n_shards = shard_ids.size
    pair = tokens.pair(y)
    by_shard = pair.moments(cells=shard[pair.mask], n_cells=n_shards)
    r_shard = by_shard.pearson()
    p_shard = _t_pvalue(r_shard, by_shard.n)
    pooled = by_shard.sum(axis=1)
    r_pooled = pooled.pearson()

    counted = np.isfinite(r_shard) & (by_shard.n >= 3)
    n_counted = counted.sum(axis=1)
    same_sign = counted & (np.sign(r_shard) == np.sign(r_pooled)[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_same = same_sign.sum(axis=1) / n_counted
        frac_significant = (same_sign & (p_shard < alpha)).sum(axis=1) / n_counted
    columns = {
        **tokens.key_columns(),
        "n_tokens": pooled.n.astype(int),
        "n_shards": n_counted,
        "r_pooled": r_pooled,
        "p_pooled": _t_pvalue(r_pooled, pooled.n),
    }
    for k, shard_id in enumerate(shard_ids):
        columns[f"r_shard_{shard_id}"] = np.where(counted[:, k], r_shard[:, k], np.nan)
        columns[f"p_shard_{shard_id}"] = np.where(counted[:, k], p_shard[:, k], np.nan)
    columns |= {
        "frac_same_sign": frac_same,
        "frac_significant_same_sign": frac_significant,
        "consistent": (frac_significant >= threshold) & (n_counted >= 2),
    }
    return pd.DataFrame(columns)


def replication(
    records: pd.DataFrame,
    *,
    x: str = "q_norm",
    y: str = "entropy",
    log_x: bool = True,
    alpha: float = 0.05,
    min_position: int = 1,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    split_seed: int = 0,
) -> pd.DataFrame:
    """Select heads with BH q < alpha on one half of the shards, test r(f(x), y) on the other half.

    Shards are permuted with `split_seed`; the first ceil(k/2) form the discovery half (with one
    shard, sequences are split instead). `selected` is `head_correlations(...)["significant"]` on
    the discovery half (BH over heads on the clustering-aware p, q < alpha).
    `p_replication` is the one-sided token-level t-test p in the direction of `r_discovery`
    (H1: sign(r) = sign(r_discovery)), uncorrected. `replicated` is selected, same sign,
    p_replication < alpha, and the replication half's bootstrap interval also excludes 0, since
    the token-level p alone is optimistic under clustering. Heads absent from a half get NaN.
    Columns: `layer`, `head`, `n_tokens_discovery`, `r_discovery`, `q_discovery`, `selected`,
    `n_tokens_replication`, `r_replication`, `r_replication_ci_low`, `r_replication_ci_high`,
    `p_replication`, `replicated`.
    """
    _require_columns(records, ("shard", "sequence"), "records")
    discovery = _split_halves(records, split_seed)
    options = dict(
        x=x, ys=(y,), log_x=log_x, min_position=min_position, n_boot=n_boot, ci=ci, alpha=alpha,
        seed=seed,
    )
    found = head_correlations(records[discovery], **options)
    tested = head_correlations(records[~discovery], **options)
    found = found[[*_HEAD_KEYS, "n_tokens", f"r_{y}", f"q_{y}", "significant"]].rename(
        columns={
            "n_tokens": "n_tokens_discovery",
            f"r_{y}": "r_discovery",
            f"q_{y}": "q_discovery",
            "significant": "selected",
        }
    )
    tested = tested[[*_HEAD_KEYS, "n_tokens", f"r_{y}", f"r_{y}_ci_low", f"r_{y}_ci_high"]]
    tested = tested.rename(
        columns={
            "n_tokens": "n_tokens_replication",
            f"r_{y}": "r_replication",
            f"r_{y}_ci_low": "r_replication_ci_low",
            f"r_{y}_ci_high": "r_replication_ci_high",
        }
    )
    out = found.merge(tested, on=list(_HEAD_KEYS), how="outer").sort_values(list(_HEAD_KEYS))
    out["selected"] = out["selected"].eq(True)  # heads absent from the discovery half: False
    sign = np.sign(out["r_discovery"].to_numpy())
    out["p_replication"] = _t_pvalue(
        out["r_replication"].to_numpy(), out["n_tokens_replication"].to_numpy(), direction=sign
    )
    same_sign = np.sign(out["r_replication"]) == sign
    interval_agrees = np.where(
        sign > 0, out["r_replication_ci_low"] > 0, out["r_replication_ci_high"] < 0
    )
    out["replicated"] = (
        out["selected"] & same_sign & (out["p_replication"] < alpha) & interval_agrees
    )
    return out.reset_index(drop=True)


def layer_statistics(
    head_summary: pd.DataFrame, *, r: str = "correlation", significant: str = "significant"
) -> pd.DataFrame:
    """Mean |r|, mean, std (ddof = 1), min and max of r, and share of significant heads, per layer.

    `head_summary` is one row per head, e.g. from `head_correlations`. Columns: `layer`,
    `n_heads`, `mean_r`, `mean_abs_r`, `std_r`, `min_r`, `max_r`, `n_significant`,
    `frac_significant`, and the original project's `mean_correlation` (= mean_r) and
    `std_correlation` (= std_r).
    """
    _require_columns(head_summary, ("layer", r, significant), "head_summary")
    values = head_summary[r].astype(float)
    flags = head_summary[significant].astype(bool)
    layer = head_summary["layer"]
    by_layer = values.groupby(layer, sort=True)
    out = pd.DataFrame(
        {
            "n_heads": by_layer.size(),
            "mean_r": by_layer.mean(),
            "mean_abs_r": values.abs().groupby(layer, sort=True).mean(),
            "std_r": by_layer.std(ddof=1),
            "min_r": by_layer.min(),
            "max_r": by_layer.max(),
            "n_significant": flags.groupby(layer, sort=True).sum(),
            "frac_significant": flags.groupby(layer, sort=True).mean(),
        }
    )
    out["mean_correlation"] = out["mean_r"]
    out["std_correlation"] = out["std_r"]
    return out.rename_axis("layer").reset_index()


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
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(ssxym / np.sqrt(ssxm * ssym), -1.0, 1.0)
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


# --- token tables -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    """Complete (f(x), y) cases of one column pair, in head-contiguous order."""

    head: np.ndarray  # head code per kept token, non-decreasing
    n_heads: int
    mask: np.ndarray  # which rows of the token table were kept
    a: np.ndarray  # f(x)
    b: np.ndarray  # y

    def moments(self, *, a=None, b=None, cells=None, n_cells: int = 1) -> Moments:
        """Moments of shape (head, cell), each head's values shifted by its first value."""
        a = self.a if a is None else a
        b = self.b if b is None else b
        cells = np.zeros_like(self.head) if cells is None else cells
        # The shift keeps the raw sums' digits, and a constant head then has variance exactly 0.
        first = np.searchsorted(self.head, np.arange(self.n_heads))
        a = a - a[first][self.head]
        b = b - b[first][self.head]
        flat = Moments.from_groups(a, b, self.head * n_cells + cells, self.n_heads * n_cells)
        return flat._map(lambda sums: sums.reshape(self.n_heads, n_cells))

    def ranks(self, values: np.ndarray) -> np.ndarray:
        """Average ranks (1-based) of values within each head."""
        bounds = np.searchsorted(self.head, np.arange(self.n_heads + 1))
        out = np.empty_like(values)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            out[start:stop] = stats.rankdata(values[start:stop])
        return out


@dataclass(frozen=True)
class _Tokens:
    """Columns of the records at position >= min_position, sorted by head, with head codes."""

    columns: dict[str, np.ndarray]
    x_name: str
    x: np.ndarray  # f(x) per token
    head: np.ndarray  # 0..n_heads-1 in (layer, head) order, non-decreasing
    keys: pd.MultiIndex

    @classmethod
    def build(cls, records, *, x, ys, log_x, min_position, extra=()) -> "_Tokens":
        required = tuple(dict.fromkeys(("sequence", "position", *_HEAD_KEYS, x, *ys, *extra)))
        _require_columns(records, required, "records")
        positions = records["position"].to_numpy()
        keep = np.flatnonzero(positions >= min_position)
        if keep.size == 0:
            raise SpectraError(
                f"no tokens at position >= min_position={min_position}; "
                f"positions in records span {positions.min()}..{positions.max()}"
            )
        grouped = records.iloc[keep].groupby(list(_HEAD_KEYS), sort=True)
        head = grouped.ngroup().to_numpy()
        order = np.argsort(head, kind="stable")
        rows = keep[order]
        values = records[x].to_numpy(dtype=float)[rows]
        if log_x:
            bad = values <= 0
            if bad.any():
                raise SpectraError(
                    f"log_x=True needs {x} > 0; got {int(bad.sum())} values <= 0 "
                    f"(smallest {values[bad].min()})"
                )
            values = np.log(values)
        return cls(
            columns={name: records[name].to_numpy()[rows] for name in required},
            x_name=x,
            x=values,
            head=head[order],
            keys=grouped.size().index,
        )

    @property
    def n_heads(self) -> int:
        return len(self.keys)

    @property
    def n_tokens(self) -> np.ndarray:
        return np.bincount(self.head[np.isfinite(self.x)], minlength=self.n_heads)

    def key_columns(self) -> dict[str, np.ndarray]:
        return {name: self.keys.get_level_values(name).to_numpy() for name in _HEAD_KEYS}

    def codes(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """Dense codes 0..k-1 of a column's values, and the sorted values."""
        return pd.factorize(self.columns[column], sort=True)

    def head_mean(self, column: str) -> np.ndarray:
        values = self.columns[column].astype(float)
        finite = np.isfinite(values)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.bincount(
                self.head[finite], values[finite], minlength=self.n_heads
            ) / np.bincount(self.head[finite], minlength=self.n_heads)

    def pair(self, y: str) -> _Pair:
        """Tokens where both f(x) and y are finite; every head must keep _MIN_TOKENS of them."""
        values = self.columns[y].astype(float)
        mask = np.isfinite(self.x) & np.isfinite(values)
        head = self.head[mask]
        short = np.flatnonzero(np.bincount(head, minlength=self.n_heads) < _MIN_TOKENS)
        if short.size:
            names = ", ".join(f"(layer {layer}, head {h})" for layer, h in self.keys[short[:5]])
            raise SpectraError(
                f"every head needs >= {_MIN_TOKENS} tokens with finite {self.x_name} and {y} "
                f"at position >= min_position; {short.size} head(s) have fewer: {names}"
            )
        return _Pair(head=head, n_heads=self.n_heads, mask=mask, a=self.x[mask], b=values[mask])


# --- helpers ------------------------------------------------------------------------------


def _t_pvalue(r, n, *, n_covariates: int = 0, direction=None) -> np.ndarray:
    """p of t = r √(df / (1 − r²)), df = n − 2 − k; two-sided, or one-sided toward `direction`."""
    r = np.asarray(r, dtype=float)
    df = np.asarray(n, dtype=float) - 2 - n_covariates
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / ((1 - r) * (1 + r)))
        df = np.where(df > 0, df, np.nan)
        if direction is None:
            return np.asarray(2 * stats.t.sf(np.abs(t), df))
        direction = np.where(np.asarray(direction) == 0, np.nan, direction)
        return np.asarray(stats.t.sf(np.sign(direction) * t, df))


def _cluster_pvalue(r: np.ndarray, boot: np.ndarray) -> np.ndarray:
    """Two-sided Wald p of Fisher's z = atanh(r) with the sequence-bootstrap standard error.

    The bootstrap resamples whole sequences, so this p respects the clustering that the
    token-level t-test ignores; BH over heads on it controls the false discovery rate.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.arctanh(np.clip(r, -1 + 1e-12, 1 - 1e-12))
        se = np.nanstd(np.arctanh(np.clip(boot, -1 + 1e-12, 1 - 1e-12)), axis=1, ddof=1)
        return np.asarray(2 * stats.norm.sf(np.abs(z) / se))


def _with_q(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Insert the BH q-values after each p column: p_* -> q_*, partial_p_* -> partial_q_*."""
    out = {}
    for name, values in columns.items():
        out[name] = values
        if name.startswith("p_"):
            out["q_" + name[2:]] = fdr(values)
        elif name.startswith("partial_p_"):
            out["partial_q_" + name[10:]] = fdr(values)
    return out


def _bootstrap_counts(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each unit is drawn in each of n_boot resamples of n_units with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=n_boot).astype(float)


def _percentile_interval(boot: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the (1 − ci)/2 and (1 + ci)/2 quantiles of the finite bootstrap replicates."""
    out = np.full((2, boot.shape[0]), np.nan)
    rows = np.isfinite(boot).any(axis=1)
    if rows.any():
        out[:, rows] = np.nanpercentile(boot[rows], [50 * (1 - ci), 50 * (1 + ci)], axis=1)
    return out[0], out[1]


def _split_halves(records: pd.DataFrame, seed: int) -> np.ndarray:
    """Boolean mask of the discovery half: a random ceil(k/2) of the shards (else sequences)."""
    unit = "shard" if records["shard"].nunique() >= 2 else "sequence"
    ids = np.sort(records[unit].unique())
    if ids.size < 2:
        raise SpectraError(
            f"replication needs >= 2 shards or >= 2 sequences; got {ids.size} sequence(s)"
        )
    chosen = np.random.default_rng(seed).permutation(ids)[: (ids.size + 1) // 2]
    return records[unit].isin(chosen).to_numpy()


def _is_monotonic(log_alpha: np.ndarray, values: np.ndarray, atol: float) -> np.ndarray:
    steps = np.diff(values[:, np.argsort(log_alpha)], axis=1)
    return np.all(steps >= -atol, axis=1) | np.all(steps <= atol, axis=1)


def _check_alphas(alphas, values) -> tuple[np.ndarray, np.ndarray]:
    alphas = np.asarray(alphas, dtype=float)
    values = np.asarray(values, dtype=float)
    if alphas.ndim != 1 or alphas.size < 2:
        raise SpectraError(f"alphas must be 1-D with >= 2 entries; got shape {alphas.shape}")
    if not np.all(alphas > 0):
        raise SpectraError(f"alphas must be > 0 (we fit against ln α); got {alphas.tolist()}")
    if np.unique(alphas).size < 2:
        raise SpectraError(f"alphas must not all be equal; got {alphas.tolist()}")
    if values.shape[-1:] != alphas.shape:
        raise SpectraError(
            f"values must have one entry per alpha on the last axis ({alphas.size}); "
            f"got shape {values.shape}"
        )
    return np.log(alphas), values


def _check_probability(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise SpectraError(f"{name} must lie strictly between 0 and 1; got {value}")


def _require_columns(frame, columns, name: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise SpectraError(f"{name} must be a pandas DataFrame; got {type(frame).__name__}")
    missing = [c for c in dict.fromkeys(columns) if c not in frame.columns]
    if missing:
        raise SpectraError(
            f"{name} lacks column(s) {missing}; expected {list(dict.fromkeys(columns))}, "
            f"got {list(frame.columns)}"
        )
    if frame.empty:
        raise SpectraError(f"{name} is empty; expected one row per token (and head)")


def _warn_undefined(summary: pd.DataFrame, columns: list[str]) -> None:
    for column in columns:
        undefined = int(summary[column].isna().sum())
        if undefined:
            warnings.warn(
                f"{column} is NaN for {undefined} head(s): a constant metric has no correlation",
                RuntimeWarning,
                stacklevel=3,
            )


def t_interval(
    values, *, ci: float = 0.95, axis: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean ± t_{n−1, (1+ci)/2} · sd / √n over `axis` (the independent units): (mean, low, high).

    With n < 2 the interval is NaN. Sequences are the independent units; tokens of one sequence
    are not, so per-token values must be averaged per sequence first.
    """
    if not 0 < ci < 1:
        raise SpectraError(f"ci must lie strictly between 0 and 1, got {ci!r}")
    x = values.detach().cpu().double().numpy() if hasattr(values, "detach") else np.asarray(values, float)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan.copy()
    half = stats.t.ppf((1 + ci) / 2, n - 1) * x.std(axis=axis, ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half


# --- per-document moments ---------------------------------------------------------------------

# Per-token variables whose per-document moments a capture stores (derived: log_q_norm = ln‖q‖,
# log_k_norm = ln‖k‖, log_position = ln(position + 1), log_dir_spread = ln of the spread of
# q̂·k/√d over visible keys; *_nosink: the metric of the pattern with the first key excluded).
MOMENT_VARIABLES: tuple[str, ...] = (
    "log_q_norm", "q_norm", "log_k_norm", "log_position", "sink_mass",
    "entropy", "entropy_norm", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90",
    "entropy_nosink", "max_attn_nosink", "k_eff_exp_nosink", "k_eff_pr_nosink",
    "k_eff_top90_nosink", "log_dir_spread", "local_gain",
)
MOMENTS_FORMAT = "spectra_lens.document_moments"
MOMENTS_VERSION = 1
# Below this many documents the clustered test (CR1, t with G − 1 df) is flagged as fragile.
SMALL_G = 30
# Covariates and norms, not outcomes: head_statistics tests the other variables against ln‖q‖.
_NOT_OUTCOMES = ("q_norm", "log_k_norm", "log_position", "sink_mass", "local_gain")
# The controls of every association: none, log position, log position and sink mass.
CONTROLS: dict[str, tuple[str, ...]] = {
    "": (),
    "pos": ("log_position",),
    "pos_sink": ("log_position", "sink_mass"),
}


@dataclass(frozen=True, repr=False)
class DocumentMoments:
    """Per (document, head) count, mean and centred second-moment matrix of token variables.

    For the tokens i of document g seen by head h, with v_i the vector of `variables`:
    `n[g, h]` = #tokens, `mean[g, h]` = Σ v_i / n, `m2[g, h]` = Σ (v_i − mean)(v_i − mean)ᵀ.
    That is the second-moment matrix of (1, v) in a stable form: every correlation, partial
    correlation, regression slope, the document-cluster bootstrap and the cluster-robust test
    of a head are functions of these G matrices, so analysis memory is O(documents × heads).
    Rows that share a document id merge exactly (`concat`), so per-shard, per-run or per-rank
    moments combine by concatenation.
    """

    documents: Int[np.ndarray, " doc"]
    layers: Int[np.ndarray, " head"]
    heads: Int[np.ndarray, " head"]
    variables: tuple[str, ...]
    n: Float[np.ndarray, "doc head"]
    mean: Float[np.ndarray, "doc head var"]
    m2: Float[np.ndarray, "doc head var var"]
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"DocumentMoments(documents={self.documents.size}, heads={self.layers.size}, "
                f"tokens={int(self.n.sum())}, variables={list(self.variables)})")

    @property
    def n_documents(self) -> int:
        return int(self.documents.size)

    @classmethod
    def from_tokens(cls, values, valid, documents, *, layers, heads, variables,
                    meta=None) -> "DocumentMoments":
        """Moments of token values `[sequence, head, pos, var]` where `valid[sequence, head, pos]`.

        `documents[sequence]` is each sequence's document id; sequences of one document merge.
        """
        values = np.asarray(values, dtype=np.float64)
        valid = np.asarray(valid, dtype=bool)
        documents = np.asarray(documents, dtype=np.int64)
        if values.ndim != 4 or valid.shape != values.shape[:3] or documents.shape != values.shape[:1]:
            raise SpectraError(
                "from_tokens expects values [sequence, head, pos, var], valid [sequence, head, "
                f"pos] and documents [sequence]; got {values.shape}, {valid.shape}, "
                f"{documents.shape}")
        if values.shape[3] != len(variables):
            raise SpectraError(f"values have {values.shape[3]} variables; names given: {variables}")
        w = valid.astype(np.float64)
        n = w.sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.einsum("shp,shpv->shv", w, np.where(valid[..., None], values, 0.0))
            mean = np.where(n[..., None] > 0, mean / n[..., None], 0.0)
        centred = np.where(valid[..., None], values - mean[:, :, None, :], 0.0)
        m2 = np.swapaxes(centred, -1, -2) @ centred  # Σ_p c cᵀ: batched BLAS, not einsum's loop
        ids, codes = np.unique(documents, return_inverse=True)
        n, mean, m2 = _merge_rows(n, mean, m2, codes, ids.size)
        return cls(ids, np.asarray(layers, dtype=np.int64), np.asarray(heads, dtype=np.int64),
                   tuple(variables), n, mean, m2, dict(meta or {}))

    @classmethod
    def from_metrics(cls, metrics, documents, *, min_position: int = 1,
                     variables: Sequence[str] = MOMENT_VARIABLES) -> "DocumentMoments":
        """Moments of a capture's per-token metrics (`hooks.TokenMetrics`, [batch, layer, head,
        pos] tensors) at positions >= min_position; `documents[b]` is sequence b's document.

        Tokens where any variable is not finite (e.g. a skipped k_eff_top90) are left out:
        pass `variables` without such a metric to keep them.
        """
        first = np.asarray(metrics.entropy.detach().cpu())
        b, n_l, n_h, n_p = first.shape
        if not 0 <= min_position < n_p:
            raise SpectraError(f"min_position must be in [0, {n_p}); got {min_position}")
        logs = {"log_q_norm": "q_norm", "log_k_norm": "k_norm", "log_dir_spread": "dir_spread"}
        cols = []
        for name in variables:
            if name == "log_position":
                pos = np.log1p(np.arange(n_p, dtype=np.float64))
                cols.append(np.broadcast_to(pos, (b, n_l, n_h, n_p)))
                continue
            t = getattr(metrics, logs.get(name, name))
            v = np.asarray(t.detach().cpu(), dtype=np.float64)
            if name in logs:
                with np.errstate(divide="ignore", invalid="ignore"):
                    v = np.log(v)
            cols.append(v)
        values = np.stack(cols, axis=-1)[:, :, :, min_position:].reshape(
            b, n_l * n_h, n_p - min_position, len(variables))
        valid = np.isfinite(values).all(axis=-1)
        layers = np.repeat(np.asarray(metrics.layers, dtype=np.int64), n_h)
        heads = np.tile(np.arange(n_h, dtype=np.int64), n_l)
        return cls.from_tokens(values, valid, documents, layers=layers, heads=heads,
                               variables=variables, meta={"min_position": min_position})

    @classmethod
    def concat(cls, parts: Sequence["DocumentMoments"]) -> "DocumentMoments":
        """The moments of the union of the tokens: rows of one document id merge exactly."""
        parts = list(parts)
        if not parts:
            raise SpectraError("concat needs at least one DocumentMoments; got none")
        first = parts[0]
        for p in parts[1:]:
            if (p.variables != first.variables or not np.array_equal(p.layers, first.layers)
                    or not np.array_equal(p.heads, first.heads)):
                raise SpectraError(
                    "moments to merge must share variables and heads; got "
                    f"{p.variables} / {p.layers.size} heads and {first.variables} / "
                    f"{first.layers.size} heads")
        documents = np.concatenate([p.documents for p in parts])
        ids, codes = np.unique(documents, return_inverse=True)
        n, mean, m2 = _merge_rows(np.concatenate([p.n for p in parts]),
                                  np.concatenate([p.mean for p in parts]),
                                  np.concatenate([p.m2 for p in parts]), codes, ids.size)
        return cls(ids, first.layers, first.heads, first.variables, n, mean, m2, dict(first.meta))

    def select(self, documents=None, heads=None) -> "DocumentMoments":
        """A subset: document ids and/or head indices (positions along the head axis)."""
        g = slice(None) if documents is None else np.isin(self.documents, documents)
        h = slice(None) if heads is None else np.asarray(heads)
        return DocumentMoments(self.documents[g], self.layers[h], self.heads[h], self.variables,
                               self.n[g][:, h], self.mean[g][:, h], self.m2[g][:, h],
                               dict(self.meta))

    def index(self, name: str) -> int:
        if name not in self.variables:
            raise SpectraError(f"variable {name!r} is not in the moments; they hold "
                               f"{list(self.variables)}")
        return self.variables.index(name)

    def augmented(self) -> tuple[np.ndarray, np.ndarray]:
        """(S, μ): S[g, h] = Σ_i z_i z_iᵀ over document g, z = (1, v − μ_h), μ_h the pooled mean.

        Centring at the pooled mean keeps the sums' digits; any statistic that is linear in the
        sums (the bootstrap, the cluster scores) is a sum over documents of these matrices.
        Computed once per object (the analysis asks for it several times) and read-only.
        """
        cached = self.__dict__.get("_augmented")
        if cached is not None:
            return cached
        total = self.n.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.where(total[:, None] > 0,
                          (self.n[..., None] * self.mean).sum(axis=0) / total[:, None], 0.0)
        d = self.mean - mu[None]
        g, h, p = self.mean.shape
        s = np.empty((g, h, p + 1, p + 1))
        s[..., 0, 0] = self.n
        b = self.n[..., None] * d
        s[..., 0, 1:] = b
        s[..., 1:, 0] = b
        s[..., 1:, 1:] = self.m2 + b[..., :, None] * d[..., None, :]
        s.setflags(write=False)
        mu.setflags(write=False)
        object.__setattr__(self, "_augmented", (s, mu))  # frozen: a cache, not a field
        return s, mu

    # --- storage: one .npz per shard (merging is concatenation) -----------------------------

    def save(self, path) -> None:
        """Write one `.npz` file atomically (format described in `MOMENTS_FORMAT` docs)."""
        path = Path(path)
        header = {"format": MOMENTS_FORMAT, "version": MOMENTS_VERSION,
                  "variables": list(self.variables), "meta": self.meta}
        blob = npz_bytes(header=np.array(json.dumps(header)), documents=self.documents,
                         layers=self.layers, heads=self.heads, n=self.n, mean=self.mean, m2=self.m2)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path) -> "DocumentMoments":
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in ("documents", "layers", "heads", "n", "mean", "m2")}
        except Exception as e:
            raise SpectraError(f"moments file {path} is unreadable ({e}); delete it and rerun "
                               "to redo it") from e
        if header.get("format") != MOMENTS_FORMAT or header.get("version", 0) > MOMENTS_VERSION:
            raise SpectraError(f"{path} is not a {MOMENTS_FORMAT} file of version <= "
                               f"{MOMENTS_VERSION}; got {header.get('format')!r} "
                               f"v{header.get('version')}")
        return cls(variables=tuple(header["variables"]), meta=header.get("meta") or {}, **arrays)


def _merge_rows(n, mean, m2, codes, n_groups):
    """Merge rows of (n, mean, M2) that share a code: exact pooled count, mean and centred M2."""
    tot_n = np.zeros((n_groups,) + n.shape[1:])
    np.add.at(tot_n, codes, n)
    tot_sum = np.zeros((n_groups,) + mean.shape[1:])
    np.add.at(tot_sum, codes, n[..., None] * mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        new_mean = np.where(tot_n[..., None] > 0, tot_sum / tot_n[..., None], 0.0)
    d = mean - new_mean[codes]
    new_m2 = np.zeros((n_groups,) + m2.shape[1:])
    np.add.at(new_m2, codes, m2 + n[..., None, None] * d[..., :, None] * d[..., None, :])
    return tot_n, new_mean, new_m2


def moments_from_records(records: pd.DataFrame, variables: Sequence[str], *,
                         min_position: int = 1, document: str = "document") -> DocumentMoments:
    """Per-document moments of per-token records (one row per token and head).

    Derived variables: `log_q_norm` = ln q_norm, `log_k_norm` = ln k_norm, `log_position` =
    ln(position + 1), `log_dir_spread` = ln dir_spread; other names are columns. Tokens at
    position < min_position, and tokens where any variable is not finite, are left out.
    """
    _require_columns(records, ("position", document, *_HEAD_KEYS), "records")
    rec = records[records["position"] >= min_position]
    cols = []
    for name in variables:
        cols.append(_derived(rec, name))
    values = np.column_stack(cols).astype(np.float64)
    ok = np.isfinite(values).all(axis=1)
    values, rec = values[ok], rec[ok]
    heads = rec.groupby(list(_HEAD_KEYS), sort=True).ngroup().to_numpy()
    keys = rec.groupby(list(_HEAD_KEYS), sort=True).size().index
    ids, doc = np.unique(rec[document].to_numpy(), return_inverse=True)
    n_h = len(keys)
    cell = doc * n_h + heads
    n_cells = ids.size * n_h
    n = np.bincount(cell, minlength=n_cells).astype(float)
    sums = np.stack([np.bincount(cell, values[:, j], minlength=n_cells)
                     for j in range(values.shape[1])], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n[:, None] > 0, sums / n[:, None], 0.0)
    centred = values - mean[cell]
    m2 = np.zeros((n_cells, values.shape[1], values.shape[1]))
    np.add.at(m2, cell, centred[:, :, None] * centred[:, None, :])
    p = values.shape[1]
    return DocumentMoments(
        ids.astype(np.int64),
        keys.get_level_values("layer").to_numpy().astype(np.int64),
        keys.get_level_values("head").to_numpy().astype(np.int64),
        tuple(variables), n.reshape(ids.size, n_h), mean.reshape(ids.size, n_h, p),
        m2.reshape(ids.size, n_h, p, p), {"min_position": min_position})


def _derived(frame: pd.DataFrame, name: str) -> np.ndarray:
    logs = {"log_q_norm": "q_norm", "log_k_norm": "k_norm", "log_dir_spread": "dir_spread"}
    if name == "log_position":
        return np.log1p(frame["position"].to_numpy(dtype=float))
    if name in logs:
        _require_columns(frame, (logs[name],), "records")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(frame[logs[name]].to_numpy(dtype=float))
    _require_columns(frame, (name,), "records")
    return frame[name].to_numpy(dtype=float)


# --- statistics from the augmented moments ---------------------------------------------------


def _cov(s: np.ndarray) -> np.ndarray:
    """Centred cross-product matrix C = A − b bᵀ / n of summed augmented moments (..., q, q)."""
    n = s[..., 0, 0]
    b = s[..., 1:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return s[..., 1:, 1:] - b[..., :, None] * b[..., None, :] / n[..., None, None]


def _partial(c: np.ndarray, x: int, y: int, z: Sequence[int]):
    """(C_xx·z, C_yy·z, C_xy·z): cross-products of x and y after least squares on z (and 1)."""
    cxx, cyy, cxy = c[..., x, x], c[..., y, y], c[..., x, y]
    if z:
        z = list(z)
        czz = c[..., z, :][..., :, z]
        czx = c[..., z, x]
        czy = c[..., z, y]
        try:
            inv = np.linalg.inv(czz)
        except np.linalg.LinAlgError:  # a constant control in some head or resample
            inv = np.linalg.pinv(czz)
        wx = np.einsum("...ij,...j->...i", inv, czx)
        wy = np.einsum("...ij,...j->...i", inv, czy)
        cxx = cxx - np.einsum("...i,...i->...", czx, wx)
        cyy = cyy - np.einsum("...i,...i->...", czy, wy)
        cxy = cxy - np.einsum("...i,...i->...", czx, wy)
    return cxx, cyy, cxy


def _residual_corr(c: np.ndarray, x: int, ys: Sequence[int], z: Sequence[int]) -> np.ndarray:
    """Partial r of x with each of ys given z (and 1), from cross-products C (..., p, p).

    C_res = C − C[:, z] C_zz⁻¹ C[z, :] is the cross-product matrix of the residuals after least
    squares on [1, z]; returns (..., len(ys)).
    """
    idx = _as_slice([x, *ys])
    sub = _take2(c, idx, idx)
    if z:
        z = _as_slice(z)
        czz = _take2(c, z, z)
        cz = _take2(c, z, idx)
        try:
            sol = np.linalg.solve(czz, cz)
        except np.linalg.LinAlgError:  # a constant control in some head or resample
            sol = np.linalg.pinv(czz) @ cz
        sub = sub - np.swapaxes(cz, -1, -2) @ sol
    cxx = sub[..., 0, 0][..., None]
    cyy = np.diagonal(sub, axis1=-2, axis2=-1)[..., 1:]
    return _corr(cxx, cyy, sub[..., 0, 1:])


def _as_slice(index):
    """A list of consecutive indices as a slice (basic indexing: a view, no copy)."""
    index = list(index)
    if index == list(range(index[0], index[-1] + 1)):
        return slice(index[0], index[-1] + 1)
    return index


def _take2(c, rows, cols):
    if isinstance(rows, slice) and isinstance(cols, slice):
        return c[..., rows, cols]
    return c[..., rows, :][..., :, cols]


def _quantiles(boot: np.ndarray, qs) -> list[np.ndarray]:
    """Linear-interpolation quantiles over axis 0 of the finite values (NaN if none)."""
    data = np.sort(boot, axis=0)  # NaN sorts last
    n = np.isfinite(data).sum(axis=0)
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = np.clip(np.floor(pos).astype(int), 0, data.shape[0] - 1)
        hi = np.clip(lo + 1, 0, np.maximum(n - 1, 0))
        frac = pos - np.floor(pos)
        vlo = np.take_along_axis(data, lo[None], axis=0)[0]
        vhi = np.take_along_axis(data, hi[None], axis=0)[0]
        out.append(np.where(n > 0, vlo + frac * (vhi - vlo), np.nan))
    return out


def _bootstrap_partial_r(s_docs: np.ndarray, keep: Sequence[int], counts: np.ndarray, n_y: int,
                         local_z: dict[str, list[int]], *, chunk: int = 50) -> dict[str, np.ndarray]:
    """Partial r of variable 0 with each of variables 1..n_y given each control set, in every
    resample. `sub` = `s_docs[:, :, keep][:, :, :, keep]` are (doc, head, q, q) augmented
    moments (index 0 the constant, variable j at j + 1; `local_z` indexes variables of `sub`),
    `counts` (n_boot, doc) how often each document is drawn. Returns
    {control: (n_boot, head, n_y)}.

    A partial r needs only the x row, the y diagonal and the control rows of the cross-product
    matrix, not the y × y block: only those sums are formed (a quarter of the matrix for 13 ys
    and 2 controls), and the controls' 1×1 / 2×2 systems are solved in closed form. The result
    equals `_residual_corr` on the full resampled matrix (`_bootstrap_partial_r_full`, used
    where a control's matrix is singular in some resample) up to rounding.
    """
    keep = np.asarray(keep)
    n_docs, n_heads = s_docs.shape[:2]
    x, ys = 1, list(range(2, 2 + n_y))  # augmented indices
    zs_all = sorted({j + 1 for z in local_z.values() for j in z})
    pairs: dict[tuple[int, int], int] = {}
    wanted = [(0, 0), *((u, 0) for u in [x, *ys, *zs_all]), (x, x), *((x, y) for y in ys),
              *((y, y) for y in ys), *((z, u) for z in zs_all for u in [x, *ys, *zs_all])]
    for pr in wanted:
        pairs.setdefault(pr, len(pairs))
    rows = np.array([pr[0] for pr in pairs])
    cols = np.array([pr[1] for pr in pairs])
    # (doc, pair, head): a resample's sums are counts @ flat, and each pair's sums over heads
    # are one contiguous row.
    flat = np.ascontiguousarray(np.swapaxes(s_docs[:, :, keep[rows], keep[cols]], 1, 2))
    flat = flat.reshape(n_docs, -1)
    # C = A − b bᵀ / n entry by entry, as `_cov` forms it, for the pairs (u, v) with u, v ≥ 1.
    need = [k for k, (u, v) in enumerate(pairs) if u and v]
    where = {pr: i for i, pr in enumerate(pr for pr in pairs if pr[0] and pr[1])}
    first = np.array([pairs[pr[0], 0] for pr in where])
    second = np.array([pairs[pr[1], 0] for pr in where])
    ix = lambda rows_, cols_: np.array([[where[r, c] for c in cols_] for r in rows_])  # noqa: E731
    at_xx, at_xy, at_yy = where[x, x], ix([x], ys)[0], np.array([where[y, y] for y in ys])
    n_boot = counts.shape[0]
    out = {c: np.empty((n_boot, n_heads, n_y)) for c in local_z}
    for start in range(0, n_boot, chunk):
        block = counts[start:start + chunk]
        m = (block @ flat).reshape(block.shape[0], len(pairs), n_heads)
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = m[:, need] - m[:, first] * m[:, second] / m[:, :1]  # (resample, pair, head)
            cxx = cov[:, at_xx][:, None]
            cxy = cov[:, at_xy]
            cyy = cov[:, at_yy]
            for c, z in local_z.items():
                za = [j + 1 for j in z]
                dest = out[c][start:start + block.shape[0]]
                if not za:
                    dest[...] = np.swapaxes(_corr(cxx, cyy, cxy), 1, 2)
                    continue
                # cz[:, k, u]: control k against u in [x, ys]; czz: the controls' own matrix.
                cz = cov[:, ix(za, [x, *ys])]
                sol = _small_solve(cov[:, ix(za, za)], cz)
                if sol is None:  # singular or undefined in some resample: the general path
                    sub = s_docs[:, :, keep, :][:, :, :, keep]
                    cb = _cov((block @ sub.reshape(n_docs, -1)).reshape(block.shape[0], *sub.shape[1:]))
                    dest[...] = _residual_corr(cb, 0, list(range(1, 1 + n_y)), z)
                    continue
                rxx = cxx[:, 0] - (cz[:, :, 0] * sol[:, :, 0]).sum(axis=1)
                rxy = cxy - (cz[:, :, :1] * sol[:, :, 1:]).sum(axis=1)
                ryy = cyy - (cz[:, :, 1:] * sol[:, :, 1:]).sum(axis=1)
                dest[...] = np.swapaxes(_corr(rxx[:, None], ryy, rxy), 1, 2)
    return out


def _small_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """a⁻¹ b for a (batch, k, k, head) and b (batch, k, m, head): closed form for k = 1, 2
    (np.linalg.solve beyond); None where some `a` is singular or not finite, so that the
    caller takes its general path."""
    k = a.shape[1]
    if not np.isfinite(a).all():
        return None
    if k == 1:
        d = a[:, 0, 0]
        if (d == 0).any():
            return None
        return b / d[:, None, None]
    if k == 2:
        p, q, r, s = a[:, 0, 0, None], a[:, 0, 1, None], a[:, 1, 0, None], a[:, 1, 1, None]
        det = p * s - q * r
        if (det == 0).any():
            return None
        b0, b1 = b[:, 0], b[:, 1]
        return np.stack([(s * b0 - q * b1) / det, (p * b1 - r * b0) / det], axis=1)
    try:
        sol = np.linalg.solve(np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1))
    except np.linalg.LinAlgError:
        return None
    return np.moveaxis(sol, 1, -1)


def _bootstrap_partial_r_full(s_docs, keep, counts, n_y, local_z, *, chunk=50):
    """`_bootstrap_partial_r` by `_residual_corr` on the full resampled matrix (the reference)."""
    sub = s_docs[:, :, keep, :][:, :, :, keep]
    flat = sub.reshape(sub.shape[0], -1)
    out = {c: np.empty((counts.shape[0], sub.shape[1], n_y)) for c in local_z}
    for start in range(0, counts.shape[0], chunk):
        block = counts[start:start + chunk]
        cb = _cov((block @ flat).reshape(block.shape[0], *sub.shape[1:]))
        for c, z in local_z.items():
            out[c][start:start + block.shape[0]] = _residual_corr(cb, 0, list(range(1, 1 + n_y)), z)
    return out


def _corr(cxx, cyy, cxy) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cxy / np.sqrt(cxx * cyy)
    r = np.where((cxx > 0) & (cyy > 0), r, np.nan)
    return np.clip(r, -1.0, 1.0)


CLUSTER_TESTS = ("cr2", "cr1")


def cluster_wald(s_docs: np.ndarray, x: int, y, z: Sequence[int] = (), *,
                 kind: str = "cr2", ci: float = 0.95) -> dict[str, np.ndarray]:
    """Slope of y on x given [1, z] with a document-clustered Wald test.

    `s_docs` is (doc, head, q, q) augmented moments (`DocumentMoments.augmented`: index 0 is
    the constant, variable j sits at j + 1; pass variable indices). With X = [1, x, z] the OLS
    coefficient β = B Xᵀy, B = (XᵀX)⁻¹, comes from the summed moments, and document g's score
    u_g = X_gᵀy_g − M_g β (M_g = X_gᵀX_g) is a linear form of its moment matrix. The variance
    of β is B (Σ_g ũ_g ũ_gᵀ) B · c, and the reference is a t distribution:

    - "cr1": ũ_g = u_g, c = G/(G − 1) · (N − 1)/(N − K), t with G − 1 df;
    - "cr2" (default): the bias-reduced linearization of Bell and McCaffrey, ũ_g =
      X_gᵀ(I − H_gg)^(−½) e_g, c = 1, t with the Bell–McCaffrey degrees of freedom (working
      model: independent errors). Both need only k×k matrices per document: H_gg = X_g B X_gᵀ
      has the nonzero eigenvalues of W_g = M_g^½ B M_g^½, so f(H_gg) = I + X_g(…)X_gᵀ and
      ũ_g = (I + M_g^½ f̃(W_g) M_g^½ B) u_g with f̃(λ) = ((1 − λ)^(−½) − 1)/λ; the degrees of
      freedom (Σλ)²/Σλ² of the matrix Q_gh = δ_gh d_g − v_gᵀ B v_h are computed from the
      k-vectors v_g and scalars d_g, so they are exact from the moments.

    `y` is one variable index, or a sequence of them (then every returned array has a leading
    axis over y; the design-only work, the leverages, is shared). G counts the documents
    holding the head's tokens. Under a null with clustered tokens
    (tests/test_moments.py) CR1 with t(G − 1) rejects ≈ 1.7× too often at G = 16 and still
    ≈ 1.3× at G = 64; CR2 with Bell–McCaffrey df stays within Monte Carlo error, hence the
    default.
    """
    if kind not in CLUSTER_TESTS:
        raise SpectraError(f"kind must be one of {CLUSTER_TESTS}; got {kind!r}")
    single = np.ndim(y) == 0
    yc = [int(j) + 1 for j in np.atleast_1d(y)]
    cols = [0, x + 1, *[j + 1 for j in z]]
    s = s_docs.sum(axis=0)
    xtx = s[..., cols, :][..., :, cols]
    xty = s[..., cols, :][..., :, yc]  # (head, k, ny)
    n_tok = s[..., 0, 0]
    g = (s_docs[..., 0, 0] > 0).sum(axis=0).astype(float)
    k = len(cols)
    ok = (np.linalg.matrix_rank(xtx) == k) & (g >= 2)
    xtx = np.where(ok[:, None, None], xtx, np.eye(k))  # degenerate heads: NaN below
    bread = np.linalg.inv(xtx)
    beta = bread @ xty  # (head, k, ny)
    mg = s_docs[..., cols, :][..., :, cols]
    u = s_docs[..., cols, :][..., :, yc] - mg @ beta[None]  # (doc, head, k, ny)
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "cr2":
            root, lam, vec = _leverage(mg, bread)
            adjust = _leverage_fn(root, lam, vec, bread, _bm_half)
            u = u + adjust @ u
            factor = np.ones_like(g)
            bl = bread[:, :, 1]  # B ℓ for ℓ = the x coefficient
            mbl = np.einsum("ghij,hj->ghi", mg, bl)
            v = mbl + np.einsum("ghij,ghj->ghi", adjust, mbl)
            full = _leverage_fn(root, lam, vec, bread, _bm_full)
            d = np.einsum("hi,ghi->gh", bl, mbl + np.einsum("ghij,ghj->ghi", full, mbl))
            vbv = np.einsum("ghi,hij,ghj->gh", v, bread, v)
            bvv = bread @ np.einsum("ghi,ghj->hij", v, v)
            trace = d.sum(axis=0) - vbv.sum(axis=0)
            frob = ((d**2).sum(axis=0) - 2 * (d * vbv).sum(axis=0)
                    + np.einsum("hij,hji->h", bvv, bvv))
            df = (trace**2 / frob)[:, None]
        else:
            factor = g / (g - 1) * (n_tok - 1) / (n_tok - k)
            df = (g - 1)[:, None]
        # Var(β_x) for each y: (B u)_x summed over documents, squared.
        bu = np.einsum("hj,ghjy->ghy", bread[:, 1, :], u)
        var = (bu**2).sum(axis=0)  # (head, ny)
        se = np.sqrt(factor[:, None] * var)
        df = np.where(ok[:, None], df, np.nan)
        t = beta[:, 1, :] / se
        p = 2 * stats.t.sf(np.abs(t), df)
        half = stats.t.ppf(0.5 + ci / 2, df) * se
    okk = ok[:, None]
    b1 = np.where(okk, beta[:, 1, :], np.nan)
    out = {"beta": b1, "se": np.where(okk, se, np.nan), "p": np.where(okk, p, np.nan),
           "low": b1 - half, "high": b1 + half, "df": np.broadcast_to(df, b1.shape)}
    out = {key: (v[:, 0] if single else v.T) for key, v in out.items()}
    return out | {"n_documents": g, "n_tokens": n_tok}


def _leverage(mg, bread):
    """M_g^½ and the eigen-decomposition of W_g = M_g^½ B M_g^½ (eigenvalues: leverages)."""
    w, q = np.linalg.eigh(mg)
    root = (q * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(q, -1, -2)
    lam, vec = np.linalg.eigh(root @ bread[None] @ root)
    return root, np.clip(lam, 0.0, 1.0 - 1e-12), vec


def _leverage_fn(root, lam, vec, bread, f):
    """M^½ f(W) M^½ B, so that X_gᵀ φ(H_gg) e_g = (I + M^½ f(W) M^½ B) X_gᵀ e_g for
    φ(h) = 1 + h f(h) (H_gg^j = X_g (B M)^(j−1) B X_gᵀ, a power series in k×k matrices)."""
    fw = (vec * f(lam)[..., None, :]) @ np.swapaxes(vec, -1, -2)
    return root @ fw @ root @ bread[None]


def _bm_half(lam):  # ((1 − λ)^(−½) − 1)/λ, → ½ as λ → 0
    small = lam < 1e-9
    safe = np.where(small, 1.0, lam)
    return np.where(small, 0.5, ((1.0 - lam) ** -0.5 - 1.0) / safe)


def _bm_full(lam):  # ((1 − λ)^(−1) − 1)/λ = 1/(1 − λ)
    return 1.0 / (1.0 - lam)


def cluster_mean(s_docs: np.ndarray, mu: np.ndarray, y: int, *, ci: float = 0.95):
    """Mean of variable y with a document-clustered (CR1) t interval, G − 1 df."""
    s = s_docs.sum(axis=0)
    n_tok = s[..., 0, 0]
    delta = s[..., 0, y + 1] / n_tok  # mean − μ
    u = s_docs[..., 0, y + 1] - s_docs[..., 0, 0] * delta[None]
    g = (s_docs[..., 0, 0] > 0).sum(axis=0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(g / (g - 1) * (u**2).sum(axis=0)) / n_tok
        half = stats.t.ppf(0.5 + ci / 2, np.where(g >= 2, g - 1, np.nan)) * se
    m = mu[..., y] + delta
    return m, m - half, m + half


def _name(stat: str, y: str, control: str) -> str:
    """Column name: `{stat}_logq_{y}` with `_given_{control}` for a controlled association."""
    return f"{stat}_logq_{y}" + (f"_given_{control}" if control else "")


def head_statistics(
    moments: DocumentMoments,
    *,
    ys: Sequence[str] | None = None,
    x: str = "log_q_norm",
    controls: dict[str, tuple[str, ...]] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    alpha: float = 0.05,
    seed: int = 0,
    test: str = "cr2",
    boot_chunk: int = 200,
) -> pd.DataFrame:
    """Per head, the association of each y with x = ln ‖q‖, raw and controlled, from moments.

    For every y and every control set c in `controls` ("" none, "pos" = log position,
    "pos_sink" = log position and sink mass) the columns (names from `_name`) are:

    - `r_logq_{y}[_given_c]`: Pearson r (partial r given c), and `r2_…` its square;
    - `slope_logq_{y}[_given_c]`: OLS coefficient of ln ‖q‖ for y on [1, ln ‖q‖, c] in units of
      y per unit ln ‖q‖ (nats per unit ln ‖q‖ for entropy), `slope_ci_low/high_…` its
      document-clustered t interval from the same test;
    - `p_doc_{test}_…`: the two-sided document-clustered Wald test (`cluster_wald`, `test` =
      "cr2" or "cr1") of that coefficient = 0, which is also the test of
      r = 0 (partial r = 0); `q_doc_{test}_…` its Benjamini–Hochberg q over heads;
    - `r_ci_low/high_…`: percentile interval of r over `n_boot` resamples of documents (each
      resample adds the chosen documents' moments: multinomial counts × moments);
    - `p_token_…`: the t-test that treats tokens as independent (n − 2 − k df); shown only to
      compare, it is not calibrated under clustering.

    Also `layer`, `head`, `n_tokens`, `n_documents` and `mean_{v}` for every variable. A
    RuntimeWarning says when fewer than `SMALL_G` documents carry the heads.
    """
    if n_boot < 1:
        raise SpectraError(f"n_boot must be >= 1; got {n_boot}")
    _check_probability("ci", ci)
    _check_probability("alpha", alpha)
    controls = CONTROLS if controls is None else controls
    if ys is None:
        ys = [v for v in moments.variables if v not in (x, *_NOT_OUTCOMES)]
    ix = moments.index(x)
    zs = {c: [moments.index(v) for v in names] for c, names in controls.items()}
    iy = [moments.index(y) for y in ys]
    s_docs, mu = moments.augmented()
    g = (moments.n > 0).sum(axis=0)
    if moments.n_documents < 2:
        raise SpectraError(f"document-clustered statistics need >= 2 documents; got "
                           f"{moments.n_documents}")
    if g.min() < SMALL_G:
        warnings.warn(
            f"only {int(g.min())} documents: the document-clustered p-values are approximate "
            f"with so few clusters (below {SMALL_G}); treat them with care and add documents",
            RuntimeWarning, stacklevel=2)
    n_tok = moments.n.sum(axis=0)
    columns: dict[str, np.ndarray] = {"layer": moments.layers, "head": moments.heads,
                                      "n_tokens": n_tok.astype(np.int64),
                                      "n_documents": g.astype(np.int64)}
    for j, v in enumerate(moments.variables):
        columns[f"mean_{v}"] = mu[:, j].copy()  # mu is the cached, read-only one
    c_all = _cov(s_docs.sum(axis=0))
    for c, z in zs.items():
        r = _residual_corr(c_all, ix, iy, z)  # (head, ny)
        wald = cluster_wald(s_docs, ix, iy, z, kind=test, ci=ci)
        for k, y in enumerate(ys):
            columns[_name("r", y, c)] = r[:, k]
            columns[_name("r2", y, c)] = r[:, k] ** 2
            columns[_name("slope", y, c)] = wald["beta"][k]
            columns[_name("slope_ci_low", y, c)] = wald["low"][k]
            columns[_name("slope_ci_high", y, c)] = wald["high"][k]
            columns[_name(f"p_doc_{test}", y, c)] = wald["p"][k]
            columns[_name(f"q_doc_{test}", y, c)] = fdr(wald["p"][k])
            columns[_name("p_token", y, c)] = _t_pvalue(r[:, k], n_tok, n_covariates=len(z))
    # The document bootstrap: resampled moments are counts @ per-document moments. Only the
    # variables the correlations use, ordered [x, ys, controls].
    control_vars = list(dict.fromkeys(j for z in zs.values() for j in z))
    order = [ix, *iy, *control_vars]
    keep = [0, *(j + 1 for j in order)]
    counts = _bootstrap_counts(moments.n_documents, n_boot, seed)
    local_z = {c: [order.index(j) for j in z] for c, z in zs.items()}
    boot = _bootstrap_partial_r(s_docs, keep, counts, len(iy), local_z, chunk=boot_chunk)
    enough = g >= 2
    for c in zs:
        low, high = _quantiles(boot[c], (0.5 - ci / 2, 0.5 + ci / 2))
        for k, y in enumerate(ys):
            columns[_name("r_ci_low", y, c)] = np.where(enough, low[:, k], np.nan)
            columns[_name("r_ci_high", y, c)] = np.where(enough, high[:, k], np.nan)
    out = pd.DataFrame(columns)
    _warn_undefined(out, [_name("r", y, "") for y in ys])
    return out


VERDICT_RULE = (
    "g = the analytic causal gain (mean of −Var_p(s) over the head's tokens, the entropy change "
    "per unit ln α when the head's query is scaled); [lo, hi] = the document-clustered interval "
    "of the observational slope dH/d ln‖q‖ given log position. 'agrees': lo ≤ g ≤ hi and hi < 0 "
    "(a negative slope, as large as a pure temperature predicts); 'stronger than temperature': "
    "hi < g; 'weaker than temperature': g < lo and hi < 0; 'opposite sign': lo > 0 (entropy rises "
    "with ‖q‖ although scaling q lowers it); 'no norm effect seen': lo ≤ 0 ≤ hi and g outside "
    "[lo, hi]; 'inconclusive': lo ≤ 0 ≤ hi and g inside [lo, hi]."
)
VERDICTS = ("agrees", "stronger than temperature", "weaker than temperature", "opposite sign",
            "no norm effect seen", "inconclusive")


def verdict(slope_low, slope_high, gain) -> np.ndarray:
    """The per-head verdict in words from the slope interval and the causal gain (`VERDICT_RULE`)."""
    lo, hi, g = (np.asarray(a, dtype=float) for a in (slope_low, slope_high, gain))
    out = np.full(lo.shape, "undefined", dtype=object)
    covers_zero = (lo <= 0) & (hi >= 0)
    covers_g = (lo <= g) & (g <= hi)
    out[(hi < 0) & covers_g] = "agrees"
    out[hi < g] = "stronger than temperature"
    out[(g < lo) & (hi < 0)] = "weaker than temperature"
    out[lo > 0] = "opposite sign"
    out[covers_zero & ~covers_g] = "no norm effect seen"
    out[covers_zero & covers_g] = "inconclusive"
    return out


def agreement(moments: DocumentMoments, *, control: str = "pos", test: str = "cr2",
              ci: float = 0.95, finite_difference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per head: the observational slope dH/d ln‖q‖ against the causal gain on the same tokens.

    Columns: `layer`, `head`, `n_tokens`, `n_documents`; `obs_slope` (nats per unit ln‖q‖,
    given `control`; "" for none) with `obs_slope_ci_low/high` and `p_obs_slope_doc_{test}`
    (`cluster_wald`); `obs_slope_raw` (no control); `gain_analytic` = mean of the per-token
    local gain −Var_p(s) (dH/d ln α at α = 1 under query scaling) with a document-clustered
    t interval `gain_ci_low/high`; `ratio` = obs_slope / gain_analytic (1 for a pure
    temperature); `temperature_share` = gain² · Var(ln‖q‖) / Var(H), the share of the entropy
    variance a pure temperature effect of the observed norm variation would explain;
    `verdict` (`VERDICT_RULE`). With `finite_difference` (columns layer, head, gain_fd and
    others, e.g. gain_fd_ci_low/high, from real forward passes) its columns join, with
    `ratio_fd` = obs_slope / gain_fd.
    """
    for v in ("log_q_norm", "entropy", "local_gain"):
        moments.index(v)
    zs = [moments.index(v) for v in CONTROLS[control]]
    s_docs, mu = moments.augmented()
    ix, iy, ig = (moments.index(v) for v in ("log_q_norm", "entropy", "local_gain"))
    wald = cluster_wald(s_docs, ix, iy, zs, kind=test, ci=ci)
    raw = cluster_wald(s_docs, ix, iy, (), kind=test, ci=ci)
    gain, gain_low, gain_high = cluster_mean(s_docs, mu, ig, ci=ci)
    c = _cov(s_docs.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = wald["beta"] / gain
        share = gain**2 * c[:, ix, ix] / c[:, iy, iy]
    out = pd.DataFrame({
        "layer": moments.layers, "head": moments.heads,
        "n_tokens": wald["n_tokens"].astype(np.int64),
        "n_documents": wald["n_documents"].astype(np.int64),
        "obs_slope": wald["beta"], "obs_slope_ci_low": wald["low"],
        "obs_slope_ci_high": wald["high"], f"p_obs_slope_doc_{test}": wald["p"],
        "obs_slope_raw": raw["beta"],
        "gain_analytic": gain, "gain_ci_low": gain_low, "gain_ci_high": gain_high,
        "ratio": ratio, "temperature_share": share,
    })
    if finite_difference is not None:
        _require_columns(finite_difference, ("layer", "head", "gain_fd"), "finite_difference")
        keep = [col for col in finite_difference.columns
                if col in ("layer", "head") or col not in out.columns]
        out = out.merge(finite_difference[keep], on=["layer", "head"], how="left")
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ratio_fd"] = out["obs_slope"] / out["gain_fd"]
    out["verdict"] = verdict(out["obs_slope_ci_low"], out["obs_slope_ci_high"],
                             out["gain_analytic"])
    return out


def agreement_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Across heads and per layer: heads per verdict, medians, Spearman(obs slope, gain)."""
    def summarize(frame: pd.DataFrame) -> dict:
        row = {"n_heads": len(frame)}
        for v in VERDICTS:
            row[f"n_{v.replace(' ', '_')}"] = int((frame["verdict"] == v).sum())
        row["median_obs_slope"] = frame["obs_slope"].median()
        row["median_gain_analytic"] = frame["gain_analytic"].median()
        row["median_ratio"] = frame["ratio"].median()
        row["median_temperature_share"] = frame["temperature_share"].median()
        row["frac_obs_slope_negative"] = float((frame["obs_slope"] < 0).mean())
        if len(frame) >= 3:
            rho, p = stats.spearmanr(frame["obs_slope"], frame["gain_analytic"],
                                     nan_policy="omit")
        else:
            rho, p = np.nan, np.nan
        row["spearman_obs_slope_gain"] = float(rho)
        row["p_spearman_heads_independent"] = float(p)
        return row

    rows = [{"layer": "all", **summarize(table)}]
    for layer, frame in table.groupby("layer", sort=True):
        rows.append({"layer": str(layer), **summarize(frame)})
    return pd.DataFrame(rows)


def document_folds(documents, n_folds: int, seed: int) -> list[np.ndarray]:
    """Split document ids into `n_folds` disjoint random groups of near-equal size."""
    ids = np.random.default_rng(seed).permutation(np.asarray(documents))
    return [np.sort(f) for f in np.array_split(ids, n_folds) if f.size]


def fold_consistency(moments: DocumentMoments, *, y: str = "entropy", n_folds: int = 4,
                     alpha: float = 0.05, threshold: float = 0.8, seed: int = 0,
                     test: str = "cr2") -> pd.DataFrame:
    """Share of disjoint document folds whose slope of y on ln‖q‖ is significant (document-
    clustered test within the fold, p < alpha) with the sign of the pooled slope, per head.

    Columns: `layer`, `head`, `n_folds` (folds where the head's test is defined), `r_fold_{k}`,
    `p_fold_{k}_doc_{test}`, `frac_same_sign`, `frac_significant_same_sign`, and `consistent`
    = frac_significant_same_sign >= threshold with n_folds >= 2.
    """
    folds = document_folds(moments.documents, n_folds, seed)
    ix, iy = moments.index("log_q_norm"), moments.index(y)
    s_all, _ = moments.augmented()
    pooled = cluster_wald(s_all, ix, iy, (), kind=test)["beta"]
    out = {"layer": moments.layers, "head": moments.heads}
    signs, sigs = [], []
    for k, docs in enumerate(folds):
        sub = moments.select(documents=docs)
        s, _ = sub.augmented()
        with np.errstate(invalid="ignore", divide="ignore"):
            r = _corr(*_partial(_cov(s.sum(axis=0)), ix, iy, ()))
        w = cluster_wald(s, ix, iy, (), kind=test) if docs.size >= 2 else None
        p = w["p"] if w is not None else np.full(len(moments.layers), np.nan)
        out[f"r_fold_{k}"] = r
        out[f"p_fold_{k}_doc_{test}"] = p
        signs.append(np.where(np.isfinite(p), np.sign(r) == np.sign(pooled), np.nan))
        sigs.append(np.where(np.isfinite(p), (np.sign(r) == np.sign(pooled)) & (p < alpha),
                             np.nan))
    signs, sigs = np.array(signs), np.array(sigs)
    counted = np.isfinite(signs).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["n_folds"] = counted
        out["frac_same_sign"] = np.nansum(signs, axis=0) / counted
        out["frac_significant_same_sign"] = np.nansum(sigs, axis=0) / counted
    frame = pd.DataFrame(out)
    frame["consistent"] = (frame["frac_significant_same_sign"] >= threshold) & (counted >= 2)
    return frame


def document_replication(moments: DocumentMoments, *, y: str = "entropy", alpha: float = 0.05,
                         seed: int = 0, test: str = "cr2") -> pd.DataFrame:
    """Discovery on a random half of the documents, replication on the other half.

    `selected`: BH q < alpha (document-clustered test) in the discovery half; `replicated`:
    selected, and in the replication half the slope has the same sign with the one-sided
    p (same test) < alpha. Columns `r_discovery`, `q_discovery_doc_{test}`, `r_replication`,
    `p_replication_doc_{test}_one_sided`, `selected`, `replicated`.
    """
    if moments.n_documents < 4:
        raise SpectraError(f"replication needs >= 4 documents; got {moments.n_documents}")
    halves = document_folds(moments.documents, 2, seed)
    ix, iy = moments.index("log_q_norm"), moments.index(y)
    res = []
    for docs in halves:
        sub = moments.select(documents=docs)
        s, _ = sub.augmented()
        w = cluster_wald(s, ix, iy, (), kind=test)
        r = _corr(*_partial(_cov(s.sum(axis=0)), ix, iy, ()))
        res.append((r, w))
    (r_d, w_d), (r_r, w_r) = res
    q_d = fdr(w_d["p"])
    sign = np.sign(w_d["beta"])
    with np.errstate(invalid="ignore", divide="ignore"):
        t = w_r["beta"] / w_r["se"]
        p_one = stats.t.sf(sign * t, w_r["df"])
    selected = q_d < alpha
    frame = pd.DataFrame({
        "layer": moments.layers, "head": moments.heads, "r_discovery": r_d,
        f"q_discovery_doc_{test}": q_d, "r_replication": r_r,
        f"p_replication_doc_{test}_one_sided": p_one, "selected": selected,
    })
    frame["replicated"] = selected & (np.sign(w_r["beta"]) == sign) & (p_one < alpha)
    return frame


def pearson_from_moments(moments: DocumentMoments, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """(r, token-level two-sided p with n − 2 df) of x and y per head, from the moments.

    The token-level p treats tokens as independent (the original project's test); it is not
    calibrated when tokens cluster by document.
    """
    s, _ = moments.augmented()
    r = _corr(*_partial(_cov(s.sum(axis=0)), moments.index(x), moments.index(y), ()))
    return r, _t_pvalue(r, moments.n.sum(axis=0))
