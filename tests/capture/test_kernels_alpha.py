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
    and beyond the row's sum."""
    W, unit = 4 * _ALPHA_KEY_CHUNK, 2.0**-10
    ks = [1, 5, _ALPHA_KEY_CHUNK, _ALPHA_KEY_CHUNK + 1, 2 * _ALPHA_KEY_CHUNK + 7, W]
    lims = [k * unit for k in ks]
    lims += [math.nextafter(v, 0.0) for v in lims] + [math.nextafter(v, 1.0) for v in lims]
    lims += [(W + 3) * unit]
    E = np.full((len(lims), W), unit, dtype=np.float32)
    lim = np.array(lims)
    want = _plain_count(E, lim)
    assert _count(E, lim) == want
    assert want[: len(ks)] == ks and want[-1] == W


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
    alphas = (0.05, 0.25, 1.0, 2.0 ** 0.2, 4.0, 30.0)
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
    for chunk in (1, 3 * width, 50 * width + 1, 7 * 50 * width):
        got = alpha_row_metrics(z, alphas, chunk_elements=chunk, backend="numpy")
        for m in SWEEP_METRICS:
            torch.testing.assert_close(got[m], whole[m], atol=0, rtol=0, equal_nan=True)
    assert torch.isnan(whole["entropy"][:, 3]).all() and (whole["k_eff_top90"][:, 3] == 1).all()
    assert torch.isfinite(whole["entropy"][:, [0, 1, 2, 4]]).all()


def test_alpha_row_metrics_pieces_smaller_than_a_row_block(monkeypatch):
    """With pieces of a few rows (one α each) the results are those of whole-chunk pieces."""
    z = _rows(11, 40, 33, 2.0)
    alphas = (0.5, 1.0, 3.0)
    whole = alpha_row_metrics(z, alphas, backend="numpy")
    monkeypatch.setattr(KA, "_ALPHA_PIECE", 7 * 48)  # 7 rows of 48 padded keys, ragged at the end
    got = alpha_row_metrics(z, alphas, backend="numpy")
    for m in SWEEP_METRICS:
        torch.testing.assert_close(got[m], whole[m], atol=0, rtol=0)


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
