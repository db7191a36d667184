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
    for top_mass in (0.9, 0.5, None):
        _check(KF.capture_row_metrics(p, s, q, top_mass=top_mass, backend="torch"), _two_pass(p, s, q, top_mass))
    from spectra_lens.errors import SpectraError

    for bad in (1.5, 0.0, -0.5):
        with pytest.raises(SpectraError, match=r"top_mass must be in \(0, 1\] or None"):
            KF.capture_row_metrics(p, s, q, top_mass=bad)


@pytest.mark.parametrize("with_scores", [True, False])
def test_a_row_that_never_reaches_the_mass_counts_every_key(with_scores):
    """top_mass = 1 on rows that sum to 0.99 (a pattern rounded down): no number of keys
    reaches the mass, and `k_eff_top_mass` counts every key (key_pos); the rest (renormalized)
    reaches it."""
    n = 30
    p, s, q = _inputs(19, n=n)
    p = p * 0.99
    s = s if with_scores else None
    got = KF.capture_row_metrics(p, s, q, top_mass=1.0, backend="numpy")
    assert (got["k_eff_top90"] == n).all()
    assert (got["k_eff_top90"] == M.k_eff_top_mass(p, mass=1.0)).all()
    want = _two_pass(p, s, q, 1.0)  # (p is no longer softmax(s): only the counts compare)
    for name in ("k_eff_top90", "k_eff_top90_nosink"):
        assert torch.equal(got[name].nan_to_num(-1.0), want[name].nan_to_num(-1.0)), name


def test_capture_row_metrics_of_any_number_of_leading_dimensions():
    """[query, key], [head, query, key] and [batch, head, group, query, key]: the values of the
    4-D call, in the input's leading shape."""
    p, s, q = _inputs(20, n=26)
    full = KF.capture_row_metrics(p, s, q, backend="numpy")
    for idx, shape in (((0, 0), ()), ((1,), (3,))):
        got = KF.capture_row_metrics(p[idx], s[idx], q[idx], backend="numpy")
        for name, v in got.items():
            assert v.shape == shape + (26,), name
            assert_close(v, full[name][idx], atol=0, rtol=0, equal_nan=True, msg=name)
    got = KF.capture_row_metrics(p.unsqueeze(2), s.unsqueeze(2), q.unsqueeze(2), backend="numpy")
    for name, v in got.items():
        assert_close(v, full[name].unsqueeze(2), atol=0, rtol=0, equal_nan=True, msg=name)


def test_the_backend_is_chosen_as_documented(monkeypatch):
    """backend None: the compiled kernel for a CPU pattern with its scores where numba is
    available, else the NumPy kernel (`_fused_block`); "compiled" without numba (or with
    SPECTRA_LENS_NUMBA=0), or without scores, is refused with a line naming why. The compiled
    kernel is replaced by a stub that records that it ran."""
    from spectra_lens.errors import SpectraError

    p, s, q = _inputs(21, n=12)
    calls, fused = [], []
    real = KF._fused_block
    def stub(p3, s3, qn, thr, top_mass, rows_per):
        calls.append(top_mass)
        assert torch.equal(p3, p.reshape(6, 12, 12)) and torch.equal(s3, s.reshape(6, 12, 12))
        assert torch.equal(qn, q.reshape(6, 12))
        assert thr == torch.finfo(torch.float32).min / 2  # masked: ≤ finfo.min / 2
        assert isinstance(rows_per, int) and rows_per * 6 >= 256  # blocks of ≥ 256 rows
        return {n: torch.zeros(6, 12) for n in M.CAPTURE_ROW_METRICS}

    monkeypatch.setattr(KF, "_capture_compiled", stub)
    monkeypatch.setattr(KF, "_fused_block", lambda *a: fused.append(1) or real(*a))
    monkeypatch.setattr(KF.compiled, "AVAILABLE", True)
    for backend, top_mass in ((None, 0.9), ("compiled", 0.5)):
        got = KF.capture_row_metrics(p, s, q, backend=backend, top_mass=top_mass)
        assert all((v == 0).all() and v.shape == p.shape[:-1] for v in got.values())
    assert calls == [0.9, 0.5] and not fused
    want = _two_pass(p, s, q, 0.9)
    _check(KF.capture_row_metrics(p, s, q, backend="numpy"), want)
    _check(KF.capture_row_metrics(p, None, q), _two_pass(p, None, q, 0.9))  # no scores: NumPy
    assert len(calls) == 2 and len(fused) == 2
    with pytest.raises(SpectraError, match="got a torch.float32 pattern on cpu without scores$"):
        KF.capture_row_metrics(p, None, q, backend="compiled")
    monkeypatch.setattr(KF.compiled, "AVAILABLE", False)
    _check(KF.capture_row_metrics(p, s, q), want)
    assert len(calls) == 2 and len(fused) == 3
    with pytest.raises(SpectraError, match=r"backend 'compiled' needs numba \(available: False\) and a "
                       r"float16/bfloat16/float32/float64 CPU pattern with its scores; got a torch.float32 "
                       r"pattern on cpu with torch.float32 scores$"):
        KF.capture_row_metrics(p, s, q, backend="compiled")


@pytest.mark.parametrize("backend", ["numpy", "compiled", "torch"])
def test_no_result_is_a_view_of_the_pattern(backend):
    """The capture keeps every layer's results until the pass ends: a result that is a view of
    the pattern (sink_mass is p[..., 0]) would keep each layer's whole pattern alive with it."""
    p, s, q = _inputs(14, n=20)
    got = KF.capture_row_metrics(p, s, q, backend=backend)
    for name, v in got.items():
        assert v.untyped_storage().data_ptr() != p.untyped_storage().data_ptr(), name
    assert torch.equal(got["sink_mass"], p[..., 0])


@pytest.mark.parametrize("backend", ["numpy", "compiled", "torch"])
def test_a_visible_key_whose_p_underflows_after_the_causal_extent(backend):
    """Query 3 sees key 20 (after its causal extent) with a score 150 below the others: p = 0
    there in float32, but the scores show the key, so it counts as visible (n_visible, hence
    entropy_norm, and the direction spread), as in the definitions. Blocks of 4 query rows:
    the first block's extent must widen to every key because of it."""
    n = 24
    p, s, q = _inputs(15, n=n)
    s[..., 3, 20] = s[..., 3, :4].amin(-1) - 150.0
    p = torch.softmax(s, dim=-1)
    assert (p[..., 3, 20] == 0).all()
    got = KF.capture_row_metrics(p, s, q, block_elements=4 * 6 * n, backend=backend)
    _check(got, _two_pass(p, s, q, 0.9))
    assert_close(got["entropy_norm"][..., 3], got["entropy"][..., 3] / torch.tensor(5.0).log())
    assert_close(got["dir_spread"][..., 3], M.direction_spread(s[..., 3, :], M.visible_from_scores(s[..., 3, :]), q[..., 3]))


@pytest.mark.parametrize("with_scores", [True, False])
def test_unpadded_blocks_take_the_one_pass_kernel(with_scores, monkeypatch):
    """Every block of an unpadded pattern (query 0 included, which sees only the first key) is
    measured by `_fused_block` itself (it returns True); blocks with left-padded rows (the first
    key hidden) return False and go through the two functions' block kernels."""
    seen = []
    real = KF._fused_block
    monkeypatch.setattr(KF, "_fused_block", lambda *a: seen.append(real(*a)) or seen[-1])
    n = 20
    for left_pad, want in ((0, True), (3, False)):
        p, s, q = _inputs(16, n=n, left_pad=left_pad)
        s = s if with_scores else None
        seen.clear()
        got = KF.capture_row_metrics(p, s, q, block_elements=4 * 6 * n, backend="numpy")
        assert seen == [want] * 5
        ref = _two_pass(p, s, q, 0.9)
        _check({k: v[..., left_pad:] for k, v in got.items()}, {k: v[..., left_pad:] for k, v in ref.items()})


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_backend_asked_for_measures_every_block(backend, monkeypatch):
    """`row_metrics`, `sink_excluded_metrics` and `capture_row_metrics` (through the two functions'
    blocks: left padding) run the block kernel of `backend` on the CPU, never the other one;
    "torch" never runs the one-pass NumPy kernel."""
    other = "_block_torch" if backend == "numpy" else "_block_numpy"

    def refuse(*a, **k):
        raise AssertionError(f"{other} ran under backend={backend!r}")

    p, s, q = _inputs(18, n=24, left_pad=3)
    want = {k: v[..., 3:] for k, v in _two_pass(p, s, q, 0.9).items()}
    monkeypatch.setattr(KB, other, refuse)
    if backend == "torch":
        monkeypatch.setattr(KF, "_fused_block", refuse)
    for got in (KB.row_metrics(p, s, backend=backend) | KB.sink_excluded_metrics(p, s, q, backend=backend),
                KF.capture_row_metrics(p, s, q, backend=backend, block_elements=4 * 6 * 24)):
        _check({k: v[..., 3:] for k, v in got.items()}, want)


def test_rows_longer_than_1024_keys_take_blocks_of_256_query_rows():
    """Past 1,024 keys the default block holds fewer than 256 query rows of the CPU block size:
    it takes 256 (`_MIN_BLOCK_ROWS`); the values are those of any block size."""
    n = 1100
    p, s, q = _inputs(22, batch=1, heads=1, n=n)
    got = KF.capture_row_metrics(p, s, q, backend="numpy")
    want = KF.capture_row_metrics(p, s, q, backend="numpy", block_elements=300 * n)
    _check(got, want, atol=1e-5, rtol=1e-5)  # (sums over other key extents: float32 rounding)
