"""The tests behind the agreement verdict: the joint CR2 variance of a slope and a mean from the
same documents (`slope_minus_mean`, `cluster_mean_cr2`) against explicit token-by-token
matrices, the two one-sided tests (`equivalence_p`) at their boundaries, monotonicity (more
noise never makes a head equivalent), and on simulated documents: more documents never make
"equivalent" easier when the truth is a 40% difference, and do when slope = gain.
"""

import numpy as np
import pytest
from scipy import stats as sps

from spectra_lens.errors import SpectraError
from spectra_lens.stats.decisions import agreement, equivalence_p, verdict
from spectra_lens.stats.inference import cluster_mean_cr2, cluster_wald, slope_minus_mean
from spectra_lens.stats.moments import DocumentMoments


def _tokens(rng, sizes, *, ratio=1.0, n_heads=1, doc_slope=0.1, noise=0.3):
    """Tokens of `n_heads` independent heads over documents of `sizes` tokens: x = ln‖q‖ rises
    with log position and shifts by document, local_gain = −1 + document + token noise, and
    entropy = ratio·(−1)·x + 0.5·log position + document shift + a per-document random slope
    + noise correlated with the gain's token noise. The true slope given log position is
    −ratio, the true mean gain −1. Returns (values [doc, head, pos, 4], valid)."""
    g, t = len(sizes), int(max(sizes))
    pos = np.log1p(np.arange(1, t + 1))[None, None, :]
    valid = np.broadcast_to((np.arange(t)[None, :] < np.asarray(sizes)[:, None])[:, None, :],
                            (g, n_heads, t))
    d = lambda s: rng.normal(size=(g, n_heads, 1)) * s  # noqa: E731
    e = lambda s: rng.normal(size=(g, n_heads, t)) * s  # noqa: E731
    x = 0.3 * pos + d(0.3) + e(0.3)
    f = e(0.3)
    gain = -1.0 + d(0.2) + f
    y = (-ratio + d(doc_slope)) * x + 0.5 * pos + d(0.2) + e(noise) + 0.5 * f
    values = np.stack(np.broadcast_arrays(x, pos + 0 * x, y, gain), axis=-1)
    return values, valid


def _moments(values, valid, *, variables=("log_q_norm", "log_position", "entropy", "local_gain")):
    n_heads = values.shape[1]
    return DocumentMoments.from_tokens(values, valid, np.arange(values.shape[0]),
                                       layers=np.zeros(n_heads, int), heads=np.arange(n_heads),
                                       variables=variables)


def _dense(x, pos, y, m, doc, a):
    """b − a·g, its CR2 standard error and Bell–McCaffrey df from N×N matrices: the adjusted
    scores ψ_g = s_gᵀ e with s_g = A_g X_g B ℓ (slope) and −a A^m_g 1_g / N (mean), Γ = Cᵀ Ω C
    with C the columns (I − H) s_g and Ω the pooled residual covariance of (y, m) per token."""
    n = len(x)
    X = np.column_stack([np.ones(n), x, pos])
    B = np.linalg.inv(X.T @ X)
    beta = B @ X.T @ y
    e, em = y - X @ beta, m - m.mean()
    H, Hm = X @ B @ X.T, np.full((n, n), 1.0 / n)
    cy, cm, psi = [], [], []
    for g in np.unique(doc):
        i = doc == g
        w, q = np.linalg.eigh(np.eye(i.sum()) - H[np.ix_(i, i)])
        A = q @ np.diag(w**-0.5) @ q.T
        w, q = np.linalg.eigh(np.eye(i.sum()) - Hm[np.ix_(i, i)])
        Am = q @ np.diag(w**-0.5) @ q.T
        sy, sm = np.zeros(n), np.zeros(n)
        sy[i] = A @ X[i] @ B[:, 1]
        sm[i] = -a * Am @ np.ones(i.sum()) / n
        cy.append((np.eye(n) - H) @ sy)
        cm.append((np.eye(n) - Hm) @ sm)
        psi.append(sy @ e + sm @ em)
    cy, cm = np.array(cy), np.array(cm)
    k = X.shape[1]
    gam = (e @ e / (n - k) * cy @ cy.T + em @ em / (n - 1) * cm @ cm.T
           + e @ em / (n - k) * (cy @ cm.T + cm @ cy.T))
    return beta[1] - a * m.mean(), np.sqrt(np.sum(np.square(psi))), (
        np.trace(gam) ** 2 / np.trace(gam @ gam))


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_variance_and_df_equal_the_token_matrices(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 12, 7)
    values, valid = _tokens(rng, sizes)
    m = _moments(values, valid)
    s, mu = m.augmented()
    tok = values[:, 0][valid[:, 0]]
    doc = np.repeat(np.arange(len(sizes)), sizes)
    scales = (0.0, 1.0, 0.8, 1.2, -0.5)
    out = slope_minus_mean(s, 0, 2, [1], 3, scales=scales, mu=mu)
    for j, a in enumerate(scales):
        est, se, df = _dense(tok[:, 0], tok[:, 1], tok[:, 2], tok[:, 3], doc, a)
        assert out["estimate"][j, 0] == pytest.approx(est, abs=1e-10)
        assert out["se"][j, 0] == pytest.approx(se, rel=1e-9)
        assert out["df"][j, 0] == pytest.approx(df, rel=1e-8)
    # a = 0 is the slope alone: cluster_wald's CR2 se and df
    w = cluster_wald(s, 0, 2, [1])
    assert out["se"][0, 0] == pytest.approx(w["se"][0], rel=1e-10)
    assert out["df"][0, 0] == pytest.approx(w["df"][0], rel=1e-10)
    # the pieces: se² of b − g = var b + var g − 2 cov
    assert out["se"][1, 0] ** 2 == pytest.approx(
        out["se_beta"][0] ** 2 + out["se_mean"][0] ** 2 - 2 * out["cov"][0], rel=1e-10)
    assert out["cov"][0] != pytest.approx(0.0, abs=1e-6)  # the two move together


def test_cr2_mean_has_g_minus_1_df_for_equal_documents_and_matches_the_tokens():
    rng = np.random.default_rng(2)
    values, valid = _tokens(rng, [6] * 9)
    m = _moments(values, valid)
    s, mu = m.augmented()
    mean, low, high, se, df = cluster_mean_cr2(s, mu, 3)
    assert df[0] == pytest.approx(8.0, rel=1e-10)
    tok = values[:, 0, :, 3]
    assert mean[0] == pytest.approx(tok.mean(), abs=1e-12)
    # equal sizes: ũ_g = u_g √(G/(G−1)), so se² = G/(G−1) Σ u_g² / N²
    u = (tok - tok.mean()).sum(axis=1)
    assert se[0] == pytest.approx(np.sqrt(9 / 8 * (u**2).sum()) / tok.size, rel=1e-10)
    assert high[0] - mean[0] == pytest.approx(sps.t.ppf(0.975, 8) * se[0], rel=1e-10)
    unequal = _moments(*_tokens(rng, [2, 3, 9, 20, 4, 6]))
    s, mu = unequal.augmented()
    assert cluster_mean_cr2(s, mu, 3)[4][0] < 5  # BM df below G − 1 for unequal documents


# --------------------------------------------------------------------------- TOST


def test_tost_one_sided_p_at_the_critical_value_is_alpha():
    """g < 0: t_lower = −(b − 0.8 g)/se_l, t_upper = −(b − 1.2 g)/se_u. At t = the 95% t
    quantile each one-sided p is exactly 0.05 (not < alpha)."""
    df = 12.0
    crit = sps.t.ppf(0.95, df)
    g = -1.0
    # b − 0.8 g = −crit·se (se 1) and b − 1.2 g = +crit·se (se 2): both p = 0.05
    out = equivalence_p(-crit, 1.0, df, 2 * crit, 2.0, df, g)
    assert out["p_lower"] == pytest.approx(0.05, rel=1e-12)
    assert out["p_upper"] == pytest.approx(0.05, rel=1e-12)
    assert out["p"] == pytest.approx(0.05, rel=1e-12)
    # the larger of the two one-sided p decides
    out = equivalence_p(-3 * crit, 1.0, df, 0.5 * crit, 1.0, df, g)
    assert out["p"] == out["p_upper"] > 0.05 > out["p_lower"]
    out = equivalence_p(-0.5 * crit, 1.0, df, 3 * crit, 1.0, df, g)
    assert out["p"] == out["p_lower"] > 0.05 > out["p_upper"]
    # the sign of g orients both tests: g > 0 mirrors
    mirrored = equivalence_p(crit, 1.0, df, -2 * crit, 2.0, df, -g)
    assert mirrored["p"] == pytest.approx(0.05, rel=1e-12)
    # g = 0 or a NaN: no test
    assert np.isnan(equivalence_p(-1.0, 1.0, df, 1.0, 1.0, df, 0.0)["p"])
    assert np.isnan(equivalence_p(np.nan, 1.0, df, 1.0, 1.0, df, g)["p"])


def test_tost_of_a_ratio_outside_the_margin_is_never_below_one_half():
    """b/g outside (0.8, 1.2): one contrast points outward, so its one-sided p is >= 0.5."""
    g = -1.0
    for b in (-0.79, -0.5, 0.3, -1.21, -3.0):
        out = equivalence_p(b - 0.8 * g, 1e-6, 50, b - 1.2 * g, 1e-6, 50, g)
        assert out["p"] >= 0.5


@pytest.mark.parametrize("seed", range(3))
def test_more_noise_never_makes_a_head_equivalent(seed):
    """Widening the interval (larger standard errors, fewer degrees of freedom) can only raise
    the TOST p where it is below one half, and never moves it from >= alpha to < alpha."""
    rng = np.random.default_rng(seed)
    n = 20000
    g = -np.exp(rng.normal(size=n))
    b = g * rng.uniform(0.5, 1.5, n)
    se_l, se_u = np.exp(rng.normal(-2, 1, n)), np.exp(rng.normal(-2, 1, n))
    df = rng.uniform(2, 60, n)
    widen = np.exp(rng.uniform(0, 2, n))
    fewer = df * rng.uniform(0.1, 1.0, n)
    before = equivalence_p(b - 0.8 * g, se_l, df, b - 1.2 * g, se_u, df, g)["p"]
    wider = equivalence_p(b - 0.8 * g, widen * se_l, df, b - 1.2 * g, widen * se_u, df, g)["p"]
    heavier = equivalence_p(b - 0.8 * g, se_l, fewer, b - 1.2 * g, se_u, fewer, g)["p"]
    small = before < 0.5
    assert (wider[small] >= before[small] - 1e-15).all()
    assert (heavier[small] >= before[small] - 1e-15).all()
    for after in (wider, heavier):
        assert not ((after < 0.05) & (before >= 0.05)).any()
        v_before, _ = verdict(before, np.ones(n), b, g, b - 1, b + 1)
        v_after, _ = verdict(after, np.ones(n), b, g, b - 1, b + 1)
        became = (v_after == "equivalent to a temperature") & (v_before != v_after)
        assert not became.any()
    assert 0.05 < (before < 0.05).mean() < 0.95  # the grid holds both verdicts


def test_more_noise_in_the_documents_never_makes_a_head_equivalent():
    """The same heads with more token and document noise in the entropy: the estimates move,
    but no head that was not equivalent becomes equivalent on balance; the count falls."""
    rng = np.random.default_rng(4)
    sizes = rng.integers(20, 60, 64)
    values, valid = _tokens(rng, sizes, ratio=1.0, n_heads=300)
    noisy = values.copy()
    noisy[..., 2] += rng.normal(size=noisy.shape[:3]) * 1.5 + rng.normal(size=(64, 300, 1))
    quiet = agreement(_moments(values, valid))
    loud = agreement(_moments(noisy, valid))
    n_quiet = (quiet["verdict"] == "equivalent to a temperature").sum()
    n_loud = (loud["verdict"] == "equivalent to a temperature").sum()
    assert n_quiet > 200 and n_loud < n_quiet / 2
    assert (loud["difference_se"] > quiet["difference_se"]).all()


# --------------------------------------------------------------------------- simulation


def _rates(ratio, n_docs, *, n_heads=400, seed=0):
    rng = np.random.default_rng(seed + 1000 * n_docs)
    sizes = rng.integers(20, 61, n_docs)
    table = agreement(_moments(*_tokens(rng, sizes, ratio=ratio, n_heads=n_heads)))
    return {"equivalent": (table["verdict"] == "equivalent to a temperature").mean(),
            "differs": (table["verdict"] == "differs").mean(),
            "p_difference": table["p_difference_doc_cr2"].to_numpy()}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_more_documents_never_make_equivalence_easier_for_a_40_percent_difference():
    """Truth: slope = 0.6 · gain. "equivalent" stays at or below the test's level at every
    number of documents and does not grow with them; "differs" grows with them. Truth: slope =
    gain: "equivalent" grows with documents, and b = g is rejected at its level."""
    docs = (8, 16, 32, 64)
    far = [_rates(0.6, g) for g in docs]
    same = [_rates(1.0, g) for g in docs]
    se = np.sqrt(0.05 * 0.95 / 400)
    eq_far = [r["equivalent"] for r in far]
    assert max(eq_far) <= 0.05 + 3 * se, eq_far
    assert all(later <= earlier + 3 * se for earlier, later in zip(eq_far, eq_far[1:])), eq_far
    diff_far = [r["differs"] for r in far]
    assert diff_far == sorted(diff_far) and diff_far[-1] > 0.9, diff_far
    eq_same = [r["equivalent"] for r in same]
    assert eq_same == sorted(eq_same) and eq_same[-1] > 0.8 and eq_same[0] < 0.5, eq_same
    for r in same:  # calibration of the test of b = g (CR2 + Bell–McCaffrey df)
        assert (r["p_difference"] < 0.05).mean() <= 0.05 + 3 * se


def test_agreement_refuses_a_margin_outside_0_1():
    m = _moments(*_tokens(np.random.default_rng(0), [5] * 4))
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(SpectraError, match="equivalence margin must lie strictly between"):
            agreement(m, margin=bad)
    wide = agreement(m, margin=0.9)
    narrow = agreement(m, margin=0.05)
    assert wide["p_equivalence"][0] <= narrow["p_equivalence"][0]
    assert wide["equivalence_margin"][0] == 0.9
