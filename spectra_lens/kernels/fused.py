"""The capture's one-pass engine: `row_metrics` and `sink_excluded_metrics` of a block in one read.

`capture_row_metrics` chooses its path by `backend`: "compiled" (numba, `kernels.compiled`),
"numpy" (`_fused_block`, the reference of the compiled kernel) or "torch" (the two functions of
`kernels.blocked`); every path gives the definitions' values of `spectra_lens.metrics`
(tests/capture/test_kernels_fused.py, test_kernels_compiled.py).
"""

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from spectra_lens.errors import SpectraError
from spectra_lens.kernels import compiled
from spectra_lens.kernels.blocked import (
    _SCORE_FLOOR,
    _SINK_NAMES,
    _TOP_TOL,
    CPU_BLOCK_ELEMENTS,
    _key_extent,
    _row_block,
    _row_results,
    _sink_block,
    _sink_results,
    _top_count_sorted,
    _top_counts_sorted,
    row_metrics,
    sink_excluded_metrics,
)
from spectra_lens.metrics import _f32

__all__ = ["capture_row_metrics"]

_NOSINK_MIN_MASS = 1e-30  # below this, the rest of a row is renormalized from its scores
_NUMPY_FLOATS = (torch.float32, torch.float64)  # the compiled kernel reads these in place
_CPU_FLOATS = _NUMPY_FLOATS + (torch.float16, torch.bfloat16)  # these in float32 blocks
_MIN_BLOCK_ROWS = 256  # rows (batch × head × query) per block of capture_row_metrics by default


def _subnormal_below(dtype: torch.dtype) -> float:
    """float16's smallest normal number (its p below it keep few digits), 0 for the types whose
    range is float32's or wider."""
    return torch.finfo(torch.float16).tiny if dtype == torch.float16 else 0.0


def capture_row_metrics(
    pattern: Float[Tensor, "*batch query_pos key_pos"],
    scores: Float[Tensor, "*batch query_pos key_pos"] | None,
    q_norm: Float[Tensor, "*batch query_pos"],
    *,
    top_mass: float | None = 0.9,
    block_elements: int | None = None,
    backend: str | None = None,
) -> dict[str, Float[Tensor, "*batch query_pos"]]:
    """`row_metrics` and `sink_excluded_metrics` together (`CAPTURE_ROW_METRICS`), in one pass.

    The same values as the two functions (tested), computed in one read of each query block
    where the block allows it: a CPU pattern ("numpy" backend; half precision is read into a
    float32 copy of the block) whose first key is visible in every row of the block (no left
    padding). There the pattern without its first key is p_j / R with R = Σ_{j≥1} p_j summed
    directly (not 1 − p_0, so a sink near 1 loses no digits), and its metrics follow from the
    sums of the full row's: H' = −Σ_{j≥1} p_j log p_j / R + log R, max' = max_{j≥1} p_j / R,
    1 / Σ p'² = R² / Σ_{j≥1} p_j²; both top-mass counts come from one sort of the full row
    (removing p_0 from a sorted row shifts the cumulative sums after its rank by p_0). Rows whose
    rest underflows (R < 1e-30; in float16 also R below its smallest normal number, 6.1e-5, per
    visible key) are renormalized from their scores instead, as `without_first_key` does. Other blocks (left
    padding) and other devices go through the two functions' block kernels.

    `backend`: "compiled" (the CPU default where numba is available and the scores are given:
    `spectra_lens.kernels.compiled`, the same values row by row, its flagged rows from the two
    functions; a half-precision pattern and its scores are read one query block at a time into
    float32 copies over the block's key extent, never the whole pattern at once), "numpy" (the
    kernel above, the reference) or "torch" (the two functions).

    bfloat16 inputs give the values of the same path on their float32 upcast (float16 too, but
    for its subnormal p, above). With scores, half inputs differ from the two functions' values
    on the same inputs by the inputs' own rounding (a half pattern is softmax of its half scores
    only to its rounding, and the paths take log p and the rest's renormalization from one or
    the other): a few units of the half type's eps, not float32's (tested).
    """
    if top_mass is not None and not 0.0 < top_mass <= 1.0:
        raise SpectraError(f"top_mass must be in (0, 1] or None, got {top_mass!r}")
    lead, (n_q, n_k) = pattern.shape[:-2], pattern.shape[-2:]
    device = pattern.device
    compilable = (device.type == "cpu" and scores is not None and pattern.dtype in _CPU_FLOATS
                  and scores.dtype in _CPU_FLOATS)
    if backend is None:
        backend = ("compiled" if compilable and compiled.AVAILABLE
                   else "numpy" if device.type == "cpu" else "torch")
    elif backend == "compiled" and not (compilable and compiled.AVAILABLE):
        have = "" if scores is not None else " without scores"
        raise SpectraError(f"backend 'compiled' needs numba (available: {compiled.AVAILABLE}) and a "
                           f"float16/bfloat16/float32/float64 CPU pattern with its scores; got a "
                           f"{pattern.dtype} pattern on {device}{have}"
                           + ("" if scores is None else f" with {scores.dtype} scores"))
    fused = (backend in ("numpy", "compiled") and device.type == "cpu" and pattern.dtype in _CPU_FLOATS
             and (scores is None or scores.dtype in _CPU_FLOATS))
    if not fused:
        return (row_metrics(pattern, scores, top_mass=top_mass, block_elements=block_elements, backend=backend)
                | sink_excluded_metrics(pattern, scores, q_norm, top_mass=top_mass,
                                        block_elements=block_elements, backend=backend))
    p3 = pattern.reshape(-1, n_q, n_k)
    s3 = None if scores is None else scores.reshape(-1, n_q, n_k)
    qn = q_norm.reshape(-1, n_q)
    n_b = p3.shape[0]
    if block_elements is None:  # at least _MIN_BLOCK_ROWS rows, so that long rows amortize the calls
        rows_per = max(CPU_BLOCK_ELEMENTS // max(1, n_b * n_k), -(-_MIN_BLOCK_ROWS // n_b))
    else:
        rows_per = max(1, block_elements // max(1, n_b * n_k))
    names = ("entropy", "n_visible", "max_attn", "k_eff_pr", "k_eff_top90", "local_gain") + _SINK_NAMES
    # blocks are float32: a float64 mask (≤ float64 min / 2) is −inf there; a half mask
    # (finfo(half).min, or −inf) is below finfo(half).min / 2 in float32 as in half
    thr = max(torch.finfo(s3.dtype).min, torch.finfo(torch.float32).min) / 2 if s3 is not None else 0.0
    if backend == "compiled":
        res = _capture_compiled(p3, s3, qn, thr, top_mass, rows_per)
        return {n: v.reshape(*lead, n_q) for n, v in res.items()}
    out = {n: torch.empty(n_b, n_q, dtype=torch.float32) for n in names}
    with torch.no_grad():
        for q0 in range(0, n_q, rows_per):
            q1 = min(n_q, q0 + rows_per)
            if not _fused_block(p3, s3, qn, q0, q1, out, thr, top_mass):
                _row_block(p3, s3, q0, q1, out, thr, top_mass, backend)
                _sink_block(p3, s3, qn, q0, q1, out, top_mass, backend)
    res = _row_results(out, p3, top_mass) | _sink_results(out, top_mass)
    return {n: v.reshape(*lead, n_q) for n, v in res.items()}


def _capture_compiled(p3, s3, qn, thr, top_mass, rows_per) -> dict[str, Tensor]:
    """`capture_row_metrics` by the compiled kernel (`spectra_lens.kernels.compiled`), row by row; the
    rows it flags (first key hidden; the rest underflowed) from the two functions' blocks."""
    n_b, n_q, _ = p3.shape
    kw = dict(thr=thr, floor=_SCORE_FLOOR, top_mass=top_mass, tol=_TOP_TOL, min_rest=_NOSINK_MIN_MASS)
    with torch.no_grad():
        Q = qn.detach().float().contiguous().numpy()
        if p3.dtype in _NUMPY_FLOATS and s3.dtype in _NUMPY_FLOATS:
            got, flag = compiled.capture_rows(p3.detach().contiguous().numpy(),
                                              s3.detach().contiguous().numpy(), Q,
                                              reuse=True, **kw)  # `got` is copied below
        else:
            got, flag = _compiled_by_block(p3, s3, Q, rows_per, kw)
        out = {n: torch.from_numpy(got[i]).to(torch.float32, copy=True) for i, n in enumerate(compiled.OUT_NAMES)}
        flag = torch.from_numpy(flag)
        for code, names in ((compiled.FLAG_ROW, compiled.OUT_NAMES), (compiled.FLAG_REST, _SINK_NAMES)):
            rows = flag == code
            if not rows.any():
                continue
            qs = rows.any(0).nonzero()[:, 0]
            tmp = {n: torch.empty(n_b, n_q, dtype=torch.float32) for n in compiled.OUT_NAMES}
            for q0 in range(int(qs[0]), int(qs[-1]) + 1, rows_per):
                q1 = min(n_q, q0 + rows_per)
                if code == compiled.FLAG_ROW:
                    _row_block(p3, s3, q0, q1, tmp, thr, top_mass, "numpy")
                _sink_block(p3, s3, qn, q0, q1, tmp, top_mass, "numpy")
            for n in names:
                out[n] = torch.where(rows, tmp[n], out[n])
    return _row_results(out, p3, top_mass) | _sink_results(out, top_mass)


def _compiled_by_block(p3, s3, Q, rows_per, kw) -> tuple[np.ndarray, np.ndarray]:
    """`compiled.capture_rows` on float32 copies of one query block at a time (inputs NumPy
    cannot hold, as bfloat16), each cut to the block's key extent: the whole pattern is never
    copied, and each block is read once. A float16 pattern's subnormal p are not used as the
    anchor of log p, and rests made of them come from the scores (`compiled.capture_rows`)."""
    n_b, n_q, n_k = p3.shape
    got = np.empty((len(compiled.OUT_NAMES), n_b, n_q))
    flag = np.empty((n_b, n_q), np.int8)
    size = n_b * min(rows_per, n_q) * n_k
    tiny = _subnormal_below(p3.dtype)
    buf_p, buf_s = torch.empty(size, dtype=torch.float32), torch.empty(size, dtype=torch.float32)
    for q0 in range(0, n_q, rows_per):
        q1 = min(n_q, q0 + rows_per)
        ext = _key_extent(s3, p3, q0, q1)
        shape, n = (n_b, q1 - q0, ext), n_b * (q1 - q0) * ext
        P = buf_p[:n].view(shape).copy_(p3[:, q0:q1, :ext]).numpy()
        S = buf_s[:n].view(shape).copy_(s3[:, q0:q1, :ext]).numpy()
        got[:, :, q0:q1], flag[:, q0:q1] = compiled.capture_rows(
            P, S, np.ascontiguousarray(Q[:, q0:q1]), n_keys=n_k,
            anchor=max(1e-30, tiny), rest_tiny=tiny, reuse=True, **kw)
    return got, flag


def _fused_block(p3, s3, qn, q0, q1, out, thr, top_mass) -> bool:
    """Every metric of `capture_row_metrics` for query rows [q0, q1) from one float32 read of
    the block; False (nothing written) where the first key is hidden in some row.

    With p = softmax(s) over the visible keys, s = log p + log Z there, so the local gain
    −Var_p(s) = −Σ p (log p + H)² needs no scores; the scores give the visible keys and the
    direction spread. Keys whose p underflows to 0 add nothing to either sum.
    """
    n_b, n_q, n_k = p3.shape
    ext = _key_extent(s3, p3, q0, q1)
    f32 = torch.float32
    rows = n_b * (q1 - q0)
    width = max(ext, 2)  # a second column (zero) where only the first key is in the block

    def block(x: Tensor, fill: float) -> np.ndarray:  # a float32 copy [rows, width]
        if width == ext:
            return x[:, q0:q1, :ext].to(f32, copy=True).reshape(rows, width).numpy()
        b = torch.full((n_b, q1 - q0, width), fill, dtype=f32)
        b[..., :ext] = x[:, q0:q1, :ext]
        return b.view(rows, width).numpy()

    P = block(p3, 0.0)
    if s3 is None:
        V = P > 0
    else:
        S = block(s3, torch.finfo(f32).min)
        V = S > thr
    if not V[:, 0].all():  # left padding: the first visible key is not key 0
        return False
    L = np.maximum(P, np.float32(torch.finfo(f32).tiny))
    np.log(L, out=L)
    if s3 is None:
        S = L
    else:
        np.maximum(S, _SCORE_FLOOR, out=S)  # −inf masks: finite, so that masking by product works
    # Each temporary is freed as soon as it is used, so that few block-sized arrays are alive at
    # once (the allocator's high-water mark, not only the time).
    n_vis = np.count_nonzero(V, axis=-1)
    P0 = P[:, 0]
    PL = P * L
    A1 = PL[:, 1:].sum(-1)  # Σ_{j≥1} p log p
    H = -(A1 + PL[:, 0])
    del PL
    B1 = np.einsum("ij,ij->i", P[:, 1:], P[:, 1:])  # Σ_{j≥1} p²
    R = P[:, 1:].sum(-1).astype(np.float64)  # the mass off the first key, summed directly
    E = S * V  # the logits, 0 at masked keys
    del S
    m_s = (E.sum(-1) / np.maximum(n_vis, 1)).astype(np.float32)
    E -= m_s[:, None]
    E *= V
    del V
    spread = np.sqrt(np.einsum("ij,ij->i", E, E) / np.maximum(n_vis, 1))
    del E
    # −Σ p (log p + H)², about the mean −H (the one-pass Σ p (log p)² − H² loses the small
    # variance of a long, nearly uniform row)
    L += H[:, None]
    np.square(L, out=L)
    gain = -np.einsum("ij,ij->i", P, L)
    del L
    if top_mass is not None:  # one sort of each row gives both top-mass counts and max_{j≥1}
        desc = np.negative(P)
        desc.sort(axis=-1)  # −p ascending
        # p_0 sits after the r0 keys larger than it (the first of them is max_{j≥1} p_j)
        r0 = torch.searchsorted(torch.from_numpy(desc), torch.from_numpy(-P0[:, None]))[:, 0].numpy()
        np.negative(desc, out=desc)  # p descending
        max1 = np.where(r0 > 0, desc[:, 0], desc[:, 1])
    else:
        max1 = P[:, 1:].max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # undefined rows: NaN below
        Hn = -A1 / R + np.log(R)
        maxn = max1 / R
        prn = R * R / B1
    undefined = n_vis <= 1  # nothing visible after the first key
    got = {
        "entropy": H,
        "n_visible": n_vis,
        "max_attn": np.maximum(P0, max1),
        "k_eff_pr": 1.0 / (B1 + P0 * P0),
        "local_gain": gain,
        "entropy_ns": np.where(undefined, np.nan, Hn),
        "max_attn_ns": np.where(undefined, np.nan, maxn),
        "k_eff_pr_ns": np.where(undefined, np.nan, prn),
    }
    if top_mass is not None:
        lim = top_mass - _TOP_TOL
        lims = np.stack([np.full(rows, lim), lim * R, lim * R + P0], axis=-1)
        cnt = _top_counts_sorted(torch.from_numpy(desc), torch.from_numpy(lims)).numpy()
        # up to p_0's rank the rest's cumulative sums are the row's; after it, the row's one key
        # later minus p_0
        ns = np.where(cnt[:, 1] <= r0, cnt[:, 1], cnt[:, 2] - 1)
        ns = np.where((cnt[:, 1] > r0) & (cnt[:, 2] > ext), width + 1, ns)  # never reached
        # A rest below float64's resolution next to p_0 (p_0 the largest key and R < 1e-6):
        # its own cumulative sums, from the sorted row with p_0 (its first key) set to 0.
        tiny = ((r0 == 0) & (R < 1e-6) & ~undefined).nonzero()[0]
        if tiny.size:
            rest = desc[tiny].copy()
            rest[:, 0] = 0.0
            got_rest = _top_count_sorted(torch.from_numpy(rest), torch.from_numpy(lim * R[tiny])).numpy()
            ns[tiny] = got_rest - 1
        full = cnt[:, 0]
        got["k_eff_top90"] = np.where(full > ext, n_k, full)
        got["k_eff_top90_ns"] = np.where(undefined, np.nan, np.where(ns > ext, n_k, ns))
    else:
        got["k_eff_top90"] = np.full(rows, np.nan)
        got["k_eff_top90_ns"] = np.full(rows, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero query norm: inf or NaN
        got["dir_spread"] = spread / _f32(qn[:, q0:q1]).reshape(rows).numpy()
    for n, v in got.items():
        out[n][:, q0:q1] = torch.from_numpy(np.asarray(v, dtype=np.float32)).view(n_b, q1 - q0)
    # the rest underflowed in p, or is made of float16 subnormals: from the scores
    lost = ~undefined & ((R < _NOSINK_MIN_MASS) | (R < _subnormal_below(p3.dtype) * n_vis))
    if lost.any():
        tmp = {n: out[n][:, q0:q1].clone() for n in _SINK_NAMES}
        _sink_block(p3, s3, qn, q0, q1, out, top_mass, "numpy")
        keep = torch.from_numpy(~lost).view(n_b, q1 - q0)
        for n in _SINK_NAMES:
            out[n][:, q0:q1] = torch.where(keep, tmp[n], out[n][:, q0:q1])
    return True
