"""`kernels.fused.capture_row_metrics` (the capture's one-pass kernel) equals `row_metrics` and
`sink_excluded_metrics` (each tested against the single-metric definitions elsewhere) on the
inputs that take its fused path and on those that fall back to the two functions."""

import pytest
import torch
from torch.testing import assert_close

from spectra_lens import metrics as M
from spectra_lens.kernels import blocked as KB
from spectra_lens.kernels import fused as KF

MIN = torch.finfo(torch.float32).min


def _inputs(seed, *, batch=2, heads=3, n=37, sink=4.0, scale=3.0, mask_value=MIN, left_pad=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, heads, n, n, generator=g) * scale
    s[..., 0] += sink
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    if left_pad:
        hidden = hidden | (torch.arange(n) < left_pad)[None, :]
    s = s.masked_fill(hidden, mask_value)
    p = torch.softmax(s, dim=-1)
    if left_pad:  # padding queries see nothing: the model gives them some row; keep it finite
        p[..., :left_pad, :] = 1.0 / n
    q = torch.rand(batch, heads, n, generator=g) + 0.5
    return p, s, q


def _two_pass(p, s, q, top_mass, block_elements=None):
    return (KB.row_metrics(p, s, top_mass=top_mass, block_elements=block_elements)
            | KB.sink_excluded_metrics(p, s, q, top_mass=top_mass, block_elements=block_elements))


def _check(got, want, *, exact_counts=True, atol=2e-5, rtol=2e-5):
    assert set(got) == set(want) == set(M.CAPTURE_ROW_METRICS)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert torch.equal(g.isnan(), w.isnan()), name
        if name.startswith("k_eff_top90"):
            same = (g == w) | (g.isnan() & w.isnan())
            if exact_counts:
                assert same.all(), (name, int((~same).sum()))
            else:  # the rest's sums run in another order: a count may move at a rounding tie
                assert same.float().mean() > 0.995, name
            continue
        assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True, msg=name)


# the one-pass kernels: NumPy (any input) and compiled (inputs with scores)
KERNELS = [(True, "numpy"), (False, "numpy"), (True, "compiled")]


@pytest.mark.parametrize("n", [1, 2, 16, 37, 130])
@pytest.mark.parametrize(("with_scores", "backend"), KERNELS)
@pytest.mark.parametrize("top_mass", [0.9, 0.5, None])
def test_fused_equals_the_two_functions(n, with_scores, backend, top_mass):
    for sink in (0.0, 4.0, 12.0):
        p, s, q = _inputs(n + int(sink), n=n, sink=sink)
        s = s if with_scores else None
        got = KF.capture_row_metrics(p, s, q, top_mass=top_mass, backend=backend)
        _check(got, _two_pass(p, s, q, top_mass))


@pytest.mark.parametrize("block_elements", [1, 300, 5000])
@pytest.mark.parametrize("backend", ["numpy", "compiled"])
def test_any_block_size_gives_the_same_values(block_elements, backend):
    p, s, q = _inputs(5, n=45)
    want = KF.capture_row_metrics(p, s, q, backend=backend)
    got = KF.capture_row_metrics(p, s, q, block_elements=block_elements, backend=backend)
    for name in want:
        assert_close(got[name], want[name], atol=1e-6, rtol=1e-6, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
def test_minus_infinity_masks_and_float64_inputs(backend):
    p, s, q = _inputs(6, n=33, mask_value=float("-inf"))
    _check(KF.capture_row_metrics(p, s, q, backend=backend), _two_pass(p, s, q, 0.9))
    p, s, q = _inputs(6, n=33)
    s64 = s.double().masked_fill(s == MIN, torch.finfo(torch.float64).min)  # a float64 model's mask
    p64 = torch.softmax(s64, dim=-1)
    _check(KF.capture_row_metrics(p64, s64, q, backend=backend), _two_pass(p64, s64, q, 0.9))


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
def test_a_sink_that_takes_almost_everything_keeps_the_rest_exact(backend):
    """p_0 within 1e-6 of 1: the rest is summed directly (not 1 − p_0), so its metrics keep
    their digits; where the rest underflows in p (sink logit far above the others), the rows are
    renormalized from the scores, as `without_first_key` does."""
    for sink, seed in ((14.0, 7), (40.0, 8), (120.0, 9)):
        p, s, q = _inputs(seed, n=40, sink=sink, scale=1.0)
        got = KF.capture_row_metrics(p, s, q, backend=backend)
        want = _two_pass(p, s, q, 0.9)
        _check(got, want, exact_counts=False)
        assert torch.isfinite(got["entropy_nosink"][..., 1:]).all()
    # Without scores the logits are log p: rows whose rest underflowed have no rest to measure.
    p, s, q = _inputs(10, n=40, sink=120.0, scale=1.0)
    _check(KF.capture_row_metrics(p, None, q), _two_pass(p, None, q, 0.9), exact_counts=False)


def test_exact_ties_with_the_first_key():
    """Keys of equal mass (including the first key): the top-mass count of the rest removes the
    first key at its rank in the sorted row; exact binary fractions make every sum exact."""
    n = 20
    rows = []
    for k in (1, 2, 4, 8, 16):  # the first k keys share the mass equally: p_0 tied with k − 1 keys
        rows.append([1.0 / k] * k + [0.0] * (n - k))
    rows.append([0.25, 0.5, 0.125, 0.125] + [0.0] * (n - 4))  # p_0 behind a larger key
    rows.append([0.5, 0.25, 0.25] + [0.0] * (n - 3))
    p = torch.tensor(rows, dtype=torch.float32)[None, :, None, :].expand(1, -1, n, -1).contiguous()
    q = torch.ones(p.shape[:-1])
    got = KF.capture_row_metrics(p, None, q)
    want = _two_pass(p, None, q, 0.9)
    _check(got, want)
    # and against the definition directly: the rest of [1/4]*4 is [1/3]*3, 3 keys to reach 0.9
    assert got["k_eff_top90_nosink"][0, 2, 0].item() == 3
    assert got["k_eff_top90"][0, 2, 0].item() == 4
    # [0.25, 0.5, 0.125, 0.125]: the rest [2/3, 1/6, 1/6] needs 3 keys (0.83 < 0.9), the row 4 (0.875 < 0.9)
    assert got["k_eff_top90_nosink"][0, 5, 0].item() == 3 and got["k_eff_top90"][0, 5, 0].item() == 4


def test_left_padding_takes_the_two_function_path():
    # (half precision takes the one-pass kernels: tests/capture/test_kernels_compiled.py)
    p, s, q = _inputs(11, n=30, left_pad=4)
    got = KF.capture_row_metrics(p, s, q, block_elements=2000)
    want = _two_pass(p, s, q, 0.9, block_elements=2000)
    for name in want:
        assert torch.equal(got[name][..., 4:].nan_to_num(-7.0), want[name][..., 4:].nan_to_num(-7.0)), name


def test_torch_backend_and_bad_top_mass():
    p, s, q = _inputs(13, n=24)
    _check(KF.capture_row_metrics(p, s, q, backend="torch"), _two_pass(p, s, q, 0.9))
    from spectra_lens.errors import SpectraError

    with pytest.raises(SpectraError, match="top_mass"):
        KF.capture_row_metrics(p, s, q, top_mass=1.5)


@pytest.mark.parametrize("backend", ["numpy", "compiled", "torch"])
def test_no_result_is_a_view_of_the_pattern(backend):
    """The capture keeps every layer's results until the pass ends: a result that is a view of
    the pattern (sink_mass is p[..., 0]) would keep each layer's whole pattern alive with it."""
    p, s, q = _inputs(14, n=20)
    got = KF.capture_row_metrics(p, s, q, backend=backend)
    for name, v in got.items():
        assert v.untyped_storage().data_ptr() != p.untyped_storage().data_ptr(), name
    assert torch.equal(got["sink_mass"], p[..., 0])
