"""The compiled capture kernel (`spectra_lens.compiled`, `capture_row_metrics(backend="compiled")`)
equals the NumPy kernel and the two-function reference on masks the causal fast case does not
cover, flags the rows it cannot measure and hands them to the reference, and is what the capture
runs on the CPU."""

import numpy as np
import pytest
import torch
from test_capture_fused import _check, _inputs, _two_pass
from torch.testing import assert_close

from spectra_lens import compiled
from spectra_lens import metrics as M
from spectra_lens.errors import SpectraError
from spectra_lens.hooks import MetricCapture, attached
from spectra_lens.layout import attention_layout
from spectra_lens.testing import tiny_model

MIN = torch.finfo(torch.float32).min


def test_numba_is_installed():
    # a required dependency: without it the capture silently runs the slower NumPy kernel
    assert compiled.AVAILABLE


def _masked(seed, hidden, *, sink=3.0, n_b=2, heads=2):
    n = hidden.shape[-1]
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n_b, heads, n, n, generator=g) * 2.0
    s[..., 0] += sink
    s = s.masked_fill(hidden, MIN)
    p = torch.softmax(s, dim=-1).masked_fill(hidden, 0.0)
    q = torch.rand(n_b, heads, n, generator=g) + 0.5
    return p, s, q


@pytest.mark.parametrize("kind", ["bidirectional", "holes", "window", "ragged_tail"])
def test_masks_other_than_causal(kind):
    n = 29
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    g = torch.Generator().manual_seed(3)
    if kind == "bidirectional":  # every key visible: the extent is the whole row
        hidden = torch.zeros(n, n, dtype=torch.bool)
    elif kind == "holes":  # causal with hidden keys inside the visible range (the first key stays)
        hidden = (j > i) | ((torch.rand(n, n, generator=g) < 0.3) & (j > 0))
    elif kind == "window":  # a sliding window: the first key hidden in later rows (two-function path)
        hidden = (j > i) | (j < i - 6)
    else:  # keys after the causal extent visible in some rows, the last keys hidden in others
        hidden = (j > i + 3) | ((j > n - 4) & (i % 2 == 0))
    p, s, q = _masked(11, hidden)
    want = _two_pass(p, s, q, 0.9)
    _check(M.capture_row_metrics(p, s, q, backend="compiled"), want)
    _check(M.capture_row_metrics(p, s, q, backend="numpy"), want)


def test_a_first_key_below_1e30_and_long_flat_rows():
    """log p is taken from the first key unless its p is below 1e-30 (then from the largest p);
    the local gain of long, nearly uniform rows is a small variance that float64 keeps."""
    p, s, q = _inputs(31, n=24, sink=-100.0, scale=1.0)  # p_0 ≈ e^-100, subnormal: the largest key
    assert (p[..., 5:, 0] < 1e-30).all()
    _check(M.capture_row_metrics(p, s, q, backend="compiled"), _two_pass(p, s, q, 0.9))
    n = 1024
    s = (torch.randn(1, 1, n, n, generator=torch.Generator().manual_seed(5)) * 0.05)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), MIN)
    p = torch.softmax(s, dim=-1)
    got = M.capture_row_metrics(p, s, torch.ones(1, 1, n), backend="compiled")["local_gain"]
    s64 = s.double().masked_fill(s == MIN, float("-inf"))
    p64 = torch.softmax(s64, dim=-1)
    mean = (p64 * s64.nan_to_num(0.0, neginf=0.0)).sum(-1, keepdim=True)
    want = -(p64 * (s64.nan_to_num(0.0, neginf=0.0) - mean) ** 2).sum(-1)
    assert_close(got.double(), want, atol=2e-7, rtol=1e-4)


def test_flags_and_their_rows():
    """Rows whose first key is hidden get FLAG_ROW, rows whose rest underflows FLAG_REST; the
    other rows' values do not depend on them."""
    n = 12
    p, s, q = _inputs(21, batch=1, heads=2, n=n, sink=3.0)
    s[0, 0, 5:, 0] = MIN  # head 0: the first key hidden from query 5 on
    p = torch.softmax(s, dim=-1)
    s[0, 1, 3, 0] = 200.0  # head 1, query 3: a sink that leaves the rest below 1e-30
    p[0, 1, 3] = torch.softmax(s[0, 1, 3], dim=-1)
    P, S, Q = (x.reshape(-1, n, x.shape[-1]).contiguous().numpy() if x.ndim == 4
               else x.reshape(-1, n).contiguous().numpy() for x in (p, s, q))
    out, flag = compiled.capture_rows(P, S, Q, thr=MIN / 2, floor=M._SCORE_FLOOR, top_mass=0.9,
                                      tol=M._TOP_TOL, min_rest=M._NOSINK_MIN_MASS, block_rows=4)
    expect = np.zeros((2, n), np.int8)
    expect[0, 5:] = compiled.FLAG_ROW
    expect[1, 3] = compiled.FLAG_REST
    assert np.array_equal(flag, expect)
    # flagged rows come from the reference; the capture equals it everywhere
    _check(M.capture_row_metrics(p, s, q, backend="compiled"), _two_pass(p, s, q, 0.9),
           exact_counts=False)


def test_top_counts_of_sorted_rows_by_hand():
    # rows of p (descending), p_0 = the first key's mass, R = the rest's mass
    rows = np.array([[0.5, 0.25, 0.125, 0.125], [0.7, 0.1, 0.1, 0.1], [1.0, 0.0, 0.0, 0.0]])
    p0 = np.array([0.25, 0.1, 1.0])
    R = 1.0 - p0
    full, rest = np.empty(3), np.empty(3)
    compiled.top_counts(-rows, p0, R, np.array([False, False, True]), 0.9 - 1e-6, 7, full, rest)
    # row 0: 0.5 + 0.25 + 0.125 = 0.875 < 0.9 → 4 keys; without p_0 = 0.25: [0.5, 0.125, 0.125]
    # of R = 0.75 → 0.9 · 0.75 = 0.675 needs 3 (0.625 < 0.675)
    # row 1: 0.7 + 0.1 + 0.1 = 0.9 → 3; the rest [0.7, 0.1, 0.1] of 0.9: 0.81 needs 2 (0.8 < 0.81 → 3)
    assert full.tolist() == [4, 3, 1]
    assert rest[:2].tolist() == [3, 3] and np.isnan(rest[2])


def test_bad_backend_requests_are_refused():
    p, s, q = _inputs(4, n=8)
    with pytest.raises(SpectraError, match="without scores"):
        M.capture_row_metrics(p, None, q, backend="compiled")
    with pytest.raises(SpectraError, match="bfloat16"):
        M.capture_row_metrics(p.bfloat16(), s.bfloat16(), q, backend="compiled")


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "bloom"])
def test_the_capture_runs_the_compiled_kernel_and_matches_numpy(family, monkeypatch):
    """Soft-capping (Gemma2) and ALiBi (Bloom) included: the kernel takes log p from the scores,
    which holds wherever the layout finds softmax(hook_attn_scores) == hook_pattern; elsewhere
    the capture has no scores and runs the NumPy kernel."""
    model = tiny_model(family)
    layout = attention_layout(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    real = M._capture_compiled
    monkeypatch.setattr(M, "_capture_compiled", lambda *a: seen.append(1) or real(*a))
    cap = MetricCapture(layout)
    with attached(model, cap, layout=layout):
        model(tokens, return_type=None)
    got = cap.result()
    n_compiled = layout.n_layers if layout.scores_faithful else 0
    assert len(seen) == n_compiled
    monkeypatch.setattr(compiled, "AVAILABLE", False)  # the NumPy kernel, as without numba
    with attached(model, cap, layout=layout):
        model(tokens, return_type=None)
    want = cap.result()
    assert len(seen) == n_compiled
    for name in ("entropy", "max_attn", "k_eff_pr", "k_eff_top90", "local_gain", "entropy_nosink",
                 "k_eff_top90_nosink", "dir_spread"):
        assert_close(getattr(got, name), getattr(want, name), atol=2e-5, rtol=2e-5, equal_nan=True,
                     msg=name)
