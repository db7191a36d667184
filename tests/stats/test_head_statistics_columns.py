"""`head_statistics` column by column against the tokens: counts, means, r², the percentile
interval of r over document resamples, the token t-test's degrees of freedom, the interval
level passed to the clustered test, and the input checks (each names what it checks)."""

import warnings

import numpy as np
import pytest
from scipy import stats as sps

from spectra_lens.errors import SpectraError
from spectra_lens.stats.decisions import head_statistics
from spectra_lens.stats.inference import _bootstrap_counts, cluster_wald
from spectra_lens.stats.moments import DocumentMoments

VARS = ("log_q_norm", "entropy", "log_position")
CONTROLS = {"": (), "pos": ("log_position",)}
G, H, P = 6, 3, 40


def _tokens(seed=0):
    """values [document, head, pos, var] with entropy = −0.5 ln‖q‖ + position + document noise;
    head 1 has a single valid token in document 0, head 2 tokens in documents 0 and 1 only."""
    rng = np.random.default_rng(seed)
    logq = rng.normal(size=(G, H, P)) + rng.normal(size=(G, 1, 1))
    pos = np.broadcast_to(np.log1p(np.arange(P, dtype=float)), (G, H, P))
    ent = -0.5 * logq + 0.3 * pos + rng.normal(size=(G, H, P)) + rng.normal(size=(G, 1, 1))
    values = np.stack([logq, ent, pos], axis=-1)
    valid = np.ones((G, H, P), dtype=bool)
    valid[0, 1, 1:] = False
    valid[2:, 2] = False
    return values, valid


def _moments(values, valid):
    return DocumentMoments.from_tokens(values, valid, np.arange(len(values)), layers=np.zeros(H, int),
                                       heads=np.arange(H), variables=VARS)


def _stats(m, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # few documents: expected here
        return head_statistics(m, ys=["entropy"], controls=CONTROLS, **kw)


def _r(x, y, w):
    """Pearson r of x and y with token weights w (a resample's document counts)."""
    mx, my = np.average(x, weights=w), np.average(y, weights=w)
    cov = np.average((x - mx) * (y - my), weights=w)
    return cov / np.sqrt(np.average((x - mx) ** 2, weights=w) * np.average((y - my) ** 2, weights=w))


def test_counts_means_and_r_squared_follow_the_tokens():
    values, valid = _tokens()
    out = _stats(_moments(values, valid), n_boot=50)
    np.testing.assert_array_equal(out["n_tokens"], valid.sum(axis=(0, 2)))
    assert out["n_tokens"].dtype == np.int64 and out["n_documents"].dtype == np.int64
    # a document with one token of a head is a cluster of that head
    np.testing.assert_array_equal(out["n_documents"], [G, G, 2])
    for h in range(H):
        np.testing.assert_allclose(out["mean_entropy"][h], values[:, h, :, 1][valid[:, h]].mean(), rtol=1e-12)
    np.testing.assert_allclose(out["r2_logq_entropy"], out["r_logq_entropy"] ** 2, rtol=1e-12)
    np.testing.assert_allclose(out["r2_logq_entropy_given_pos"], out["r_logq_entropy_given_pos"] ** 2,
                               rtol=1e-12)


def test_the_interval_of_r_is_the_percentile_interval_over_document_resamples():
    values, valid = _tokens()
    ci = 0.9
    out = _stats(_moments(values, valid), ci=ci)  # the defaults: 1000 resamples, seed 0
    counts = _bootstrap_counts(G, 1000, 0)
    for h in range(H):
        docs = np.repeat(np.arange(G), P).reshape(G, P)
        keep = valid[:, h]
        x, y, d = values[:, h, :, 0][keep], values[:, h, :, 1][keep], docs[keep]
        rs = []
        for c in counts:
            w = c[d]
            rs.append(_r(x, y, w) if (w > 0).sum() > 2 else np.nan)
        rs = np.asarray(rs)
        rs = rs[np.isfinite(rs)]
        lo, hi = np.quantile(rs, [0.5 - ci / 2, 0.5 + ci / 2])
        # a head seen in only 2 documents still has an interval (2 clusters are enough)
        assert out["r_ci_low_logq_entropy"][h] == pytest.approx(lo, abs=1e-9), h
        assert out["r_ci_high_logq_entropy"][h] == pytest.approx(hi, abs=1e-9), h
    given = out[["r_ci_low_logq_entropy_given_pos", "r_ci_high_logq_entropy_given_pos"]].to_numpy()
    assert np.isfinite(given).all() and (given[:, 0] < given[:, 1]).all()
    assert not np.allclose(given, out[["r_ci_low_logq_entropy", "r_ci_high_logq_entropy"]].to_numpy())


def test_the_slope_interval_has_the_level_asked_for_and_the_token_test_counts_its_covariates():
    values, valid = _tokens()
    m = _moments(values, valid)
    s_docs, _ = m.augmented()
    for ci in (0.9, 0.99):
        out = _stats(m, n_boot=20, ci=ci)
        for c, z in (("", []), ("pos", [2])):
            w = cluster_wald(s_docs, 0, [1], z, kind="cr2", ci=ci)
            name = "logq_entropy" + (f"_given_{c}" if c else "")
            np.testing.assert_allclose(out[f"slope_ci_low_{name}"], w["low"][0], rtol=1e-12)
            np.testing.assert_allclose(out[f"slope_ci_high_{name}"], w["high"][0], rtol=1e-12)
    n = valid.sum(axis=(0, 2))
    for c, k in (("", 0), ("pos", 1)):
        name = "logq_entropy" + (f"_given_{c}" if c else "")
        r = out[f"r_{name}"].to_numpy()
        df = n - 2 - k
        want = 2 * sps.t.sf(np.abs(r * np.sqrt(df / (1 - r**2))), df)
        np.testing.assert_allclose(out[f"p_token_{name}"], want, rtol=1e-10)


def test_defaults_and_the_chunking_of_the_resamples():
    values, valid = _tokens()
    m = _moments(values, valid)
    default = _stats(m)
    assert default.equals(_stats(m, n_boot=1000, seed=0, ci=0.95, test="cr2"))
    assert default.equals(_stats(m, boot_chunk=7))  # the chunks of resamples change nothing
    assert not default.equals(_stats(m, seed=1))


def test_bad_input_is_named():
    values, valid = _tokens()
    m = _moments(values, valid)
    assert len(_stats(m, n_boot=1)) == H  # one resample is allowed
    for kw, words in (({"n_boot": 0}, "n_boot must be >= 1"), ({"ci": 1.5}, "^ci must lie"), ({"alpha": 0.0}, "^alpha must lie")):
        with pytest.raises(SpectraError, match=words):
            _stats(m, **kw)
    two = _moments(values[:2], valid[:2])
    assert (_stats(two, n_boot=20)["n_documents"] == 2).all()  # two documents are enough
    with pytest.raises(SpectraError, match="need >= 2 documents; got 1"):
        _stats(_moments(values[:1], valid[:1]))


def test_the_few_documents_warning_starts_below_small_g():
    from spectra_lens.stats.decisions import SMALL_G

    rng = np.random.default_rng(1)
    for g, warned in ((SMALL_G, False), (SMALL_G - 1, True)):
        values = rng.normal(size=(g, 1, 8, 3))
        m = DocumentMoments.from_tokens(values, np.ones((g, 1, 8), dtype=bool), np.arange(g),
                                        layers=np.zeros(1, int), heads=np.zeros(1, int), variables=VARS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            head_statistics(m, ys=["entropy"], controls=CONTROLS, n_boot=10)
        assert any("document-clustered p-values are approximate" in str(w.message) for w in caught) == warned
