import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from spectra_lens.errors import SpectraError
from spectra_lens.stats import (
    LogSlopeFit,
    Moments,
    fdr,
    fit_log_slope,
    fit_log_slopes,
    head_correlations,
    layer_statistics,
    partial_correlation,
    replication,
    shard_consistency,
)


def _frame(sequence, position, log_q, entropy, *, layer=0, head=0, n_shards=4, rng=None):
    """Per-token records of one head from ln q_norm and entropy; other metrics are noise."""
    rng = np.random.default_rng(0) if rng is None else rng
    n = len(sequence)
    with np.errstate(divide="ignore"):
        entropy_norm = np.where(position > 0, entropy / np.log(position + 1.0), np.nan)
    return pd.DataFrame(
        {
            "shard": sequence % n_shards,
            "sequence": sequence,
            "position": position,
            "layer": layer,
            "head": head,
            "q_norm": np.exp(log_q),
            "k_norm": 1.0,
            "entropy": entropy,
            "entropy_norm": entropy_norm,
            "max_attn": np.round(rng.random(n), 1),  # rounded: Spearman must handle ties
            "k_eff_exp": rng.random(n) * 10,
        }
    )


def make_records(
    slopes, *, n_sequences=32, seq_len=33, n_shards=4, cluster=0.5, heads_per_layer=4, seed=0
):
    """Heads with ln q = 1 + 0.3 w, entropy = 2 + slope ln q + 0.3 w', w = √c u_seq + √(1−c) e."""
    rng = np.random.default_rng(seed)
    position = np.tile(np.arange(seq_len), n_sequences)
    sequence = np.repeat(np.arange(n_sequences), seq_len)
    n = position.size

    def clustered():
        per_sequence = rng.normal(size=n_sequences)[sequence]
        return np.sqrt(cluster) * per_sequence + np.sqrt(1 - cluster) * rng.normal(size=n)

    frames = []
    for code, slope in enumerate(slopes):
        log_q = 1 + 0.3 * clustered()
        entropy = 2 + slope * log_q + 0.3 * clustered()
        layer, head = divmod(code, heads_per_layer)
        frames.append(
            _frame(
                sequence, position, log_q, entropy,
                layer=layer, head=head, n_shards=n_shards, rng=rng,
            )
        )
    return pd.concat(frames, ignore_index=True)


def _correlated(n_sequences, seq_len, *, r, cluster, seed):
    """Tokens with corr(x, y) = r, a share `cluster` of each variance shared within a sequence."""
    rng = np.random.default_rng(seed)
    cov = [[1, r], [r, 1]]
    sequence = np.repeat(np.arange(n_sequences), seq_len)
    per_sequence = rng.multivariate_normal([0, 0], cov, size=n_sequences)[sequence]
    per_token = rng.multivariate_normal([0, 0], cov, size=sequence.size)
    xy = np.sqrt(cluster) * per_sequence + np.sqrt(1 - cluster) * per_token
    position = np.tile(np.arange(1, seq_len + 1), n_sequences)
    return _frame(sequence, position, xy[:, 0], xy[:, 1], rng=rng)


# --- Moments -------------------------------------------------------------------------------


def test_moments_pearson_equals_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200) + 100  # a large mean: the raw sums must still give r
    y = 0.3 * x + rng.normal(size=200)
    r = Moments.from_arrays(x, y).pearson()
    assert r == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-9)


def test_moments_merge_equals_pooled():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2, 300))
    y = y - 0.4 * x
    pieces = [Moments.from_arrays(x[a:b], y[a:b]) for a, b in [(0, 50), (50, 170), (170, 300)]]
    pooled = Moments.from_arrays(x, y)
    merged = pieces[0].merge(*pieces[1:])
    assert merged.pearson() == pytest.approx(pooled.pearson(), rel=1e-12)
    assert (pieces[0] + pieces[1] + pieces[2]).pearson() == pytest.approx(pooled.pearson())
    assert merged.n == 300
    assert merged.pearson() == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-12)


def test_moments_from_groups_and_sum_over_axis():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2, 120))
    groups = rng.integers(0, 6, size=120)
    by_group = Moments.from_groups(x, y, groups, 6)
    for g in range(6):
        alone = Moments.from_arrays(x[groups == g], y[groups == g])
        assert by_group.pearson()[g] == pytest.approx(alone.pearson(), rel=1e-12)
    grid = by_group._map(lambda a: a.reshape(2, 3))
    assert grid.sum(axis=1).n.tolist() == [np.sum(groups < 3), np.sum(groups >= 3)]
    assert grid.sum().pearson() == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-12)


def test_resampled_moments_equal_moments_of_the_resampled_data():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(2, 60))
    unit = np.repeat(np.arange(6), 10)
    by_unit = Moments.from_groups(x, y, unit, 6)._map(lambda a: a[None, :])  # one group
    counts = np.array([[2, 0, 1, 0, 3, 0], [1, 1, 1, 1, 1, 1]], dtype=float)
    replicates = by_unit.resample(counts).pearson()[0]
    for row, got in zip(counts, replicates):
        units = np.repeat(np.arange(6), row.astype(int))
        drawn = np.concatenate([np.flatnonzero(unit == u) for u in units])
        assert got == pytest.approx(stats.pearsonr(x[drawn], y[drawn]).statistic, rel=1e-10)


def test_moments_constant_input_gives_nan():
    r = Moments.from_arrays(np.ones(5), np.arange(5.0)).pearson()
    assert np.isnan(r)


# --- fdr, partial correlation --------------------------------------------------------------


def test_fdr_equals_scipy_and_leaves_nan_out():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.5, 0.001])
    assert np.allclose(fdr(p), stats.false_discovery_control(p))
    with_nan = np.array([0.01, np.nan, 0.04, 0.03, 0.2, np.nan, 0.5, 0.001])
    q = fdr(with_nan)
    assert np.isnan(q[[1, 5]]).all()
    assert np.allclose(q[~np.isnan(with_nan)], stats.false_discovery_control(p))
    assert np.isnan(fdr([np.nan, np.nan])).all()
    with pytest.raises(SpectraError, match=r"\[0, 1\]"):
        fdr([0.5, 1.5])


def test_partial_correlation_equals_residual_correlation():
    rng = np.random.default_rng(4)
    z = rng.normal(size=80)
    x = 2 * z + rng.normal(size=80)
    y = -z + 0.5 * x + rng.normal(size=80)
    res_x = x - np.polyval(np.polyfit(z, x, 1), z)
    res_y = y - np.polyval(np.polyfit(z, y, 1), z)
    expected = np.corrcoef(res_x, res_y)[0, 1]
    r, p = partial_correlation(x, y, z)
    assert r == pytest.approx(expected, rel=1e-9)
    t = expected * np.sqrt((80 - 3) / (1 - expected**2))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), 80 - 3), rel=1e-6)
    # Two covariates: one more degree of freedom used.
    r2, p2 = partial_correlation(x, y, np.column_stack([z, z**2]))
    assert -1 <= r2 <= 1 and 0 <= p2 <= 1


# --- head_correlations ---------------------------------------------------------------------


def test_head_correlations_equal_scipy_per_head():
    records = make_records([-0.5, 0.0, 0.3], n_sequences=12, seq_len=20)
    summary = head_correlations(records, n_boot=50)
    assert summary[["layer", "head"]].values.tolist() == [[0, 0], [0, 1], [0, 2]]
    for row in summary.itertuples():
        head = records[(records["head"] == row.head) & (records["position"] >= 1)]
        x = np.log(head["q_norm"])
        for y in ("entropy", "max_attn", "k_eff_exp"):
            pearson = stats.pearsonr(x, head[y])
            spearman = stats.spearmanr(x, head[y])
            partial = partial_correlation(x, head[y], np.log1p(head["position"]))
            got = summary.loc[row.Index]
            assert got[f"r_{y}"] == pytest.approx(pearson.statistic, rel=1e-9)
            assert got[f"p_{y}"] == pytest.approx(pearson.pvalue, rel=1e-6)
            assert got[f"rho_{y}"] == pytest.approx(spearman.statistic, rel=1e-9)
            assert got[f"p_rho_{y}"] == pytest.approx(spearman.pvalue, rel=1e-6)
            assert got[f"partial_r_{y}"] == pytest.approx(partial[0], rel=1e-8)
            assert got[f"partial_p_{y}"] == pytest.approx(partial[1], rel=1e-6)
        norm = stats.pearsonr(x, head["entropy_norm"])
        assert row.r_entropy_norm == pytest.approx(norm.statistic, rel=1e-9)
        assert row.n_tokens == len(head) and row.n_sequences == 12
        assert row.mean_entropy == pytest.approx(head["entropy"].mean())
        assert row.mean_q_norm == pytest.approx(head["q_norm"].mean())
    assert (summary["correlation"] == summary["r_entropy"]).all()
    assert (summary["p_value"] == summary["p_entropy"]).all()
    assert np.allclose(summary["q_entropy"], stats.false_discovery_control(summary["p_entropy"]))


def test_nan_metrics_drop_out_pairwise():
    records = make_records([-0.5], n_sequences=8, seq_len=12)
    records.loc[records["position"] == 3, "max_attn"] = np.nan
    summary = head_correlations(records, min_position=0, n_boot=20)
    assert summary["n_tokens"].iloc[0] == 8 * 12
    kept = records[records["position"] != 3]
    expected = stats.pearsonr(np.log(kept["q_norm"]), kept["max_attn"]).statistic
    assert summary["r_max_attn"].iloc[0] == pytest.approx(expected, rel=1e-9)
    seen = records[records["position"] >= 1]  # entropy_norm is NaN at position 0
    expected = stats.pearsonr(np.log(seen["q_norm"]), seen["entropy_norm"]).statistic
    assert summary["r_entropy_norm"].iloc[0] == pytest.approx(expected, rel=1e-9)


def test_head_correlations_columns():
    summary = head_correlations(make_records([-0.5], n_sequences=6, seq_len=10), n_boot=20)
    per_y = [
        "r_{}", "p_{}", "q_{}", "p_{}_cluster", "q_{}_cluster", "rho_{}", "p_rho_{}", "q_rho_{}", "partial_r_{}",
        "partial_p_{}", "partial_q_{}", "partial_p_{}_cluster", "partial_q_{}_cluster",
        "partial_r_{}_ci_low", "partial_r_{}_ci_high", "r_{}_ci_low", "r_{}_ci_high",
    ]
    expected = [
        "layer", "head", "n_tokens", "n_sequences",
        "mean_q_norm", "mean_entropy", "mean_max_attn", "mean_k_eff_exp",
        *(c.format(y) for y in ("entropy", "max_attn", "k_eff_exp") for c in per_y),
        "r_entropy_norm", "p_entropy_norm", "q_entropy_norm",
        "correlation", "p_value", "significant", "significant_partial",
    ]
    assert list(summary.columns) == expected
    assert summary["significant"].dtype == bool


def test_planted_effect_is_strong_and_significant():
    records = make_records([-0.5] * 4, n_sequences=40, seq_len=33, cluster=0.5)
    summary = head_correlations(records, n_boot=300)
    assert (summary["r_entropy"] < -0.2).all()
    assert (summary["q_entropy"] < 1e-6).all()
    assert (summary["r_entropy_ci_high"] < 0).all()
    assert summary["significant"].all()


def test_null_heads_are_rarely_significant():
    records = make_records([0.0] * 200, n_sequences=60, seq_len=17, cluster=0.5, seed=5)
    summary = head_correlations(records, ys=("entropy",), n_boot=300)
    # BH on the clustering-aware p controls the FDR; with all heads null any discovery is
    # false, so the share flagged stays near zero (token-level q alone flags far more).
    assert summary["significant"].mean() <= 0.05
    assert (summary["q_entropy"] < 0.05).mean() > summary["significant"].mean()
    assert (summary["q_entropy"] < 0.05).mean() > 0.2  # what the bootstrap gate protects from


def test_position_confound_is_removed_by_partial_correlation():
    rng = np.random.default_rng(6)
    n_sequences, seq_len = 40, 64
    position = np.tile(np.arange(seq_len), n_sequences)
    sequence = np.repeat(np.arange(n_sequences), seq_len)
    depth = np.log1p(position)
    log_q = 0.5 * depth + 0.2 * rng.normal(size=position.size)
    entropy = 0.8 * depth + 0.3 * rng.normal(size=position.size)
    records = _frame(sequence, position, log_q, entropy, rng=rng)
    row = head_correlations(records, ys=("entropy",), n_boot=200).iloc[0]
    assert row["r_entropy"] > 0.5
    assert abs(row["partial_r_entropy"]) < 0.1
    assert row["partial_r_entropy_ci_low"] < 0 < row["partial_r_entropy_ci_high"]
    assert row["partial_p_entropy_cluster"] > 0.05


def test_bootstrap_ci_covers_true_r_and_widens_under_clustering():
    width = {}
    for cluster in (0.0, 0.8):
        records = _correlated(200, 40, r=0.5, cluster=cluster, seed=7)
        row = head_correlations(records, ys=("entropy",), n_boot=1000).iloc[0]
        assert row["r_entropy_ci_low"] < 0.5 < row["r_entropy_ci_high"]
        width[cluster] = row["r_entropy_ci_high"] - row["r_entropy_ci_low"]
    assert width[0.8] > 2 * width[0.0]


def test_bootstrap_is_reproducible_from_seed():
    records = make_records([-0.2, 0.1], n_sequences=10, seq_len=12)
    a = head_correlations(records, n_boot=100, seed=3)
    b = head_correlations(records, n_boot=100, seed=3)
    c = head_correlations(records, n_boot=100, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["r_entropy_ci_low"], c["r_entropy_ci_low"])


def test_constant_metric_gives_nan_and_warns():
    records = make_records([-0.5, -0.5], n_sequences=6, seq_len=10)
    records.loc[records["head"] == 1, "max_attn"] = 0.1
    with pytest.warns(RuntimeWarning, match="r_max_attn is NaN for 1 head"):
        summary = head_correlations(records, n_boot=20)
    assert np.isnan(summary["r_max_attn"].iloc[1]) and np.isfinite(summary["r_max_attn"].iloc[0])
    assert np.isnan(summary["q_max_attn"].iloc[1])


# --- consistency and replication -----------------------------------------------------------


def test_shard_consistency_planted_vs_null():
    records = make_records([-0.5] * 3 + [0.0] * 3, n_sequences=48, seq_len=17, cluster=0.2)
    table = shard_consistency(records)
    assert table["n_shards"].tolist() == [4] * 6
    planted, null = table.iloc[:3], table.iloc[3:]
    assert planted["consistent"].all()
    assert (planted["frac_same_sign"] == 1).all()
    assert not null["consistent"].any()
    assert [f"r_shard_{s}" for s in range(4)] == [c for c in table if c.startswith("r_shard_")]
    # The pooled r comes from merged shard moments: it equals r on all tokens.
    pooled = head_correlations(records, ys=("entropy",), n_boot=10)
    assert np.allclose(table["r_pooled"], pooled["r_entropy"], rtol=1e-10)


def test_replication_planted_vs_null():
    records = make_records([-0.5] * 3 + [0.0] * 3, n_sequences=48, seq_len=17, cluster=0.2)
    table = replication(records, n_boot=200)
    assert table["selected"].tolist() == [True] * 3 + [False] * 3
    assert table["replicated"].tolist() == [True] * 3 + [False] * 3
    assert (table["p_replication"].iloc[:3] < 1e-6).all()
    assert (table["n_tokens_discovery"] + table["n_tokens_replication"] == 48 * 16).all()


def test_replication_with_one_shard_splits_sequences():
    records = make_records([-0.5], n_sequences=20, seq_len=17, n_shards=1)
    table = replication(records, n_boot=100)
    assert table["n_tokens_discovery"].iloc[0] == table["n_tokens_replication"].iloc[0]
    assert table["replicated"].iloc[0]


# --- layer statistics and gain fits --------------------------------------------------------


def test_layer_statistics_by_hand():
    summary = pd.DataFrame(
        {
            "layer": [0, 0, 0, 1, 1],
            "head": [0, 1, 2, 0, 1],
            "correlation": [-0.6, 0.2, -0.1, 0.4, 0.4],
            "significant": [True, False, False, True, True],
        }
    )
    table = layer_statistics(summary).set_index("layer")
    assert table.loc[0, "n_heads"] == 3 and table.loc[1, "n_heads"] == 2
    assert table.loc[0, "mean_abs_r"] == pytest.approx(0.3)
    assert table.loc[0, "mean_r"] == pytest.approx(-0.5 / 3)
    assert table.loc[0, "std_r"] == pytest.approx(np.std([-0.6, 0.2, -0.1], ddof=1))
    assert table.loc[0, "min_r"] == -0.6 and table.loc[0, "max_r"] == 0.2
    assert table.loc[0, "frac_significant"] == pytest.approx(1 / 3)
    assert table.loc[1, "frac_significant"] == 1.0 and table.loc[1, "std_r"] == 0.0
    assert (table["mean_correlation"] == table["mean_r"]).all()
    assert (table["std_correlation"] == table["std_r"]).all()


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


def test_monotonic_tolerance():
    alphas = [0.5, 1.0, 2.0]
    assert fit_log_slope(alphas, [1.0, 0.5, 0.5 + 1e-9]).is_monotonic
    assert not fit_log_slope(alphas, [1.0, 0.5, 0.6]).is_monotonic
    assert fit_log_slope(alphas, [1.0, 0.5, 0.6], atol=0.2).is_monotonic


# --- bad input -----------------------------------------------------------------------------


def test_missing_column_is_named():
    records = make_records([-0.5], n_sequences=4, seq_len=8).drop(columns="entropy_norm")
    with pytest.raises(SpectraError, match=r"lacks column\(s\) \['entropy_norm'\]"):
        head_correlations(records, n_boot=10)


def test_empty_records():
    empty = make_records([-0.5], n_sequences=4, seq_len=8).iloc[:0]
    with pytest.raises(SpectraError, match="records is empty"):
        head_correlations(empty)


def test_too_few_tokens_for_a_head():
    records = make_records([-0.5, -0.5], n_sequences=4, seq_len=8)
    keep = (records["sequence"] == 0) & (records["position"] <= 2)
    records = records[(records["head"] == 0) | keep]
    with pytest.raises(SpectraError, match=r">= 4 tokens .* \(layer 0, head 1\)"):
        head_correlations(records, n_boot=10)


def test_no_tokens_after_min_position():
    records = make_records([-0.5], n_sequences=4, seq_len=8)
    with pytest.raises(SpectraError, match="no tokens at position >= min_position=8"):
        head_correlations(records, min_position=8)


def test_log_of_non_positive_norm():
    records = make_records([-0.5], n_sequences=4, seq_len=8)
    records.loc[5, "q_norm"] = 0.0
    with pytest.raises(SpectraError, match="log_x=True needs q_norm > 0"):
        head_correlations(records, n_boot=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head_correlations(records, log_x=False, n_boot=10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ci": 1.0}, "ci must lie strictly between 0 and 1"),
        ({"alpha": 0.0}, "alpha must lie"),
        ({"n_boot": 0}, "n_boot must be >= 1"),
        ({"ys": ()}, "ys must name at least one"),
    ],
)
def test_bad_options(kwargs, message):
    records = make_records([-0.5], n_sequences=4, seq_len=8)
    with pytest.raises(SpectraError, match=message):
        head_correlations(records, **kwargs)


@pytest.mark.parametrize(
    "alphas, values, message",
    [
        ([1.0], [1.0], ">= 2 entries"),
        ([0.0, 1.0], [1.0, 2.0], "must be > 0"),
        ([1.0, 1.0], [1.0, 2.0], "not all be equal"),
        ([0.5, 1.0], [1.0, 2.0, 3.0], "one entry per alpha"),
    ],
)
def test_bad_alphas(alphas, values, message):
    with pytest.raises(SpectraError, match=message):
        fit_log_slope(alphas, values)
