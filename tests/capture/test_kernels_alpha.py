"""The CPU α-sweep kernel (`kernels.alpha.alpha_row_metrics`) and its top-mass count
(`kernels.alpha._top_count_from_chunks`) against plain float64 definitions: the count found in float32
chunk sums must be exactly the float64 count, also where a partial sum equals the limit."""

import math

import numpy as np
import pytest
import reference as R
import torch

from spectra_lens import metrics as M
from spectra_lens.kernels import alpha as KA
from spectra_lens.kernels import blocked as KB
from spectra_lens.kernels.alpha import (
    _ALPHA_KEY_CHUNK,
    _ALPHA_PAD,
    _top_count_from_chunks,
    alpha_row_metrics,
)
from spectra_lens.metrics import SWEEP_METRICS


def _plain_count(E: np.ndarray, lim: np.ndarray) -> list[int]:
    """Fewest leading keys whose float64 running sum reaches lim; W where none does."""
    out = []
    for row, li in zip(E.astype(np.float64).tolist(), lim.tolist()):
        total, count = 0.0, len(row)
        for i, v in enumerate(row):
            total += v
            if total >= li:
                count = i + 1
                break
        out.append(count)
    return out


def _count(E: np.ndarray, lim: np.ndarray) -> list[int]:
    E = np.ascontiguousarray(E, dtype=np.float32)
    n_chunks = E.shape[1] // _ALPHA_KEY_CHUNK
    chunk_sums = np.zeros((1 + n_chunks, len(E)), np.float32)
    chunk_sums[1:] = E.reshape(len(E), n_chunks, _ALPHA_KEY_CHUNK).sum(-1).T
    return _top_count_from_chunks(E, np.asarray(lim, dtype=np.float64), chunk_sums).tolist()


@pytest.mark.parametrize("width", [_ALPHA_KEY_CHUNK, 2 * _ALPHA_KEY_CHUNK, 16 * _ALPHA_KEY_CHUNK, 300 * _ALPHA_KEY_CHUNK])
def test_count_equals_the_float64_count_on_random_rows(width):
    g = np.random.default_rng(width)
    E = np.sort(g.random((300, width), dtype=np.float32) ** g.uniform(1, 30, (300, 1)), -1)[:, ::-1]
    Z = E.astype(np.float64).sum(-1)
    for mass in (0.9 - 1e-6, 0.5, 0.999, 1e-9):
        lim = mass * Z
        assert _count(E, lim) == _plain_count(E, lim)
    lim = Z * g.uniform(0, 1.1, 300)  # some rows never reach it: W
    want = _plain_count(E, lim)
    assert _count(E, lim) == want and want.count(width) > 0


def test_count_when_the_limit_equals_a_partial_sum():
    """Keys of 2⁻¹⁰ make every partial sum exact: lim equal to a partial sum (first key, last key
    of a chunk, first key of the next, inside a chunk, the last key), a float step away from one,
    half a key below one, and beyond the row's sum."""
    W, unit = 4 * _ALPHA_KEY_CHUNK, 2.0**-10
    ks = [1, 5, _ALPHA_KEY_CHUNK, _ALPHA_KEY_CHUNK + 1, _ALPHA_KEY_CHUNK + 4, 2 * _ALPHA_KEY_CHUNK + 7, W]
    lims = [k * unit for k in ks]
    lims += [math.nextafter(v, 0.0) for v in lims] + [math.nextafter(v, 1.0) for v in lims]
    lims += [(k - 0.5) * unit for k in ks]  # half a key before each: the same counts
    lims += [(W + 3) * unit]
    E = np.full((len(lims), W), unit, dtype=np.float32)
    lim = np.array(lims)
    want = _plain_count(E, lim)
    assert _count(E, lim) == want
    assert want[: len(ks)] == ks and want[-1] == W


def test_count_of_long_flat_rows_next_to_every_partial_sum():
    """300 chunks of nearly equal keys: the float32 partial sums are off by many units of their
    last place, and a limit just above or below each float64 partial sum must still give the
    float64 count (the rows within the error bound δ are counted again in float64)."""
    W = 300 * _ALPHA_KEY_CHUNK
    g = np.random.default_rng(3)
    row = np.sort((1.0 + g.random(W) * 1e-3).astype(np.float32))[::-1]
    S = np.cumsum(row.astype(np.float64))
    m = np.arange(0, W, 7)
    lim = np.concatenate([S[m] + d * row[m] for d in (-1e-3, -1e-5, 1e-5, 1e-3)])
    E = np.broadcast_to(row, (len(lim), W))
    assert _count(E, lim) == _plain_count(E, lim)


def test_count_of_a_nan_row_is_one_and_leaves_the_others_alone():
    E = np.sort(np.random.default_rng(0).random((3, 32), dtype=np.float32), -1)[:, ::-1].copy()
    E[1] = np.nan
    lim = 0.9 * E.astype(np.float64).sum(-1)
    got = _count(E, lim)
    assert got[1] == 1
    assert [got[0], got[2]] == [_plain_count(E[[0, 2]], lim[[0, 2]])[i] for i in (0, 1)]


def _rows(seed: int, n_rows: int, n_keys: int, scale: float) -> torch.Tensor:
    """Scores [rows, keys] with a causal-like number of visible keys per row (masked −inf)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows, n_keys, generator=g) * scale
    n_vis = torch.randint(1, n_keys + 1, (n_rows,), generator=g)
    n_vis[0] = n_keys
    return z.masked_fill(torch.arange(n_keys) >= n_vis[:, None], float("-inf"))


@pytest.mark.parametrize("n_keys,scale", [(5, 1.0), (37, 3.0), (100, 8.0)])
@pytest.mark.parametrize("backend", ["numpy", "compiled"])
def test_alpha_row_metrics_equal_the_reference(n_keys, scale, backend):
    """Per row and α: every sweep metric of softmax(α·z) over the visible keys, as the float64
    reference computes it (the α grid spans sharp and flat patterns)."""
    z = _rows(n_keys, 24, n_keys, scale)
    # 0.25, 0.5, 1, 2, 4: α whose double is on the grid take Σ e² from the Z of 2α (and only
    # those: 0.5 and 1.5 = 3 · 0.5 are on it too)
    alphas = (0.05, 0.25, 0.5, 1.0, 2.0 ** 0.2, 1.5, 2.0, 4.0, 30.0)
    got = alpha_row_metrics(z, alphas, backend=backend)
    for j, a in enumerate(alphas):
        for r in range(z.shape[0]):
            row = z[r][torch.isfinite(z[r])].double().numpy()
            want = R.row_metrics(R.softmax(row, a))
            for m in SWEEP_METRICS:
                assert float(got[m][j, r]) == pytest.approx(want[m], rel=2e-5, abs=1e-6), (a, r, m)


def test_alpha_row_metrics_do_not_depend_on_the_chunking():
    """Chunks of α (memory) and pieces of rows (cache) only group the work: any chunk size gives
    the same bits, also with ragged pieces and a row with no visible key (padding: NaN, count 1)."""
    z = _rows(7, 50, 70, 4.0)
    z[3] = float("-inf")
    alphas = tuple(2.0 ** (k / 5) for k in range(-10, 11))
    width = 70 + (-70 % _ALPHA_PAD)
    whole = alpha_row_metrics(z, alphas, backend="numpy")
    # 2 and 8 α per chunk leave a last chunk of 1 and 5 of the 21 α
    for chunk in (1, 3 * width, 50 * width + 1, 2 * 50 * width, 7 * 50 * width, 8 * 50 * width):
        got = alpha_row_metrics(z, alphas, chunk_elements=chunk, backend="numpy")
        for m in SWEEP_METRICS:
            torch.testing.assert_close(got[m], whole[m], atol=0, rtol=0, equal_nan=True)
    assert torch.isnan(whole["entropy"][:, 3]).all() and (whole["k_eff_top90"][:, 3] == 1).all()
    assert torch.isfinite(whole["entropy"][:, [0, 1, 2, 4]]).all()


def test_top_mass_count_at_exactly_the_mass_and_within_the_tolerance():
    """Rows whose two largest weights sum to 0.9 exactly, and to 0.9 − 5e-7 (within the 1e-6
    tolerance of `k_eff_top_mass`): both reach the mass at the second key; 0.9 − 2e-6 does not."""
    rows = [[0.5, 0.4, 0.05, 0.05], [0.5, 0.3999995, 0.1000005, 0.0], [0.5, 0.399998, 0.100002, 0.0]]
    p = torch.tensor(rows, dtype=torch.float64)
    z = p.log().float()  # softmax(1 · log p) = p; the zero key is masked (−inf)
    got = alpha_row_metrics(z, (1.0,), backend="numpy")["k_eff_top90"][0]
    want = [R.row_top_mass_count([x for x in row if x > 0]) for row in rows]
    assert want == [2, 2, 3]
    assert got.tolist() == want


def test_alpha_backends_are_dispatched_as_asked(monkeypatch):
    """backend None takes the compiled kernel where it is available and the NumPy one
    otherwise; "numpy" always the NumPy one; "compiled" without numba (or SPECTRA_LENS_NUMBA=0)
    and unknown names are refused. The compiled kernel is replaced by a stub that records its
    arguments (the α rows' mass 0.9 and tolerance 1e-6)."""
    from spectra_lens.errors import SpectraError

    z = _rows(3, 6, 10, 2.0)
    alphas = (0.5, 1.0, 2.0)
    calls = []

    def stub(zz, aa, *, top_mass, tol):
        calls.append((zz.copy(), aa, top_mass, tol))
        return np.full((len(SWEEP_METRICS), len(aa), len(zz)), 7.0)

    monkeypatch.setattr(KA.compiled, "alpha_row_sums", stub)
    monkeypatch.setattr(KA.compiled, "AVAILABLE", True)
    for backend in (None, "compiled"):
        got = alpha_row_metrics(z, alphas, backend=backend)
        assert all(got[m].shape == (3, 6) and (got[m] == 7).all() for m in SWEEP_METRICS), backend
    assert len(calls) == 2
    for zz, aa, top_mass, tol in calls:
        assert np.array_equal(zz, z.numpy()) and aa == alphas and top_mass == 0.9 and tol == 1e-6
    numpy = alpha_row_metrics(z, alphas, backend="numpy")
    assert len(calls) == 2 and not (numpy["entropy"] == 7).any()
    monkeypatch.setattr(KA.compiled, "AVAILABLE", False)
    for m, v in alpha_row_metrics(z, alphas).items():
        torch.testing.assert_close(v, numpy[m], atol=0, rtol=0)
    assert len(calls) == 2
    with pytest.raises(SpectraError, match=r"backend must be None, 'numpy' or 'compiled' \(numba available: False\), got 'compiled'"):
        alpha_row_metrics(z, alphas, backend="compiled")
    with pytest.raises(SpectraError, match="got 'cuda'"):
        alpha_row_metrics(z, alphas, backend="cuda")
    assert len(calls) == 2


def test_alpha_row_metrics_pieces_smaller_than_a_row_block(monkeypatch):
    """With pieces of a few rows (one α each) the results are those of whole-chunk pieces."""
    z = _rows(11, 40, 33, 2.0)
    alphas = (0.5, 1.0, 3.0)
    whole = alpha_row_metrics(z, alphas, backend="numpy")
    monkeypatch.setattr(KA, "_ALPHA_PIECE", 7 * 48)  # 7 rows of 48 padded keys, ragged at the end
    got = alpha_row_metrics(z, alphas, backend="numpy")
    for m in SWEEP_METRICS:
        torch.testing.assert_close(got[m], whole[m], atol=0, rtol=0)


@pytest.mark.numba
def test_compiled_alpha_rows_equal_the_numpy_kernel():
    """The compiled kernel (float64 exponentials, keys below e^-110 left out) against the NumPy
    one on sharp and flat rows, a row with no visible key and one with a single key; counts may
    differ only where a partial sum meets the limit within rounding (none here)."""
    z = _rows(17, 300, 90, 6.0)
    z[3] = float("-inf")
    z[4, 1:] = float("-inf")
    z[5] = torch.randn(90) * 1e-3  # flat: every key counts at every α
    alphas = tuple(2.0 ** (k / 5) for k in range(-10, 11)) + (40.0,)
    want = alpha_row_metrics(z, alphas, backend="numpy")
    got = alpha_row_metrics(z, alphas, backend="compiled")
    for m in SWEEP_METRICS:
        if m == "k_eff_top90":
            assert torch.equal(got[m], want[m]), m
        else:
            torch.testing.assert_close(got[m], want[m], rtol=2e-6, atol=1e-6, equal_nan=True, msg=m)
    assert torch.isnan(got["entropy"][:, 3]).all() and (got["k_eff_top90"][:, 3] == 1).all()
    assert (got["max_attn"][:, 4] == 1).all() and (got["k_eff_top90"][:, 4] == 1).all()
    from spectra_lens.errors import SpectraError

    with pytest.raises(SpectraError, match="backend"):
        alpha_row_metrics(z, alphas, backend="cuda")


def test_alpha_metrics_weighted_mean_of_the_row_kernel():
    """`alpha_metrics` on [batch, head, query, key] = the (row-weighted) mean over query rows of
    `alpha_row_metrics`; rows of weight 0 (padding, here with no visible key) are left out."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 40, 40, generator=g) * 3
    visible = M.causal_mask(40).expand_as(s).clone()
    visible[1, :, :5] = False  # sequence 1: its first 5 rows are padding
    w = torch.ones(2, 1, 40)
    w[1, :, :5] = 0
    alphas = (0.5, 1.0, 2.0)
    got = KA.alpha_metrics(s, visible, alphas, row_weight=w)
    rows = alpha_row_metrics(s.masked_fill(~visible, float("-inf")).reshape(-1, 40), alphas)
    for m in SWEEP_METRICS:
        v = rows[m].double().view(len(alphas), 2, 3, 40)
        want = torch.stack([v[:, 0].mean(-1), v[:, 1, :, 5:].mean(-1)], 1).float()
        torch.testing.assert_close(got[m], want, rtol=1e-6, atol=1e-6)


def test_local_gain_under_in_query_blocks_equals_the_whole_tensor():
    """The CPU path (blocks of query rows over the keys they see) = −Var_p(s) over every key,
    with a causal mask, a mask that is not causal (a row sees a late key) and an empty row."""
    g = torch.Generator().manual_seed(9)
    s = torch.randn(2, 3, 37, 37, generator=g) * 2
    visible = M.causal_mask(37).expand_as(s).clone()
    visible[0, 1, 3, 30] = True
    visible[1, 2, 20] = False
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    s0 = s.masked_fill(~visible, 0.0)
    mean = (p * s0).sum(-1, keepdim=True)
    want = -(p * (s0 - mean).square()).sum(-1)
    torch.testing.assert_close(KB.local_gain_under(p, s, visible), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(KB.local_gain_under(p[0, 0, 5], s[0, 0, 5], visible[0, 0, 5]), want[0, 0, 5])
