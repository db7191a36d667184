"""The document bootstrap of head_statistics forms only the sums a partial r needs and solves
the controls' small systems in closed form; it must equal the general path (every sum, a
batched solve) up to rounding, including where a control is constant."""

import warnings

import numpy as np
import pytest

from spectra_lens.stats import decisions, inference
from spectra_lens.stats.moments import DocumentMoments

VARS = ("log_q_norm", "entropy", "max_attn", "k_eff_exp", "log_position", "sink_mass", "local_gain")


def _moments(rng, n_docs=12, n_heads=5, n_tok=20, constant_control_head=None):
    values = rng.normal(size=(n_docs, n_heads, n_tok, len(VARS)))
    values[..., 1] += 0.4 * values[..., 0] + 0.3 * values[..., 4]  # entropy tied to x and pos
    values += rng.normal(size=(n_docs, n_heads, 1, len(VARS)))  # document effects
    if constant_control_head is not None:  # sink_mass exactly 0: a singular control
        values[:, constant_control_head, :, VARS.index("sink_mass")] = 0.0
    valid = rng.random(values.shape[:3]) > 0.1
    return DocumentMoments.from_tokens(values, valid, np.arange(n_docs) // 2 * 3,
                                       layers=np.zeros(n_heads, int), heads=np.arange(n_heads),
                                       variables=VARS)


def _both(m, controls, n_boot=120, chunk=50):
    ix = m.index("log_q_norm")
    iy = [m.index(v) for v in ("entropy", "max_attn", "k_eff_exp")]
    zs = {c: [m.index(v) for v in names] for c, names in controls.items()}
    ctrl = list(dict.fromkeys(j for z in zs.values() for j in z))
    order = [ix, *iy, *ctrl]
    keep = [0, *(j + 1 for j in order)]
    local_z = {c: [order.index(j) for j in z] for c, z in zs.items()}
    s_docs, _ = m.augmented()
    counts = inference._bootstrap_counts(m.n_documents, n_boot, 3)
    fast = inference._bootstrap_partial_r(s_docs, keep, counts, len(iy), local_z, chunk=chunk)
    full = inference._bootstrap_partial_r_full(s_docs, keep, counts, len(iy), local_z, chunk=chunk)
    return fast, full


CONTROL_SETS = {
    "": (),
    "pos": ("log_position",),
    "pos_sink": ("log_position", "sink_mass"),
    "three": ("log_position", "sink_mass", "local_gain"),
}


@pytest.mark.parametrize("chunk", [7, 50])
def test_fast_bootstrap_equals_the_full_matrix_path(chunk):
    m = _moments(np.random.default_rng(0))
    fast, full = _both(m, CONTROL_SETS, chunk=chunk)
    for c in CONTROL_SETS:
        assert fast[c].shape == full[c].shape == (120, 5, 3)
        assert np.isfinite(full[c]).all()
        np.testing.assert_allclose(fast[c], full[c], rtol=0, atol=1e-12, err_msg=c)


def test_constant_control_takes_the_general_path_and_matches_it(monkeypatch):
    m = _moments(np.random.default_rng(1), constant_control_head=2)
    calls = []
    general = inference._residual_corr
    monkeypatch.setattr(inference, "_residual_corr", lambda *a, **k: calls.append(1) or general(*a, **k))
    fast, full = _both(m, CONTROL_SETS)
    n_fast_general = len(calls) - 3 * len(CONTROL_SETS)  # the full path: 3 blocks × 4 sets
    assert n_fast_general == 3 * 2  # pos_sink and three, in every block
    for c in CONTROL_SETS:
        np.testing.assert_allclose(fast[c], full[c], rtol=0, atol=1e-12, equal_nan=True, err_msg=c)
    # The head with the constant control still has its r given position and sink mass
    # (the pseudo-inverse drops the constant), as before.
    assert np.isfinite(fast["pos_sink"][:, 2]).all()


def test_head_statistics_intervals_are_quantiles_of_the_full_path():
    m = _moments(np.random.default_rng(2), n_docs=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = decisions.head_statistics(m, ys=["entropy", "max_attn", "k_eff_exp"], n_boot=200, seed=5)
    ix = m.index("log_q_norm")
    iy = [m.index(v) for v in ("entropy", "max_attn", "k_eff_exp")]
    zs = {c: [m.index(v) for v in names] for c, names in decisions.CONTROLS.items()}
    ctrl = list(dict.fromkeys(j for z in zs.values() for j in z))
    order = [ix, *iy, *ctrl]
    s_docs, _ = m.augmented()
    full = inference._bootstrap_partial_r_full(
        s_docs, [0, *(j + 1 for j in order)], inference._bootstrap_counts(m.n_documents, 200, 5),
        len(iy), {c: [order.index(j) for j in z] for c, z in zs.items()})
    for c in decisions.CONTROLS:
        low, high = inference._quantiles(full[c], (0.025, 0.975))
        for k, y in enumerate(("entropy", "max_attn", "k_eff_exp")):
            suffix = f"_given_{c}" if c else ""
            np.testing.assert_allclose(out[f"r_ci_low_logq_{y}{suffix}"], low[:, k], atol=1e-12)
            np.testing.assert_allclose(out[f"r_ci_high_logq_{y}{suffix}"], high[:, k], atol=1e-12)


def test_from_tokens_second_moments_equal_the_per_token_sum():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(3, 2, 9, 4))
    valid = rng.random((3, 2, 9)) > 0.3
    m = DocumentMoments.from_tokens(values, valid, np.array([0, 1, 2]), layers=[0, 0],
                                    heads=[0, 1], variables=("a", "b", "c", "d"))
    for g in range(3):
        for h in range(2):
            v = values[g, h][valid[g, h]]
            c = v - v.mean(axis=0)
            np.testing.assert_allclose(m.m2[g, h], c.T @ c, atol=1e-12)
            np.testing.assert_allclose(m.mean[g, h], v.mean(axis=0), atol=1e-14)


def test_augmented_is_computed_once_and_results_stay_writable():
    m = _moments(np.random.default_rng(5), n_docs=8)
    s1, mu1 = m.augmented()
    s2, mu2 = m.augmented()
    assert s1 is s2 and mu1 is mu2
    with pytest.raises(ValueError):
        s1[0, 0, 0, 0] = 1.0  # the cache is read-only, so no caller can change it for the next
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = decisions.head_statistics(m, ys=["entropy"], n_boot=5)
    out.loc[0, "mean_entropy"] = 0.0  # tables are the caller's to edit
    assert mu1[0, m.index("entropy")] != 0.0
