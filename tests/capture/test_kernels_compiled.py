"""The compiled capture kernel (`spectra_lens.kernels.compiled`, `capture_row_metrics(backend="compiled")`)
equals the NumPy kernel and the two-function reference on masks the causal fast case does not
cover, flags the rows it cannot measure and hands them to the reference, and is what the capture
runs on the CPU."""

import numpy as np
import pytest
import torch
from test_kernels_fused import _check, _inputs, _two_pass
from torch.testing import assert_close

from spectra_lens import metrics as M
from spectra_lens.capture import MetricCapture, attached, capture_metrics
from spectra_lens.errors import SpectraError
from spectra_lens.kernels import blocked as KB
from spectra_lens.kernels import compiled
from spectra_lens.kernels import fused as KF
from spectra_lens.layout import attention_layout, hook_name
from spectra_lens.models import bridge_from_hf
from spectra_lens.testing import tiny_hf_model, tiny_model

MIN = torch.finfo(torch.float32).min


@pytest.mark.numba
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


@pytest.mark.parametrize("backend", ["compiled", "numpy"])
@pytest.mark.parametrize("kind", ["bidirectional", "holes", "window", "ragged_tail"])
def test_masks_other_than_causal(kind, backend):
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
    _check(KF.capture_row_metrics(p, s, q, backend=backend), _two_pass(p, s, q, 0.9))


@pytest.mark.numba
def test_a_first_key_below_1e30_and_long_flat_rows():
    """log p is taken from the first key unless its p is below 1e-30 (then from the largest p);
    the local gain of long, nearly uniform rows is a small variance that float64 keeps."""
    p, s, q = _inputs(31, n=24, sink=-100.0, scale=1.0)  # p_0 ≈ e^-100, subnormal: the largest key
    assert (p[..., 5:, 0] < 1e-30).all()
    _check(KF.capture_row_metrics(p, s, q, backend="compiled"), _two_pass(p, s, q, 0.9))
    n = 1024
    s = (torch.randn(1, 1, n, n, generator=torch.Generator().manual_seed(5)) * 0.05)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), MIN)
    p = torch.softmax(s, dim=-1)
    got = KF.capture_row_metrics(p, s, torch.ones(1, 1, n), backend="compiled")["local_gain"]
    s64 = s.double().masked_fill(s == MIN, float("-inf"))
    p64 = torch.softmax(s64, dim=-1)
    mean = (p64 * s64.nan_to_num(0.0, neginf=0.0)).sum(-1, keepdim=True)
    want = -(p64 * (s64.nan_to_num(0.0, neginf=0.0) - mean) ** 2).sum(-1)
    assert_close(got.double(), want, atol=2e-7, rtol=1e-4)


@pytest.mark.numba
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
    out, flag = compiled.capture_rows(P, S, Q, thr=MIN / 2, floor=KB._SCORE_FLOOR, top_mass=0.9,
                                      tol=KB._TOP_TOL, min_rest=KF._NOSINK_MIN_MASS)
    expect = np.zeros((2, n), np.int8)
    expect[0, 5:] = compiled.FLAG_ROW
    expect[1, 3] = compiled.FLAG_REST
    assert np.array_equal(flag, expect)
    # flagged rows come from the reference; the capture equals it everywhere
    _check(KF.capture_row_metrics(p, s, q, backend="compiled"), _two_pass(p, s, q, 0.9),
           exact_counts=False)


def _select(rows, p0_first=True, n_vis=None, flag=None, n_k=7):
    """`_top_one` on rows of p [n, W] (every key visible): (full, rest)."""
    P = np.ascontiguousarray(rows, dtype=np.float32)[None]
    n, W = rows.shape
    P64 = P[0].astype(np.float64)
    full, rest = np.full((1, n), -5.0), np.full((1, n), -5.0)
    ext = np.full((1, n), W, np.int64)
    nv = np.full((1, n), float(W)) if n_vis is None else np.asarray(n_vis, float)[None]
    fl = np.zeros((1, n), np.int8) if flag is None else np.asarray(flag, np.int8)[None]
    bufs = [np.empty(W + 1) for _ in range(5)] + [np.empty(4096), np.empty(4096, np.int64)]
    top_one = compiled._kernel(compiled._top_one)
    p0, r = P64[:, :1].T.copy(), P64[:, 1:].sum(-1)[None]
    for q in range(n):
        top_one(P, ext, p0, r, nv, fl, 0.9 - 1e-6, n_k, full, rest, *bufs, 0, q)
    return full[0], rest[0]


@pytest.mark.numba
def test_top_counts_by_hand():
    # rows of p with the first key's mass first
    rows = np.array([[0.25, 0.5, 0.125, 0.125], [0.1, 0.7, 0.1, 0.1], [1.0, 0.0, 0.0, 0.0],
                     [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])
    full, rest = _select(rows, n_vis=[4, 4, 1, 4, 4], flag=[0, 0, 0, 0, 0])
    # row 0: 0.5 + 0.25 + 0.125 = 0.875 < 0.9 → 4 keys; without p_0 = 0.25: [0.5, 0.125, 0.125]
    # of R = 0.75 → 0.9 · 0.75 = 0.675 needs 3 (0.625 < 0.675)
    # row 1: 0.7 + 0.1 + 0.1 = 0.9 → 3; the rest [0.7, 0.1, 0.1] of 0.9: 0.81 needs 3 (0.8 < 0.81)
    # row 2: one visible key (rest undefined); row 3: uniform, 4 keys (0.75 < 0.9) and 3 of 3;
    # row 4: 0.4 + 0.3 + 0.2 = 0.9 → 3; rest [0.3, 0.2, 0.1] of 0.6: 0.54 needs 3 (0.5 < 0.54)
    assert full.tolist() == [4, 3, 1, 4, 3]
    assert rest[[0, 1, 3, 4]].tolist() == [3, 3, 3, 3] and np.isnan(rest[2])
    # a row flagged FLAG_ROW is left as it was; a row whose mass (0.8) never reaches 0.9 counts
    # n_k (its rest, 0.3 + 0.2 of R = 0.5, reaches 0.45 with both keys)
    full, rest = _select(np.array([[0.5, 0.2, 0.1], [0.3, 0.3, 0.2]]), flag=[compiled.FLAG_ROW, 0])
    assert full.tolist() == [-5.0, 7.0] and rest.tolist() == [-5.0, 2.0]


def _walk(row: np.ndarray, thr: float) -> int:
    """The count by the definition: sort descending, sum in float64 until thr is reached."""
    c = np.cumsum(np.sort(row.astype(np.float64))[::-1])
    hit = np.nonzero(c >= thr)[0]
    return int(hit[0]) + 1 if hit.size else -1


@pytest.mark.numba
@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "sink", "two_levels"])
def test_top_counts_equal_the_sorted_walk(kind):
    """The selection (candidates above the cut-off, then a quickselect on the mass) gives the
    count of the sorted walk on long rows of many shapes, ties and repeated values included."""
    g = np.random.default_rng(["peaked", "flat", "ties", "sink", "two_levels"].index(kind))
    n, W = 40, 700
    if kind == "peaked":
        s = g.normal(size=(n, W)) * 4.0
    elif kind == "flat":
        s = g.normal(size=(n, W)) * 0.01
    elif kind == "ties":
        s = np.round(g.normal(size=(n, W)) * 2.0)  # many equal logits, equal p
    elif kind == "sink":
        s = g.normal(size=(n, W))
        s[:, 0] += 8.0
    else:
        s = np.where(g.random((n, W)) < 0.1, 3.0, 0.0)
    s[:5] = 0.0  # exactly uniform rows
    s[5, 0] = 200.0  # the first key holds all but ~1e-40 of the mass: a rest of subnormals
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    p[5, 1:] = np.float32(1e-42) * (1 + np.arange(W - 1) % 7)
    full, rest = _select(p, n_k=W)
    lim = 0.9 - 1e-6
    for i in range(n):
        r = p[i, 1:].astype(np.float64).sum()
        want_full, want_rest = _walk(p[i], lim), _walk(p[i, 1:], lim * r)
        assert full[i] == (want_full if want_full > 0 else W), (i, full[i], want_full)
        assert rest[i] == (want_rest if want_rest > 0 else W), (i, rest[i], want_rest)


@pytest.mark.numba
def test_reused_buffers_carry_nothing_from_the_previous_call():
    """`reuse` hands back this thread's scratch arrays, and the sort space and extents are
    always reused: a call after a larger one with flagged rows (or a smaller one) gives the
    values of fresh arrays."""
    def rows(p, s, q, **kw):
        P, S, Q = (x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous().numpy() if x.ndim == 4
                   else x.reshape(-1, x.shape[-1]).contiguous().numpy() for x in (p, s, q))
        return compiled.capture_rows(P, S, Q, thr=MIN / 2, floor=KB._SCORE_FLOOR, top_mass=0.9,
                                     tol=KB._TOP_TOL, min_rest=KF._NOSINK_MIN_MASS, **kw)

    big = _inputs(41, batch=2, heads=3, n=40, left_pad=6)  # FLAG_ROW rows, long extents
    small = _inputs(42, batch=1, heads=2, n=13)
    larger = _inputs(43, batch=3, heads=3, n=52)
    want = [[a.copy() for a in rows(*x)] for x in (big, small, larger)]
    for x, (w_out, w_flag) in zip((big, small, larger, small), want + want[1:2]):
        out, flag = rows(*x, reuse=True)
        assert np.array_equal(flag, w_flag)
        held = flag != compiled.FLAG_ROW  # rows flagged FLAG_ROW hold no value (by contract)
        assert np.array_equal(out[:, held], w_out[:, held], equal_nan=True)
    assert (want[0][1] == compiled.FLAG_ROW).any() and not want[1][1].any()
    again, _ = rows(*small, reuse=True)
    assert np.shares_memory(again, out)  # the same scratch: valid until the next call


def test_bad_backend_requests_are_refused():
    p, s, q = _inputs(4, n=8)
    with pytest.raises(SpectraError, match="without scores"):
        KF.capture_row_metrics(p, None, q, backend="compiled")
    with pytest.raises(SpectraError, match="CPU pattern with its scores; got a torch.float32 pattern on meta"):
        KF.capture_row_metrics(p.to("meta"), s.to("meta"), q, backend="compiled")


@pytest.mark.numba
@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2", "bloom"])
def test_the_capture_runs_the_compiled_kernel_and_matches_numpy(family, monkeypatch):
    """Soft-capping (Gemma2) and ALiBi (Bloom) included: the kernel takes log p from the scores,
    which holds wherever the layout finds softmax(hook_attn_scores) == hook_pattern; elsewhere
    the capture has no scores and runs the NumPy kernel."""
    model = tiny_model(family)
    layout = attention_layout(model)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    real = KF._capture_compiled
    monkeypatch.setattr(KF, "_capture_compiled", lambda *a: seen.append(1) or real(*a))
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


# --------------------------------------------------------------------------- half precision

HALF = [torch.bfloat16, torch.float16]


def _half(seed, dtype, *, n=37, sink=4.0, inf=False):
    """Causal half-precision scores (masked finfo(dtype).min as a half model's, or −inf) and the
    pattern a half model gives (softmax in float32, rounded); batch item 1 has three padding keys
    on the left (its rows take the flagged-row path). `real`: the queries that are real tokens."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, n, n, generator=g) * 3.0
    s[..., 0] += sink
    hidden = (~M.causal_mask(n)).expand(2, 3, n, n).clone()
    hidden[1, ..., :3] = True
    s = s.to(dtype).masked_fill(hidden, float("-inf") if inf else torch.finfo(dtype).min)
    p = torch.softmax(s.float(), dim=-1).to(dtype)
    p[1, :, :3] = 1.0 / n  # padding queries see nothing: the model gives them some row
    q = torch.rand(2, 3, n, generator=g) + 0.5
    real = torch.ones(2, 3, n, dtype=torch.bool)
    real[1, :, :3] = False
    return p, s, q, real


def _at(res, real):
    return {k: v[real] for k, v in res.items()}


def _check_half(got, want, dtype):
    """Two paths on the same half-precision inputs: the one-pass kernels take log p and the
    rest's renormalization partly from the pattern, the two functions from the scores, and a
    half pattern is softmax of its scores only to its own rounding: the values agree to a few
    units of the half type's eps, not to float32's (a top-mass count may move by one key)."""
    eps = torch.finfo(dtype).eps
    counts = ("k_eff_top90", "k_eff_top90_nosink")
    _check({k: v for k, v in got.items() if k not in counts} | {k: want[k] for k in counts}, want,
           atol=2 * eps, rtol=2 * eps)
    for name in counts:
        g, w = got[name], want[name]
        assert torch.equal(g.isnan(), w.isnan()), name
        d = (g - w).abs().nan_to_num(0.0)
        assert d.max() <= 1 and (d == 0).float().mean() > 0.9, name


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", ["compiled", "numpy"])
@pytest.mark.parametrize("inf", [False, True])
def test_half_precision_takes_the_one_pass_kernels(dtype, backend, inf, monkeypatch):
    """bfloat16 / float16 patterns with their scores run the one-pass kernels (the two functions
    would raise here; the padded rows' blocks come from the block kernels) and agree with the
    two functions on the same inputs."""
    p, s, q, real = _half(40, dtype, inf=inf)
    want = _two_pass(p, s, q, 0.9)
    calls = []
    real_rows = compiled.capture_rows
    monkeypatch.setattr(compiled, "capture_rows", lambda *a, **k: calls.append(a[0].shape) or real_rows(*a, **k))

    row_metrics = KB.row_metrics

    def refuse(*a, **k):  # the two functions on the whole pattern (the flagged rows' blocks pass)
        if a[0].shape == p.shape:
            raise AssertionError("the half-precision capture took the two-function path")
        return row_metrics(*a, **k)

    monkeypatch.setattr(KF, "row_metrics", refuse)
    monkeypatch.setattr(KF, "sink_excluded_metrics", refuse)
    # small blocks: several query blocks, each read into float32 over its own causal key extent
    got = KF.capture_row_metrics(p, s, q, backend=backend, block_elements=2 * 3 * 37 * 8)
    monkeypatch.undo()
    if backend == "compiled":
        assert calls == [(6, 8, 8), (6, 8, 16), (6, 8, 24), (6, 8, 32), (6, 5, 37)]
        assert all(v.dtype == torch.float32 for v in got.values())
    else:
        assert not calls
    _check_half(_at(got, real), _at(want, real), dtype)


@pytest.mark.parametrize("backend", ["compiled", "numpy"])
def test_bfloat16_gives_the_float32_values_of_its_upcast(backend):
    """bfloat16 blocks are read into float32 and measured as a float32 pattern would be: the
    values of the float32 path on the upcast inputs (float16 differs only where its subnormals
    are kept out of log p and of the rest; see below)."""
    p, s, q, real = _half(41, torch.bfloat16)
    got = KF.capture_row_metrics(p, s, q, backend=backend, block_elements=2000)
    up = KF.capture_row_metrics(p.float(), s.float().masked_fill(~M.visible_from_scores(s), MIN), q,
                               backend=backend, block_elements=2000)
    _check(_at(got, real), _at(up, real), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["compiled", "numpy"])
def test_float16_subnormal_first_keys_and_rests(backend):
    """A float16 p below 6.1e-5 keeps few digits: log p is not taken from such a first key, and a
    rest made of such keys is renormalized from the scores. Against softmax of the same float16
    scores in float64, the errors are the pattern's own rounding (before: 0.7 nats of entropy)."""
    for sink in (-6.0, 12.0):  # a first key far below the others; a sink that leaves a tiny rest
        p, s, q, real = (x[:1] for x in _half(42, torch.float16, n=300, sink=sink))  # unpadded
        s64 = s.double().masked_fill(~M.visible_from_scores(s), float("-inf"))
        truth = _two_pass(torch.softmax(s64, dim=-1), s64, q, 0.9)
        got = KF.capture_row_metrics(p, s, q, backend=backend)
        for name in ("entropy", "entropy_nosink", "max_attn_nosink", "local_gain"):
            t = truth[name][real]
            d = (got[name][real].double() - t).abs()
            assert d.nan_to_num(0.0).max() < 2e-3, (name, sink, float(d.nan_to_num(0.0).max()))
        if sink > 0:
            assert (p[..., 1:, 1:].float().sum(-1) < 300 * torch.finfo(torch.float16).tiny).any()


@pytest.mark.numba
def test_a_bfloat16_model_capture_equals_its_hook_pattern(monkeypatch):
    """A tiny random-init model in bfloat16: the capture (one-pass kernels on half blocks; with
    the scores where the layout finds them faithful, else log p) against the two functions on
    hook_pattern; and the compiled kernel on its half pattern and scores of a left-padded batch."""
    model = bridge_from_hf(tiny_hf_model("llama_gqa").to(torch.bfloat16))
    faithful = attention_layout(model).scores_faithful
    n = 40
    tokens = torch.randint(0, model.cfg.d_vocab, (2, n), generator=torch.Generator().manual_seed(1))
    fused, calls = [], []
    real_fused, real_rows = KF._fused_block, compiled.capture_rows
    monkeypatch.setattr(KF, "_fused_block", lambda *a: fused.append(real_fused(*a)) or fused[-1])
    monkeypatch.setattr(compiled, "capture_rows", lambda *a, **k: calls.append(a[0].dtype) or real_rows(*a, **k))
    tm = capture_metrics(model, tokens)
    assert (calls and all(d == np.float32 for d in calls)) if faithful else (fused and all(fused))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for i, l in enumerate(tm.layers):
        p, s = cache[hook_name(l, "pattern")], cache[hook_name(l, "attn_scores")]
        assert p.dtype == s.dtype == torch.bfloat16
        want = _two_pass(p, s if faithful else None, tm.q_norm[:, i], 0.9)
        got = {name: getattr(tm, name)[:, i] for name in want}
        if faithful:
            _check_half(got, want, torch.bfloat16)
        else:  # log p on both paths: the same float32 values
            _check(got, want)
    # left padding (batch item 1): the rows without their first key are flagged to the two functions
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :5] = 0
    tm = capture_metrics(model, tokens, attention_mask=mask)  # its q_norm
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    real = mask.bool()[:, None, :].expand(2, model.cfg.n_heads, n)
    calls.clear()
    for i, l in enumerate(tm.layers):
        p, s = cache[hook_name(l, "pattern")], cache[hook_name(l, "attn_scores")]
        got = KF.capture_row_metrics(p, s, tm.q_norm[:, i], backend="compiled")
        want = _two_pass(p, s, tm.q_norm[:, i], 0.9)
        _check_half(_at(got, real), _at(want, real), torch.bfloat16)
    assert calls


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_without_scores_is_the_two_functions_in_float32(dtype):
    """Without scores both paths take the logits as log p of the same half pattern: float32
    agreement (the fused NumPy kernel reads each half block into float32 once)."""
    p, _, q, _ = _half(43, dtype)
    p, q = p[:1], q[:1]  # unpadded
    _check(KF.capture_row_metrics(p, None, q, block_elements=2000), _two_pass(p, None, q, 0.9),
           exact_counts=False)
