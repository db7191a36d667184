"""Inference from per-document moments: exactness against per-token formulas, calibration under
a clustered null, Benjamini–Hochberg FDR, and the one Pearson correlation."""

import warnings

import numpy as np
import pytest
from document_records import VARS, clustered_null, records, reference_fit
from scipy import stats as sps

from spectra_lens.errors import SpectraError
from spectra_lens.stats.decisions import CONTROLS, head_statistics
from spectra_lens.stats.inference import cluster_wald, fdr, pearson, pearson_from_moments
from spectra_lens.stats.moments import moments_from_records

# --- calibration -----------------------------------------------------------------------------


def _null_pvalues(n_docs, n_heads, seed):
    m = clustered_null(np.random.default_rng(seed), n_docs, n_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the small-G warning
        out = head_statistics(m, ys=["entropy"], controls={"": ()}, n_boot=2)
    return out["p_doc_cr2_logq_entropy"].to_numpy(), out["p_token_logq_entropy"].to_numpy()


def _binomial_upper(p0, n, z=3.5):
    return p0 + z * np.sqrt(p0 * (1 - p0) / n)


@pytest.mark.parametrize("n_docs", [16, 64, 256])
def test_document_clustered_p_is_uniform_under_a_clustered_null(n_docs):
    """Each head is one replication of a complete null with clustered tokens."""
    n_heads = 2000 if n_docs < 256 else 1000
    p, p_token = _null_pvalues(n_docs, n_heads, seed=n_docs)
    assert np.isfinite(p).all()
    assert sps.kstest(p, "uniform").pvalue > 1e-3
    assert (p < 0.05).mean() <= _binomial_upper(0.05, n_heads)
    assert (p < 0.05).mean() >= 0.05 - 3.5 * np.sqrt(0.05 * 0.95 / n_heads)
    # The token-level test treats tokens as independent: far from uniform on the same data.
    assert sps.kstest(p_token, "uniform").pvalue < 1e-6
    assert (p_token < 0.05).mean() > 0.15


def test_bh_over_heads_keeps_the_family_wise_rate_under_the_complete_null():
    """Under a complete null any BH discovery is a false one: P(≥ 1 discovery) ≤ 5%."""
    n_families, per_family = 400, 10
    p, p_token = _null_pvalues(32, n_families * per_family, seed=7)
    q = np.stack([fdr(f) for f in p.reshape(n_families, per_family)])
    q_token = np.stack([fdr(f) for f in p_token.reshape(n_families, per_family)])
    fwer = (q < 0.05).any(axis=1).mean()
    assert fwer <= _binomial_upper(0.05, n_families)
    assert (q_token < 0.05).any(axis=1).mean() > 0.3  # the token-level test fails it


def test_cr1_rejects_too_often_with_few_documents():
    """Why CR2 is the default: CR1 with t(G − 1) is anti-conservative at G = 16."""
    m = clustered_null(np.random.default_rng(3), 16, 2000)
    s, _ = m.augmented()
    p1 = cluster_wald(s, 0, 1, kind="cr1")["p"]
    p3 = cluster_wald(s, 0, 1, kind="cr2")["p"]
    assert (p1 < 0.05).mean() > (p3 < 0.05).mean()
    assert (p1 < 0.05).mean() > _binomial_upper(0.05, 2000, z=2)


# --- exactness ----------------------------------------------------------------------------


def test_moments_path_equals_per_token_formulas_to_1e9():
    rng = np.random.default_rng(0)
    tokens = records(rng)
    m = moments_from_records(tokens, VARS, min_position=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out1 = head_statistics(m, ys=["entropy", "max_attn"], n_boot=50, test="cr1")
        out3 = head_statistics(m, ys=["entropy", "max_attn"], n_boot=50)
    kept = tokens[tokens["position"] >= 1]
    for i, (_, frame) in enumerate(kept.groupby(["layer", "head"], sort=True)):
        for y in ("entropy", "max_attn"):
            for name, controls in CONTROLS.items():
                f = reference_fit(frame, y, controls, frame["document"].to_numpy())
                suffix = {"": "", "mediator_adjusted": "_mediator_adjusted"}.get(name, f"_given_{name}")
                assert out3[f"r_logq_{y}{suffix}"][i] == pytest.approx(f["r"], abs=1e-9)
                assert out3[f"slope_logq_{y}{suffix}"][i] == pytest.approx(f["beta"], abs=1e-9)
                assert out1[f"p_doc_cr1_logq_{y}{suffix}"][i] == pytest.approx(f["p1"], abs=1e-9)
                assert out3[f"p_doc_cr2_logq_{y}{suffix}"][i] == pytest.approx(f["p3"], abs=1e-9)


# --- fdr -----------------------------------------------------------------------------------


def test_fdr_equals_scipy_and_leaves_nan_out():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.5, 0.001])
    assert np.allclose(fdr(p), sps.false_discovery_control(p))
    with_nan = np.array([0.01, np.nan, 0.04, 0.03, 0.2, np.nan, 0.5, 0.001])
    q = fdr(with_nan)
    assert np.isnan(q[[1, 5]]).all()
    assert np.allclose(q[~np.isnan(with_nan)], sps.false_discovery_control(p))
    assert np.isnan(fdr([np.nan, np.nan])).all()
    with pytest.raises(SpectraError, match=r"\[0, 1\]"):
        fdr([0.5, 1.5])


# --- the one Pearson -------------------------------------------------------------------------


def _centred(x, y):
    dx, dy = x - x.mean(), y - y.mean()
    return (dx * dx).sum(), (dy * dy).sum(), (dx * dy).sum()


def test_pearson_equals_scipy_and_broadcasts():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200) + 100  # a large mean: centred products keep the digits
    y = 0.3 * x + rng.normal(size=200)
    assert pearson(*_centred(x, y)) == pytest.approx(sps.pearsonr(x, y).statistic, rel=1e-12)
    xs, ys = rng.normal(size=(2, 3, 50))
    cxx, cyy, cxy = (np.array(v) for v in zip(*(_centred(a, b) for a, b in zip(xs, ys))))
    got = pearson(cxx[:, None], cyy[:, None], cxy[:, None])  # (3, 1)
    assert got.shape == (3, 1)
    for k in range(3):
        assert got[k, 0] == pytest.approx(sps.pearsonr(xs[k], ys[k]).statistic, rel=1e-12)


def test_pearson_of_a_constant_is_nan_and_rounding_stays_in_range():
    assert np.isnan(pearson(*_centred(np.ones(5), np.arange(5.0))))
    assert np.isnan(pearson(0.0, 0.0, 0.0)) and np.isnan(pearson(-1e-18, 1.0, 0.0))
    assert pearson(1.0, 1.0, 1.0 + 1e-15) == 1.0  # |r| a hair above 1 is clipped
    assert pearson(4.0, 1.0, -2.0 - 1e-15) == -1.0


def test_pearson_from_moments_equals_scipy_per_head():
    """The original project's r of ‖q‖ (not its log) and its token-level p, per head."""
    tokens = records(np.random.default_rng(3))
    m = moments_from_records(tokens, ("q_norm", "entropy", "max_attn"), min_position=1)
    r, p = pearson_from_moments(m, "q_norm", "entropy")
    kept = tokens[tokens["position"] >= 1]
    for i, (_, frame) in enumerate(kept.groupby(["layer", "head"], sort=True)):
        want = sps.pearsonr(frame["q_norm"], frame["entropy"])
        assert r[i] == pytest.approx(want.statistic, rel=1e-9)
        assert p[i] == pytest.approx(want.pvalue, rel=1e-6)


def test_cluster_wald_defaults_are_cr2_at_95_percent_and_a_bad_kind_is_named():
    m = clustered_null(np.random.default_rng(5), 12, 4)
    s, _ = m.augmented()
    default = cluster_wald(s, 0, 1)
    cr2_95 = cluster_wald(s, 0, 1, kind="cr2", ci=0.95)
    assert default.keys() == cr2_95.keys()
    for key in default:
        np.testing.assert_array_equal(default[key], cr2_95[key])
    half = sps.t.ppf(0.975, default["df"]) * default["se"]
    assert np.isfinite(half).all()
    np.testing.assert_allclose(default["high"] - default["beta"], half, rtol=1e-10)
    np.testing.assert_allclose(default["beta"] - default["low"], half, rtol=1e-10)
    assert not np.allclose(cluster_wald(s, 0, 1, kind="cr1")["p"], default["p"])
    with pytest.raises(SpectraError, match=r"kind must be one of \('cr2', 'cr1'\); got 'hc1'"):
        cluster_wald(s, 0, 1, kind="hc1")


def test_a_document_with_one_token_counts_as_a_cluster():
    m = clustered_null(np.random.default_rng(6), 12, 3)
    s, _ = m.augmented()
    a = np.concatenate([[1.0], np.random.default_rng(7).standard_normal(s.shape[-1] - 1)])
    one = np.broadcast_to(np.outer(a, a), s.shape[1:])[None]  # its moments: one token per head
    got = cluster_wald(np.concatenate([s, one]), 0, 1, kind="cr1")
    np.testing.assert_array_equal(got["n_documents"], 13.0)
    np.testing.assert_array_equal(got["n_tokens"], s[:, :, 0, 0].sum(0) + 1)
    assert np.isfinite(got["p"]).all()
