"""Statistics from per-document moments: exactness against per-token formulas, merging,
calibration under a clustered null, and planted heads (temperature vs sink)."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from spectra_lens import stats
from spectra_lens.errors import SpectraError
from spectra_lens.stats import DocumentMoments

# --- helpers -------------------------------------------------------------------------------


def _clustered_null(rng, n_docs, n_heads, *, icc=0.5, mean_size=8):
    """x = ln‖q‖ and y = entropy, independent, each with a document effect (ICC `icc`);
    documents of unequal size (2 .. 2·mean_size − 1 tokens)."""
    sizes = rng.integers(2, 2 * mean_size, n_docs)
    t = sizes.max()
    valid = np.broadcast_to((np.arange(t)[None, :] < sizes[:, None])[:, None, :],
                            (n_docs, n_heads, t))
    values = (rng.normal(size=(n_docs, n_heads, 1, 2)) * np.sqrt(icc)
              + rng.normal(size=(n_docs, n_heads, t, 2)) * np.sqrt(1 - icc))
    return DocumentMoments.from_tokens(values, valid, np.arange(n_docs),
                                       layers=np.zeros(n_heads, int), heads=np.arange(n_heads),
                                       variables=("log_q_norm", "entropy"))


def _null_pvalues(n_docs, n_heads, seed):
    m = _clustered_null(np.random.default_rng(seed), n_docs, n_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the small-G warning
        out = stats.head_statistics(m, ys=["entropy"], controls={"": ()}, n_boot=2)
    return out["p_doc_cr2_logq_entropy"].to_numpy(), out["p_token_logq_entropy"].to_numpy()


def _binomial_upper(p0, n, z=3.5):
    return p0 + z * np.sqrt(p0 * (1 - p0) / n)


# --- calibration -----------------------------------------------------------------------------


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
    q = np.stack([stats.fdr(f) for f in p.reshape(n_families, per_family)])
    q_token = np.stack([stats.fdr(f) for f in p_token.reshape(n_families, per_family)])
    fwer = (q < 0.05).any(axis=1).mean()
    assert fwer <= _binomial_upper(0.05, n_families)
    assert (q_token < 0.05).any(axis=1).mean() > 0.3  # the token-level test fails it


def test_cr1_rejects_too_often_with_few_documents():
    """Why CR2 is the default: CR1 with t(G − 1) is anti-conservative at G = 16."""
    m = _clustered_null(np.random.default_rng(3), 16, 2000)
    s, _ = m.augmented()
    p1 = stats.cluster_wald(s, 0, 1, kind="cr1")["p"]
    p3 = stats.cluster_wald(s, 0, 1, kind="cr2")["p"]
    assert (p1 < 0.05).mean() > (p3 < 0.05).mean()
    assert (p1 < 0.05).mean() > _binomial_upper(0.05, 2000, z=2)


# --- exactness ----------------------------------------------------------------------------


def _records(rng, n_docs=9, n_seq_per_doc=2, seq_len=12, layers=(0, 1), heads=2):
    rows = []
    seq = 0
    for d in range(n_docs):
        for _ in range(n_seq_per_doc):
            for layer in layers:
                for h in range(heads):
                    pos = np.arange(seq_len)
                    z = rng.normal(size=seq_len) + 0.5 * rng.normal()
                    q = np.exp(1.0 + 0.3 * z + 0.1 * rng.normal(size=seq_len))
                    sink = 1 / (1 + np.exp(-(z + rng.normal(size=seq_len))))
                    ent = 2 - 0.4 * np.log(q) - sink + 0.2 * rng.normal(size=seq_len) + 0.1 * d
                    rows.append(pd.DataFrame({
                        "document": 100 + d, "sequence": seq, "position": pos, "layer": layer,
                        "head": h, "q_norm": q, "entropy": ent, "sink_mass": sink,
                        "max_attn": np.exp(-ent) + 0.05 * rng.normal(size=seq_len),
                        "local_gain": -0.3 + 0.05 * rng.normal(size=seq_len),
                    }))
            seq += 1
    return pd.concat(rows, ignore_index=True)


VARS = ("log_q_norm", "log_position", "sink_mass", "entropy", "max_attn", "local_gain")


def _reference(frame, y, controls, groups):
    """(r, slope, p CR1, p CR2) from `_reference_fit`."""
    f = _reference_fit(frame, y, controls, groups)
    return f["r"], f["beta"], f["p1"], f["p3"]


def _reference_fit(frame, y, controls, groups):
    """Per-token formulas: residual regression, explicit cluster sums, leave-one-out refits."""
    x = np.log(frame["q_norm"].to_numpy())
    yy = frame[y].to_numpy()
    cols = [np.ones_like(x), x]
    for c in controls:
        cols.append(np.log1p(frame["position"].to_numpy()) if c == "log_position"
                    else frame[c].to_numpy())
    X = np.column_stack(cols)
    beta, *_ = np.linalg.lstsq(X, yy, rcond=None)
    resid_y = yy - X[:, [0, *range(2, X.shape[1])]] @ np.linalg.lstsq(
        X[:, [0, *range(2, X.shape[1])]], yy, rcond=None)[0]
    resid_x = x - X[:, [0, *range(2, X.shape[1])]] @ np.linalg.lstsq(
        X[:, [0, *range(2, X.shape[1])]], x, rcond=None)[0]
    r = np.corrcoef(resid_x, resid_y)[0, 1]
    bread = np.linalg.inv(X.T @ X)
    e = yy - X @ beta
    ids = np.unique(groups)
    G, N, K = ids.size, len(x), X.shape[1]
    meat1 = np.zeros((K, K))
    meat2 = np.zeros((K, K))
    ell = np.zeros(K)
    ell[1] = 1.0
    columns = []
    hat = X @ bread @ X.T
    for g in ids:
        m = groups == g
        u = X[m].T @ e[m]
        meat1 += np.outer(u, u)
        w, q = np.linalg.eigh(np.eye(m.sum()) - hat[np.ix_(m, m)])
        a_g = q @ np.diag(w**-0.5) @ q.T  # (I − H_gg)^(−½)
        u2 = X[m].T @ a_g @ e[m]
        meat2 += np.outer(u2, u2)
        # Bell–McCaffrey: column g of (I − H)[:, g] A_g X_g B ℓ
        columns.append((np.eye(N)[:, m] - hat[:, m]) @ a_g @ X[m] @ bread @ ell)
    v1 = G / (G - 1) * (N - 1) / (N - K) * bread @ meat1 @ bread
    v2 = bread @ meat2 @ bread
    gtg = np.column_stack(columns).T @ np.column_stack(columns)
    df = np.trace(gtg) ** 2 / np.trace(gtg @ gtg)
    p1 = 2 * sps.t.sf(abs(beta[1]) / np.sqrt(v1[1, 1]), G - 1)
    p3 = 2 * sps.t.sf(abs(beta[1]) / np.sqrt(v2[1, 1]), df)
    return {"r": r, "beta": beta[1], "p1": p1, "p3": p3, "se1": np.sqrt(v1[1, 1]),
            "se3": np.sqrt(v2[1, 1]), "df3": df, "G": G}


def test_moments_path_equals_per_token_formulas_to_1e9():
    rng = np.random.default_rng(0)
    records = _records(rng)
    m = stats.moments_from_records(records, VARS, min_position=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out1 = stats.head_statistics(m, ys=["entropy", "max_attn"], n_boot=50, test="cr1")
        out3 = stats.head_statistics(m, ys=["entropy", "max_attn"], n_boot=50)
    kept = records[records["position"] >= 1]
    for i, (_, frame) in enumerate(kept.groupby(["layer", "head"], sort=True)):
        for y in ("entropy", "max_attn"):
            for name, controls in stats.CONTROLS.items():
                r, slope, p1, p3 = _reference(frame, y, controls, frame["document"].to_numpy())
                suffix = f"_given_{name}" if name else ""
                assert out3[f"r_logq_{y}{suffix}"][i] == pytest.approx(r, abs=1e-9)
                assert out3[f"slope_logq_{y}{suffix}"][i] == pytest.approx(slope, abs=1e-9)
                assert out1[f"p_doc_cr1_logq_{y}{suffix}"][i] == pytest.approx(p1, abs=1e-9)
                assert out3[f"p_doc_cr2_logq_{y}{suffix}"][i] == pytest.approx(p3, abs=1e-9)


def _mean_reference(values, groups, ci):
    """Mean with the CR1 cluster interval: se = √(G/(G−1) Σ_g (Σ_{t∈g} (v_t − v̄))²) / N, t(G − 1)."""
    ids = np.unique(groups)
    G, N, mean = ids.size, len(values), values.mean()
    sums = np.array([(values[groups == g] - mean).sum() for g in ids])
    half = sps.t.ppf(0.5 + ci / 2, G - 1) * np.sqrt(G / (G - 1) * (sums**2).sum()) / N
    return mean, mean - half, mean + half


@pytest.mark.parametrize("test,ci,control", [("cr2", 0.95, "pos"), ("cr1", 0.9, ""),
                                             ("cr2", 0.8, "pos_sink")])
def test_agreement_columns_equal_per_token_formulas(test, ci, control):
    """Every column of `agreement` per head from the tokens: the slope given the control with its
    clustered t interval and p, the raw slope, the mean local gain with its CR1 interval, the ratio,
    the temperature share, the verdict's inputs, and the finite-difference join."""
    records = _records(np.random.default_rng(0))
    m = stats.moments_from_records(records, VARS, min_position=1)
    fd = pd.DataFrame({"layer": [0, 1, 0], "head": [1, 0, 5], "gain_fd": [-0.25, -0.5, -9.0],
                       "gain_fd_ci_low": [-0.3, -0.6, -9.5], "obs_slope": [7.0, 7.0, 7.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = stats.agreement(m, control=control, test=test, ci=ci, finite_difference=fd)
    kept = records[records["position"] >= 1]
    controls = {"": (), "pos": ("log_position",), "pos_sink": ("log_position", "sink_mass")}[control]
    groups = list(kept.groupby(["layer", "head"], sort=True))
    assert len(table) == len(groups) == 4
    for i, ((layer, head), frame) in enumerate(groups):
        row = table.iloc[i]
        docs = frame["document"].to_numpy()
        assert (row["layer"], row["head"]) == (layer, head)
        assert row["n_tokens"] == len(frame) and row["n_documents"] == np.unique(docs).size
        f = _reference_fit(frame, "entropy", controls, docs)
        se, df = (f["se3"], f["df3"]) if test == "cr2" else (f["se1"], f["G"] - 1)
        half = sps.t.ppf(0.5 + ci / 2, df) * se
        assert row["obs_slope"] == pytest.approx(f["beta"], abs=1e-9)
        assert row["obs_slope_ci_low"] == pytest.approx(f["beta"] - half, abs=1e-9)
        assert row["obs_slope_ci_high"] == pytest.approx(f["beta"] + half, abs=1e-9)
        assert row[f"p_obs_slope_doc_{test}"] == pytest.approx(f["p3" if test == "cr2" else "p1"],
                                                               abs=1e-9)
        raw = _reference_fit(frame, "entropy", (), docs)
        assert row["obs_slope_raw"] == pytest.approx(raw["beta"], abs=1e-9)
        gain = frame["local_gain"].to_numpy()
        mean, low, high = _mean_reference(gain, docs, ci)
        assert [row["gain_analytic"], row["gain_ci_low"], row["gain_ci_high"]] == pytest.approx(
            [mean, low, high], abs=1e-9)
        assert row["ratio"] == pytest.approx(f["beta"] / mean, rel=1e-9)
        log_q, ent = np.log(frame["q_norm"].to_numpy()), frame["entropy"].to_numpy()
        assert row["temperature_share"] == pytest.approx(mean**2 * log_q.var() / ent.var(), rel=1e-9)
        assert row["verdict"] == stats.verdict([row["obs_slope_ci_low"]], [row["obs_slope_ci_high"]],
                                               [mean])[0]
        joined = fd[(fd["layer"] == layer) & (fd["head"] == head)]
        if len(joined):
            assert row["gain_fd"] == joined["gain_fd"].iloc[0]
            assert row["gain_fd_ci_low"] == joined["gain_fd_ci_low"].iloc[0]
            assert row["ratio_fd"] == pytest.approx(f["beta"] / joined["gain_fd"].iloc[0], rel=1e-12)
        else:
            assert np.isnan(row["gain_fd"]) and np.isnan(row["ratio_fd"])
    assert list(table.columns[-1:]) == ["verdict"] and "head" in table.columns
    assert table["n_tokens"].dtype == np.int64 and table["n_documents"].dtype == np.int64
    with pytest.raises(SpectraError, match="finite_difference lacks column"):
        stats.agreement(m, finite_difference=fd.drop(columns="gain_fd"))


def test_merging_shards_is_concatenation():
    rng = np.random.default_rng(1)
    records = _records(rng)
    whole = stats.moments_from_records(records, VARS)
    # Split by sequence, so that one document's sequences land in different parts.
    parts = [stats.moments_from_records(records[records["sequence"] % 3 == k], VARS)
             for k in range(3)]
    merged = DocumentMoments.concat(parts)
    np.testing.assert_array_equal(merged.documents, whole.documents)
    np.testing.assert_allclose(merged.n, whole.n)
    np.testing.assert_allclose(merged.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, atol=1e-9)


def test_save_and_load_round_trip(tmp_path):
    m = stats.moments_from_records(_records(np.random.default_rng(2)), VARS)
    m.save(tmp_path / "shard_00000.npz")
    back = DocumentMoments.load(tmp_path / "shard_00000.npz")
    assert back.variables == m.variables
    for name in ("documents", "layers", "heads", "n", "mean", "m2"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(SpectraError, match="unreadable"):
        DocumentMoments.load(tmp_path / "bad.npz")


def test_bootstrap_is_resampling_documents():
    """A resample's moments (counts × moments) equal the moments of the resampled tokens."""
    records = _records(np.random.default_rng(4), n_docs=5)
    m = stats.moments_from_records(records, VARS)
    s, _ = m.augmented()
    counts = np.array([2.0, 0.0, 1.0, 0.0, 2.0])
    picked = pd.concat([records[records["document"] == 100 + d].assign(document=1000 * k + d)
                        for d, c in enumerate(counts) for k in range(int(c))])
    direct = stats.moments_from_records(picked, VARS)
    sb = np.tensordot(counts, s, axes=1)
    sd, _ = direct.augmented()
    np.testing.assert_allclose(sb[..., 0, 0], sd.sum(axis=0)[..., 0, 0])
    np.testing.assert_allclose(stats._cov(sb), stats._cov(sd.sum(axis=0)), rtol=1e-10, atol=1e-9)


def test_few_documents_warn():
    m = _clustered_null(np.random.default_rng(5), 8, 3)
    with pytest.warns(RuntimeWarning, match="only 8 documents"):
        stats.head_statistics(m, ys=["entropy"], n_boot=5, controls={"": ()})


# --- planted heads ---------------------------------------------------------------------------


def _softmax_head(rng, n_docs, per_doc, n_keys, kind):
    """Tokens of one synthetic head with real softmax attention over `n_keys` keys.

    "temperature": s = ‖q‖ · u with a random direction part u; the norm varies by document
    and token, so entropy follows a temperature. "sink": the first key's logit follows a
    latent z, ‖q‖ falls with z, and the scores do not scale with ‖q‖ at all.
    """
    n = n_docs * per_doc
    doc = np.repeat(np.arange(n_docs), per_doc)
    u = rng.normal(size=(n, n_keys))
    if kind == "temperature":
        log_q = 0.4 + 0.25 * rng.normal(size=n_docs)[doc] + 0.15 * rng.normal(size=n)
        s = np.exp(log_q)[:, None] * u
    else:
        z = rng.normal(size=n_docs)[doc] + rng.normal(size=n)
        log_q = 0.4 - 0.3 * z + 0.1 * rng.normal(size=n)
        s = 0.5 * u
        s[:, 0] = 3.0 + 0.3 * z
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(p)).sum(axis=1)
    mean_s = (p * s).sum(axis=1, keepdims=True)
    gain = -(p * (s - mean_s) ** 2).sum(axis=1)
    pos = rng.integers(1, 128, n)
    return pd.DataFrame({"document": doc, "sequence": doc, "position": pos, "layer": 0,
                         "head": 0 if kind == "temperature" else 1, "q_norm": np.exp(log_q),
                         "entropy": entropy, "sink_mass": p[:, 0], "local_gain": gain})


def test_planted_temperature_head_agrees_and_sink_head_does_not():
    rng = np.random.default_rng(11)
    records = pd.concat([_softmax_head(rng, 64, 60, 24, "temperature"),
                         _softmax_head(rng, 64, 60, 24, "sink")], ignore_index=True)
    m = stats.moments_from_records(records, ("log_q_norm", "log_position", "sink_mass",
                                             "entropy", "local_gain"))
    summary = stats.head_statistics(m, ys=["entropy"], n_boot=200)
    table = stats.agreement(m)
    temp, sink = table.iloc[0], table.iloc[1]
    assert temp["verdict"] == "agrees"
    assert temp["ratio"] == pytest.approx(1.0, abs=0.1)
    assert temp["obs_slope_ci_low"] <= temp["gain_analytic"] <= temp["obs_slope_ci_high"]
    # The sink head: strong raw association that vanishes once sink mass is controlled.
    assert abs(summary["r_logq_entropy"][1]) > 0.5
    assert abs(summary["r_logq_entropy_given_pos_sink"][1]) < 0.12
    assert abs(summary["r_logq_entropy_given_pos_sink"][1]) < abs(summary["r_logq_entropy"][1]) / 5
    assert summary["q_doc_cr2_logq_entropy"][1] < 0.01
    assert sink["verdict"] != "agrees"
    assert sink["verdict"] == "opposite sign"


def test_ctrl_c_inside_the_npz_write_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    """A Ctrl-C while NumPy writes one array of the zip: zipfile's close in NumPy's clean-up
    raises ValueError ("open writing handle"), which hid the interrupt and turned an interrupted
    run into a crash. save() raises the KeyboardInterrupt and writes nothing."""
    import zipfile

    m = stats.moments_from_records(_records(np.random.default_rng(2)), VARS)
    close = zipfile._ZipWriteFile.close
    calls = []

    def interrupted_close(self):
        calls.append(1)
        if len(calls) == 2:  # the second array's handle: interrupted before it closes
            raise KeyboardInterrupt
        return close(self)

    monkeypatch.setattr(zipfile._ZipWriteFile, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        m.save(tmp_path / "shard_00000.npz")
    assert len(calls) >= 2 and list(tmp_path.iterdir()) == []
