"""Statistics of per-token attention records: correlation, partial correlation, the cluster
bootstrap over sequences, Benjamini–Hochberg FDR, consistency and replication across shards, and
fits of a metric against ln α.

Records are one row per (token, head) with columns `shard`, `sequence`, `position`, `layer`,
`head` and float metrics. Tokens of one sequence are not independent, so the sequence is the
resampling unit: token-level t-test p-values are reported (they treat tokens as independent and
are optimistic under clustering), and a head is called significant on a Wald test of Fisher's z
whose standard error comes from the sequence bootstrap, with BH across heads. Every correlation is built from `Moments`, sums that merge
exactly across shards.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import stats

from spectra_lens.errors import SpectraError

__all__ = [
    "LogSlopeFit",
    "Moments",
    "fdr",
    "fit_log_slope",
    "fit_log_slopes",
    "head_correlations",
    "layer_statistics",
    "partial_correlation",
    "replication",
    "shard_consistency",
    "t_interval",
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
