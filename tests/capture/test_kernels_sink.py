"""sink_excluded_metrics works in query blocks over the visible keys; it must equal the
single-metric functions applied to the whole tensor (`_sink_excluded_metrics_whole`)."""

import pytest
import torch
from torch.testing import assert_close

from spectra_lens import metrics as M
from spectra_lens.kernels import blocked as KB


def _inputs(seed, *, batch=2, heads=3, n=37, left_pad=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, heads, n, n, generator=g) * 3
    s[..., 0] += 4.0  # a sink, as in real heads
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    if left_pad:
        hidden = hidden | (torch.arange(n) < left_pad)[None, :]
    s = s.masked_fill(hidden, torch.finfo(torch.float32).min)
    p = torch.softmax(s, dim=-1)
    if left_pad:  # padding queries see nothing: the model gives them some row; keep it finite
        p[..., :left_pad, :] = 1.0 / n
    q = torch.rand(batch, heads, n, generator=g) + 0.5
    return p.to(dtype), s.to(dtype), q


@pytest.mark.parametrize("block_elements", [64, 1000, None])
@pytest.mark.parametrize("with_scores", [True, False])
@pytest.mark.parametrize("top_mass", [0.9, None])
def test_blocked_equals_whole_tensor(block_elements, with_scores, top_mass):
    p, s, q = _inputs(0)
    s = s if with_scores else None
    got = KB.sink_excluded_metrics(p, s, q, top_mass=top_mass, block_elements=block_elements)
    want = M.sink_excluded(p, s, q, top_mass=top_mass)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape
        if name == "k_eff_top90_nosink" and top_mass is not None:
            same = (got[name] == want[name]) | (got[name].isnan() & want[name].isnan())
            assert same.float().mean() > 0.995, name  # counts may differ at a rounding tie
            continue
        assert_close(got[name], want[name], atol=2e-5, rtol=2e-5, equal_nan=True, msg=name)
    assert torch.isnan(got["entropy_nosink"][..., 0]).all()


def test_blocked_equals_whole_tensor_under_left_padding():
    p, s, q = _inputs(1, left_pad=5)
    got = KB.sink_excluded_metrics(p, s, q, block_elements=200)
    want = M.sink_excluded(p, s, q)
    for name in want:
        assert_close(got[name][..., 5:], want[name][..., 5:], atol=2e-5, rtol=2e-5,
                     equal_nan=True, msg=name)


def test_half_precision_inputs_are_read_into_float32_blocks():
    p, s, q = _inputs(2, dtype=torch.bfloat16)
    got = KB.sink_excluded_metrics(p, s, q, block_elements=500)
    want = M.sink_excluded(p, s, q)
    for name in ("entropy_nosink", "max_attn_nosink", "k_eff_pr_nosink", "dir_spread"):
        assert got[name].dtype == torch.float32
        assert_close(got[name], want[name], atol=2e-5, rtol=2e-5, equal_nan=True, msg=name)


def test_any_number_of_leading_dimensions():
    """A pattern [query, key], [head, query, key] or [batch, head, group, query, key]: the
    values of the 4-D call, in the input's leading shape."""
    p, s, q = _inputs(3)
    full = KB.sink_excluded_metrics(p, s, q, block_elements=500)
    for idx, shape in (((0, 0), ()), ((1,), (3,)), ((), (2, 3, 1))):
        pp, ss, qq = p[idx], s[idx], q[idx]
        if shape == (2, 3, 1):
            pp, ss, qq = p.unsqueeze(2), s.unsqueeze(2), q.unsqueeze(2)
        got = KB.sink_excluded_metrics(pp, ss, qq, block_elements=500)
        want = M.sink_excluded(pp, ss, qq)
        for name in want:
            assert got[name].shape == shape + (37,), name
            torch.testing.assert_close(got[name], full[name][idx].reshape(shape + (37,)), equal_nan=True)
            if name != "k_eff_top90_nosink":
                assert_close(got[name], want[name], atol=2e-5, rtol=2e-5, equal_nan=True, msg=name)
