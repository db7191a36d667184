"""The per-head tables and decision rules of `spectra_lens.stats.decisions`.

Each clause of each decision rule is tested at its boundary. Planted-vs-null data pass and fail
every clause at once, so they cannot tell whether a clause is there. Here each test builds
documents where exactly one clause decides: the head passes every other clause by a wide margin
and sits on the boundary (or the wrong side) of the one under test. Removing or loosening that
clause flips the test's decision. Ties at a threshold are made exactly by passing the threshold
equal to a value the function itself reported.

Token values are built with known correlations (`_pair`). The agreement table is checked
column by column against per-token formulas, and planted softmax heads get their verdicts.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from document_records import VARS, clustered_null, records, reference_fit
from scipy import stats as sps

from spectra_lens.errors import SpectraError
from spectra_lens.stats.decisions import (
    VERDICT_RULE,
    VERDICTS,
    agreement,
    document_folds,
    document_replication,
    fold_consistency,
    head_statistics,
    verdict,
)
from spectra_lens.stats.inference import cluster_wald
from spectra_lens.stats.moments import DocumentMoments, moments_from_records


def _pair(n: int, r: float, seed: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of n points with correlation r: exactly r in the sample when `exact`, else r in
    the population (clustered tests need sampling noise between documents)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    e = rng.standard_normal(n)
    if exact:
        x = (x - x.mean()) / x.std()
        e -= e.mean()
        e -= (e @ x) / (x @ x) * x
        e /= e.std()
    return x, r * x + np.sqrt(1 - r * r) * e


def _row(frame: pd.DataFrame, layer: int, head: int) -> pd.Series:
    rows = frame[(frame["layer"] == layer) & (frame["head"] == head)]
    assert len(rows) == 1
    return rows.iloc[0]


# --------------------------------------------------------------------------- verdict
# VERDICT_RULE on the slope interval [lo, hi] and the causal gain g, at each boundary.


@pytest.mark.parametrize("lo,hi,g,want", [
    (-3.0, -1.0, -2.0, "agrees"),
    (-3.0, -1.0, -3.0, "agrees"),                     # g == lo: inside (lo <= g)
    (-3.0, -1.0, -1.0, "agrees"),                     # g == hi: inside (g <= hi)
    (-3.0, -1.0, -0.5, "stronger than temperature"),  # hi < g
    (-3.0, -1.0, -4.0, "weaker than temperature"),    # g < lo, hi < 0
    (-3.0, 0.0, -4.0, "no norm effect seen"),         # hi == 0: the interval holds 0
    (-3.0, 0.0, -2.0, "inconclusive"),                # hi == 0 and g inside
    (1.0, 3.0, -2.0, "opposite sign"),                # lo > 0
    (0.0, 3.0, -2.0, "no norm effect seen"),          # lo == 0: the interval holds 0
    (0.0, 3.0, 0.0, "inconclusive"),                  # lo == 0 == g
    (-1.0, 1.0, -0.5, "inconclusive"),
    (-1.0, 1.0, -2.0, "no norm effect seen"),
    (np.nan, np.nan, -1.0, "undefined"),
    (-3.0, -1.0, np.nan, "undefined"),
])
def test_verdict_at_each_boundary(lo, hi, g, want):
    assert verdict([lo], [hi], [g])[0] == want


def test_every_verdict_is_reachable_and_named_in_the_rule():
    cases = [(-3, -1, -2), (-3, -1, -0.5), (-3, -1, -4), (1, 3, -2), (-1, 1, -2), (-1, 1, -0.5)]
    got = verdict(*(np.array(c, dtype=float) for c in zip(*cases)))
    assert tuple(got) == VERDICTS
    assert all(f"'{v}'" in VERDICT_RULE for v in VERDICTS)


# --------------------------------------------------------------------------- moments rules
# fold_consistency: consistent = share of folds (with a defined test) whose slope has the pooled
# sign and p < alpha >= threshold, with >= 2 such folds. document_replication: selected = BH q
# < alpha in the discovery half; replicated = selected, same sign, one-sided p < alpha in the
# replication half.

DOCS = 30


def _doc_moments(spec: dict, *, seed: int = 0, n: int = 30) -> DocumentMoments:
    """spec: {(layer, head): {document: r}} -> moments of n tokens per (document, head), with
    ln q_norm ~ N(0, 1) and entropy = 2 + r ln q_norm + noise (population correlation r).
    Head (9, 9) is present in every document, so that every spec has the same document ids
    (the folds are drawn from them)."""
    return moments_from_records(_doc_records(spec, seed=seed, n=n), ("log_q_norm", "entropy"))


def _doc_records(spec: dict, *, seed: int = 0, n: int = 30) -> pd.DataFrame:
    """The token records behind `_doc_moments`."""
    frames = []
    spec = {**spec, (9, 9): {d: 0.5 for d in range(DOCS)}}
    for k, (key, docs) in enumerate(spec.items()):
        for d, r in docs.items():
            x, y = _pair(n, r, seed + 1000 * k + d, exact=False)
            frames.append(pd.DataFrame({
                "document": d, "position": np.arange(1, n + 1), "layer": key[0], "head": key[1],
                "q_norm": np.exp(x), "entropy": 2 + y}))
    return pd.concat(frames, ignore_index=True)


def _by_fold(r_of_fold, folds):
    return {int(d): r_of_fold[k] for k, docs in enumerate(folds) for d in docs}


FOLDS = document_folds(np.arange(DOCS), 5, 0)


def _fold_row(spec, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = fold_consistency(_doc_moments(spec), n_folds=5, seed=0, **kwargs)
    return out


def test_fold_consistency_needs_two_folds_with_a_test():
    spec = {(0, 0): {int(d): 0.7 for d in FOLDS[0]},
            (0, 1): _by_fold([0.7] * 5, FOLDS)}
    out = _fold_row(spec)
    one = _row(out, 0, 0)
    assert one["n_folds"] == 1 and one["frac_significant_same_sign"] == 1.0
    assert not one["consistent"]
    assert _row(out, 0, 1)["consistent"]


def test_a_fold_without_a_defined_test_is_not_counted():
    """Fold 4 holds the head in one document only (no clustered test there), against the sign."""
    spec = {(0, 0): {**_by_fold([0.7, 0.7, 0.7, 0.7, None], FOLDS), int(FOLDS[4][0]): -0.9}}
    spec[(0, 0)] = {d: r for d, r in spec[(0, 0)].items() if r is not None}
    row = _row(_fold_row(spec, threshold=0.9), 0, 0)
    assert row["n_folds"] == 4 and np.isnan(row["p_fold_4_doc_cr2"])
    assert row["consistent"]


def test_significant_folds_of_the_opposite_sign_do_not_count():
    row = _row(_fold_row({(0, 0): _by_fold([0.7, 0.7, 0.7, -0.7, -0.7], FOLDS)}), 0, 0)
    assert row["n_folds"] == 5 and row["frac_significant_same_sign"] == pytest.approx(0.6)
    assert not row["consistent"]


def test_same_sign_folds_that_are_not_significant_do_not_count():
    row = _row(_fold_row({(0, 0): _by_fold([0.7, 0.7, 0.7, 0.1, 0.1], FOLDS)}), 0, 0)
    assert row["frac_same_sign"] == 1.0, "the weak folds keep the pooled sign"
    assert row["frac_significant_same_sign"] == pytest.approx(0.6)
    assert not row["consistent"]


def test_fold_share_equal_to_the_threshold_is_consistent():
    spec = {(0, 0): _by_fold([0.7, 0.7, 0.7, 0.7, 0.1], FOLDS),
            (0, 1): _by_fold([-0.7, -0.7, -0.7, -0.7, -0.1], FOLDS)}
    out = _fold_row(spec)
    for head in (0, 1):
        row = _row(out, 0, head)
        assert row["frac_significant_same_sign"] == 0.8 and row["consistent"], head


def test_fold_p_equal_to_alpha_is_not_significant():
    spec = {(0, 0): _by_fold([0.7, 0.7, 0.7, 0.7, 0.4], FOLDS)}
    first = _row(_fold_row(spec), 0, 0)
    p = first["p_fold_4_doc_cr2"]
    assert first["consistent"] and p < 0.05 and p > first["p_fold_0_doc_cr2"]
    row = _row(_fold_row(spec, alpha=p), 0, 0)
    assert row["frac_significant_same_sign"] == pytest.approx(0.8)
    assert not _row(_fold_row(spec, alpha=p, threshold=1.0), 0, 0)["consistent"]
    assert _row(_fold_row(spec, threshold=1.0), 0, 0)["consistent"]


def test_fold_consistency_defaults_and_its_columns_against_the_tokens():
    """Defaults: 4 folds, seed 0, alpha 0.05, threshold 0.8, the CR2 test. Each fold's r is the
    Pearson r of that fold's tokens; with test="cr1" each fold's p is the CR1 test on the fold."""
    from scipy.stats import t as student_t

    spec = {(0, 0): _by_fold([0.3, 0.2, 0.3, 0.25, 0.3], FOLDS)}
    records = _doc_records(spec)
    moments = moments_from_records(records, ("log_q_norm", "entropy"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        default = fold_consistency(moments)
        explicit = fold_consistency(moments, n_folds=4, alpha=0.05, threshold=0.8, seed=0,
                                    test="cr2")
        seed1 = fold_consistency(moments, seed=1)
        cr1 = fold_consistency(moments, test="cr1")
    pd.testing.assert_frame_equal(default, explicit)
    assert [c for c in default.columns if c.startswith("r_fold_")] == [f"r_fold_{k}" for k in range(4)]
    assert not np.allclose(default["r_fold_0"], seed1["r_fold_0"])
    head = records[(records["layer"] == 0) & (records["head"] == 0)]
    for k, docs in enumerate(document_folds(moments.documents, 4, 0)):
        fold = head[head["document"].isin(docs)]
        want = np.corrcoef(np.log(fold["q_norm"]), fold["entropy"])[0, 1]
        assert _row(cr1, 0, 0)[f"r_fold_{k}"] == pytest.approx(want, abs=1e-9)
        w1 = cluster_wald(moments.select(documents=docs, heads=[0]).augmented()[0], 0, 1, kind="cr1")
        w2 = cluster_wald(moments.select(documents=docs, heads=[0]).augmented()[0], 0, 1)
        assert _row(cr1, 0, 0)[f"p_fold_{k}_doc_cr1"] == pytest.approx(w1["p"][0], rel=1e-9)
        assert _row(default, 0, 0)[f"p_fold_{k}_doc_cr2"] == pytest.approx(w2["p"][0], rel=1e-9)
        assert w1["p"][0] != pytest.approx(w2["p"][0], rel=1e-3)
        assert 2 * student_t.sf(abs(w1["beta"][0] / w1["se"][0]), w1["df"][0]) == pytest.approx(
            w1["p"][0], rel=1e-9)


def test_a_fold_of_two_documents_is_tested_and_two_such_folds_suffice():
    """Six documents in four folds: two folds of two documents (a defined test), two of one
    (none). With threshold 0 a head is consistent exactly when two folds count."""
    moments = _doc_moments({(0, 0): _plain_r(0.7)})
    six = moments.select(documents=moments.documents[:6])
    folds = document_folds(six.documents, 4, 0)
    assert sorted(f.size for f in folds) == [1, 1, 2, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = fold_consistency(six, n_folds=4, threshold=0.0)
    row = _row(out, 0, 0)
    for k, docs in enumerate(folds):
        p = row[f"p_fold_{k}_doc_cr2"]
        assert np.isfinite(p) == (docs.size == 2), (k, docs)
        if docs.size == 2:
            w = cluster_wald(six.select(documents=docs, heads=[0]).augmented()[0], 0, 1)
            assert p == pytest.approx(w["p"][0], rel=1e-9)
    assert row["n_folds"] == 2 and row["consistent"]


def _plain_r(r):
    return {d: r for d in range(DOCS)}


HALVES = document_folds(np.arange(DOCS), 2, 0)


def _halves(r_discovery, r_replication):
    return {**{int(d): r_discovery for d in HALVES[0]}, **{int(d): r_replication for d in HALVES[1]}}


def _replicate(spec, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return document_replication(_doc_moments(spec), seed=0, **kwargs)


def test_document_replication_needs_selection_in_the_discovery_half():
    out = _replicate({(0, 0): _halves(0.05, 0.7), (0, 1): _halves(0.7, 0.7)})
    row = _row(out, 0, 0)
    assert not row["selected"] and row["p_replication_doc_cr2_one_sided"] < 1e-6
    assert not row["replicated"]
    assert _row(out, 0, 1)["replicated"]


def test_document_selection_uses_the_bh_q_not_the_raw_p():
    """alpha between the discovery p and q of a head: selected only if BH is applied."""
    spec = {(0, h): _halves(r, 0.7) for h, r in enumerate((0.12, 0.0, 0.0, 0.0, 0.0))}
    moments = _doc_moments(spec)
    half = moments.select(documents=HALVES[0])
    p = cluster_wald(half.augmented()[0], 0, 1)["p"][0]
    q = _replicate(spec)["q_discovery_doc_cr2"].iloc[0]
    assert p < q
    row = _row(_replicate(spec, alpha=(p + q) / 2), 0, 0)
    assert not row["selected"] and not row["replicated"]


def test_document_replication_with_the_opposite_sign_is_not_replicated():
    out = _replicate({(0, 0): _halves(0.7, -0.7), (0, 1): _halves(0.7, 0.7)})
    row = _row(out, 0, 0)
    assert row["selected"] and row["r_replication"] < 0
    assert not row["replicated"]


def test_document_replication_p_equal_to_alpha_is_not_replicated():
    spec = {(0, 0): _halves(0.7, 0.2)}
    first = _row(_replicate(spec), 0, 0)
    p = first["p_replication_doc_cr2_one_sided"]
    assert first["replicated"] and first["q_discovery_doc_cr2"] < p
    row = _row(_replicate(spec, alpha=p), 0, 0)
    assert row["selected"] and not row["replicated"]


def test_a_head_in_one_document_half_only_is_not_replicated():
    spec = {(0, 0): {int(d): 0.7 for d in HALVES[0]},
            (0, 1): {int(d): 0.7 for d in HALVES[1]},
            (0, 2): _halves(0.7, 0.7)}
    out = _replicate(spec)
    assert _row(out, 0, 0)["selected"] and not _row(out, 0, 0)["replicated"]
    assert not _row(out, 0, 1)["selected"] and not _row(out, 0, 1)["replicated"]
    assert _row(out, 0, 2)["replicated"]


def test_document_replication_p_is_one_sided_toward_the_discovery_sign():
    """p_replication = P(T > t) for a positive discovery slope, T ~ t(df) of the replication
    half's clustered test: half the two-sided p, so alpha between the two replicates."""
    from scipy.stats import t as student_t

    spec = {(0, 0): _halves(0.7, 0.2)}
    half = _doc_moments(spec).select(documents=HALVES[1], heads=[0])
    w = cluster_wald(half.augmented()[0], 0, 1)
    one_sided = student_t.sf(w["beta"][0] / w["se"][0], w["df"][0])
    row = _row(_replicate(spec), 0, 0)
    assert row["r_discovery"] > 0
    assert row["p_replication_doc_cr2_one_sided"] == pytest.approx(one_sided, rel=1e-9)
    assert _row(_replicate(spec, alpha=1.5 * one_sided), 0, 0)["replicated"]


def test_document_replication_needs_four_documents_and_works_with_four():
    moments = _doc_moments({(0, 0): _halves(0.7, 0.7)})
    four = moments.select(documents=moments.documents[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = document_replication(four)
        assert len(out) == 2 and set(out["layer"]) == {0, 9}
        with pytest.raises(SpectraError, match="replication needs >= 4 documents; got 3"):
            document_replication(moments.select(documents=moments.documents[:3]))


def test_document_replication_defaults_to_seed_0_and_the_cr2_test():
    spec = {(0, 0): _halves(0.7, 0.3), (0, 1): _halves(0.3, 0.3)}
    moments = _doc_moments(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        default = document_replication(moments)
        other_seed = document_replication(moments, seed=1)
        cr1 = document_replication(moments, seed=0, test="cr1")
    pd.testing.assert_frame_equal(default, _replicate(spec))
    assert not np.allclose(default["r_discovery"], other_seed["r_discovery"])
    halves = [moments.select(documents=h, heads=[0]) for h in HALVES]
    w1 = [cluster_wald(h.augmented()[0], 0, 1, kind="cr1") for h in halves]
    w2 = [cluster_wald(h.augmented()[0], 0, 1) for h in halves]
    from scipy.stats import t as student_t

    for frame, w, test in ((cr1, w1, "cr1"), (default, w2, "cr2")):
        row = _row(frame, 0, 0)
        want = student_t.sf(w[1]["beta"][0] / w[1]["se"][0], w[1]["df"][0])
        assert row[f"p_replication_doc_{test}_one_sided"] == pytest.approx(want, rel=1e-9)
    assert w1[1]["p"][0] != pytest.approx(w2[1]["p"][0], rel=1e-3), "the tests must differ"


def test_document_q_equal_to_alpha_is_not_selected():
    spec = {(0, h): _halves(r, 0.7) for h, r in enumerate((0.3, 0.0, 0.0))}
    q = _row(_replicate(spec), 0, 0)["q_discovery_doc_cr2"]
    assert q < 0.05 and _row(_replicate(spec), 0, 0)["selected"]
    row = _row(_replicate(spec, alpha=q), 0, 0)
    assert not row["selected"] and not row["replicated"]
    assert _row(_replicate(spec, alpha=np.nextafter(q, 1)), 0, 0)["replicated"]


# --------------------------------------------------------------------------- significant (EXP0)
# observational.analyze: significant[_given_c] = q_doc_cr2_logq_entropy[_given_c] < fdr_alpha,
# the Benjamini–Hochberg q over heads of the document-clustered CR2 test of the slope of
# entropy on ln‖q‖ (given the control set c).

OBS_VARIABLES = ("log_q_norm", "q_norm", "log_position", "sink_mass", "entropy", "max_attn",
                 "local_gain")


def _obs_moments(spec: dict, *, n: int = 30, seed: int = 0) -> DocumentMoments:
    """spec: {(layer, head): {document: (r, x_offset, y_offset)}} -> moments of n tokens per
    (document, head): ln q_norm = x_offset + x, entropy = 2 + y_offset + y, with r(x, y) = r
    exactly within the document; sink mass, max attention and local gain unrelated noise."""
    frames = []
    for k, (key, docs) in enumerate(spec.items()):
        for d, (r, dx, dy) in docs.items():
            x, y = _pair(n, r, seed + 1000 * k + d, exact=True)
            rng = np.random.default_rng(seed + 7919 * k + d)
            frames.append(pd.DataFrame({
                "document": d, "position": np.arange(1, n + 1), "layer": key[0], "head": key[1],
                "q_norm": np.exp(dx + x), "entropy": 2 + dy + y, "sink_mass": rng.random(n),
                "max_attn": rng.random(n), "local_gain": -rng.random(n)}))
    return moments_from_records(pd.concat(frames, ignore_index=True), OBS_VARIABLES)


def _analyze(moments, **cfg):
    from spectra_lens.experiments.observational import analyze

    from spectra_lens.config import ObservationalConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return analyze(moments, ObservationalConfig(n_boot=20, **cfg))["head_summary"]


def _plain(r: float, docs=range(DOCS)) -> dict:
    return {d: (r, 0.0, 0.0) for d in docs}


def test_small_token_p_with_a_document_interval_across_zero_is_not_significant():
    """Head (0, 0): x and y have large document offsets whose correlation over 8 documents is
    0.5 and none within documents. Treating tokens as independent gives a tiny p; the
    document-clustered interval of the slope crosses 0 and the head is not significant."""
    a, b = _pair(8, 0.5, 5, exact=True)
    spec = {(0, 0): {d: (0.0, 3 * a[d], 3 * b[d]) for d in range(8)},
            (0, 1): {d: (0.8, 0.0, 0.0) for d in range(8)}}
    row = _row(_analyze(_obs_moments(spec)), 0, 0)
    assert row["p_token_logq_entropy"] < 1e-6
    assert row["slope_ci_low_logq_entropy"] < 0 < row["slope_ci_high_logq_entropy"]
    assert row["q_doc_cr2_logq_entropy"] > 0.05 and not row["significant"]
    assert _row(_analyze(_obs_moments(spec)), 0, 1)["significant"]


def _varying(hi: float, lo: float) -> dict:
    """r = hi in odd documents and lo in even ones: a positive slope that varies by document, so
    that its document-clustered p is moderate (exact r in every document would make it ~0)."""
    return {d: (hi if d % 2 else lo, 0.0, 0.0) for d in range(DOCS)}


def test_significance_uses_the_bh_q_of_the_clustered_test_not_its_raw_p():
    spec = {(0, 0): _varying(0.35, -0.15), **{(0, h): _plain(0.0) for h in range(1, 5)}}
    first = _row(_analyze(_obs_moments(spec)), 0, 0)
    p, q = first["p_doc_cr2_logq_entropy"], first["q_doc_cr2_logq_entropy"]
    assert p < 0.05 < q < 1
    assert not first["significant"]
    row = _row(_analyze(_obs_moments(spec), fdr_alpha=(p + q) / 2), 0, 0)
    assert not row["significant"]
    assert _row(_analyze(_obs_moments(spec), fdr_alpha=np.nextafter(q, 1)), 0, 0)["significant"]


def test_q_equal_to_fdr_alpha_is_not_significant():
    spec = {(0, 0): _varying(0.35, -0.15), (0, 1): _plain(0.0)}
    q = _row(_analyze(_obs_moments(spec)), 0, 0)["q_doc_cr2_logq_entropy"]
    assert 0 < q < 1
    assert not _row(_analyze(_obs_moments(spec), fdr_alpha=q), 0, 0)["significant"]
    assert _row(_analyze(_obs_moments(spec), fdr_alpha=np.nextafter(q, 1)), 0, 0)["significant"]


def test_a_head_in_one_document_has_no_test_and_is_not_significant():
    spec = {(0, 0): {0: (0.95, 0.0, 0.0)}, (0, 1): _plain(0.8)}
    summary = _analyze(_obs_moments(spec))
    one = _row(summary, 0, 0)
    assert one["n_documents"] == 1 and np.isnan(one["q_doc_cr2_logq_entropy"])
    assert not one["significant"] and not one["significant_given_pos_sink"]
    assert _row(summary, 0, 1)["significant"]


def test_each_control_set_has_its_own_significance():
    """Head (0, 0): entropy follows the sink mass, and ln‖q‖ follows it too: the raw slope is
    significant, the slope given log position and sink mass is not. Each flag is its own q."""
    rng = np.random.default_rng(3)
    frames = []
    for d in range(DOCS):
        sink = rng.random(40)
        frames.append(pd.DataFrame({
            "document": d, "position": np.arange(1, 41), "layer": 0, "head": 0,
            "q_norm": np.exp(sink + 0.05 * rng.standard_normal(40)),
            "entropy": 2 - sink + 0.05 * rng.standard_normal(40), "sink_mass": sink,
            "max_attn": rng.random(40), "local_gain": -rng.random(40)}))
    moments = moments_from_records(pd.concat(frames, ignore_index=True), OBS_VARIABLES)
    summary = _analyze(moments)
    row = _row(summary, 0, 0)
    assert row["significant"] and row["significant_given_pos"]
    assert not row["significant_given_pos_sink"]
    for c in ("", "_given_pos", "_given_pos_sink"):
        q = row[f"q_doc_cr2_logq_entropy{c}"]
        assert bool(row["significant" + c]) == (q < 0.05)
        assert not _row(_analyze(moments, fdr_alpha=q), 0, 0)["significant" + c]


# --------------------------------------------------------------------------- agreement table


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
    tokens = records(np.random.default_rng(0))
    m = moments_from_records(tokens, VARS, min_position=1)
    fd = pd.DataFrame({"layer": [0, 1, 0], "head": [1, 0, 5], "gain_fd": [-0.25, -0.5, -9.0],
                       "gain_fd_ci_low": [-0.3, -0.6, -9.5], "obs_slope": [7.0, 7.0, 7.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = agreement(m, control=control, test=test, ci=ci, finite_difference=fd)
    kept = tokens[tokens["position"] >= 1]
    controls = {"": (), "pos": ("log_position",), "pos_sink": ("log_position", "sink_mass")}[control]
    groups = list(kept.groupby(["layer", "head"], sort=True))
    assert len(table) == len(groups) == 4
    for i, ((layer, head), frame) in enumerate(groups):
        row = table.iloc[i]
        docs = frame["document"].to_numpy()
        assert (row["layer"], row["head"]) == (layer, head)
        assert row["n_tokens"] == len(frame) and row["n_documents"] == np.unique(docs).size
        f = reference_fit(frame, "entropy", controls, docs)
        se, df = (f["se3"], f["df3"]) if test == "cr2" else (f["se1"], f["G"] - 1)
        half = sps.t.ppf(0.5 + ci / 2, df) * se
        assert row["obs_slope"] == pytest.approx(f["beta"], abs=1e-9)
        assert row["obs_slope_ci_low"] == pytest.approx(f["beta"] - half, abs=1e-9)
        assert row["obs_slope_ci_high"] == pytest.approx(f["beta"] + half, abs=1e-9)
        assert row[f"p_obs_slope_doc_{test}"] == pytest.approx(f["p3" if test == "cr2" else "p1"],
                                                               abs=1e-9)
        raw = reference_fit(frame, "entropy", (), docs)
        assert row["obs_slope_raw"] == pytest.approx(raw["beta"], abs=1e-9)
        gain = frame["local_gain"].to_numpy()
        mean, low, high = _mean_reference(gain, docs, ci)
        assert [row["gain_analytic"], row["gain_ci_low"], row["gain_ci_high"]] == pytest.approx(
            [mean, low, high], abs=1e-9)
        assert row["ratio"] == pytest.approx(f["beta"] / mean, rel=1e-9)
        log_q, ent = np.log(frame["q_norm"].to_numpy()), frame["entropy"].to_numpy()
        assert row["temperature_share"] == pytest.approx(mean**2 * log_q.var() / ent.var(), rel=1e-9)
        assert row["verdict"] == verdict([row["obs_slope_ci_low"]], [row["obs_slope_ci_high"]],
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
        agreement(m, finite_difference=fd.drop(columns="gain_fd"))


# --------------------------------------------------------------------------- head_statistics


def test_few_documents_warn():
    m = clustered_null(np.random.default_rng(5), 8, 3)
    with pytest.warns(RuntimeWarning, match="only 8 documents"):
        head_statistics(m, ys=["entropy"], n_boot=5, controls={"": ()})


def test_a_constant_metric_gives_nan_and_warns():
    m = clustered_null(np.random.default_rng(6), 40, 2)
    s = m.m2.copy()
    s[:, 1, 1, :] = s[:, 1, :, 1] = 0.0  # head 1: entropy constant within every document
    mean = m.mean.copy()
    mean[:, 1, 1] = 2.0  # and across documents
    flat = DocumentMoments(m.documents, m.layers, m.heads, m.variables, m.n, mean, s)
    with pytest.warns(RuntimeWarning, match="r_logq_entropy is NaN for 1 head"):
        out = head_statistics(flat, ys=["entropy"], n_boot=5, controls={"": ()})
    assert np.isnan(out["r_logq_entropy"][1]) and np.isfinite(out["r_logq_entropy"][0])


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
    tokens = pd.concat([_softmax_head(rng, 64, 60, 24, "temperature"),
                        _softmax_head(rng, 64, 60, 24, "sink")], ignore_index=True)
    m = moments_from_records(tokens, ("log_q_norm", "log_position", "sink_mass", "entropy",
                                      "local_gain"))
    summary = head_statistics(m, ys=["entropy"], n_boot=200)
    table = agreement(m)
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
