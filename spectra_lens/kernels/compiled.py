"""The capture's row kernel compiled with Numba: every metric of `kernels.fused.capture_row_metrics`
for CPU patterns with their scores (float32/float64; half precision one float32 block at a time).

The NumPy kernel (`kernels.fused._fused_block`) makes about twenty passes over each block; this one
reads each row's visible keys once and takes no logarithm per key. With x = s − s_0 (the logits
about the first key's) and p = softmax(s) over the visible keys, log p_j = x_j − L where
L = lse − s_0 = −log p_0 (or, where p_0 is below `anchor`, 1e-30 by default, from the row's
largest p_m), so

    H = L · Σp − Σ p x,     H' (without key 0) = −(Σ_{j≥1} p x − L R) / R + log R,
    local gain = −Σ p (x − d)²  with d = L − H   (= −Var_p(s), as −Σ p (log p + H)²),

the last expanded from Σ p x and Σ p x², and the direction spread from the visible keys' Σ x
and Σ x², with every sum in float64. The top-mass counts select among the keys that can reach
the mass, without sorting the row (`_top_one`). Values equal those of the NumPy kernel to
float32 rounding (tested); a count can differ only where the top mass meets its threshold within
float64 rounding.

Numba is a dependency; where it is missing, or SPECTRA_LENS_NUMBA=0 is set, `AVAILABLE` is False
and the capture runs the NumPy kernel.
"""

import os
import threading
from importlib.util import find_spec
from typing import no_type_check

import numpy as np

#: Whether `capture_row_metrics` and the gain's α rows run these kernels by default on the CPU.
#: Numba is imported (about 110 MB of resident memory with LLVM) only when a kernel first runs.
AVAILABLE = find_spec("numba") is not None and os.environ.get("SPECTRA_LENS_NUMBA", "1") != "0"

#: Rows flagged for the two-function path: the first key is hidden in the row (left padding),
#: or nothing is visible.
FLAG_ROW = 1
#: Rows flagged for the sink-excluded metrics from the scores: the rest underflowed (R < min_rest).
FLAG_REST = 2

#: The order of the kernel's outputs (the names of `kernels.fused.capture_row_metrics`'s sums).
OUT_NAMES = ("entropy", "n_visible", "max_attn", "k_eff_pr", "k_eff_top90", "local_gain",
             "entropy_ns", "max_attn_ns", "k_eff_pr_ns", "k_eff_top90_ns", "dir_spread")


_COMPILED: dict = {}
#: Kernels that call other kernels: those are compiled first and bound to their global names
#: (the Python functions are kept in _PYTHON).
_CALLS = {"_select_count": ("_sort_descending",), "_sorted_counts": ("_sort_descending",),
          "_top_one": ("_select_count", "_sorted_counts"),
          "_rows": ("_row_one", "_top_one")}
_PYTHON: dict = {}
_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A buffer of `shape` whose contents are undefined, reused by this thread's later calls
    (each name holds the largest size asked for so far, until the thread ends: up to ~1 MB per
    name for a layer of the default model at 8 × 128 tokens). A fresh allocation of a block's size
    (~1 MB) per layer comes from mmap where the allocator's threshold is low, and its page
    faults cost about 1 ms per layer of the default model at 8 × 128 tokens (30 layers: ~30 ms
    of a 3 s pass, measured with MALLOC_MMAP_THRESHOLD_=131072)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[name] = np.empty(max(nbytes, 1), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _kernel(fn):
    """`fn` compiled by Numba on first use (the machine code is cached on disk across processes).

    fastmath "reassoc"/"contract" lets LLVM vectorize the sums; no "nnan"/"ninf": NaN marks
    undefined metrics and masked scores may be −inf. error_model "numpy": x / 0 is inf or NaN.
    """
    k = _COMPILED.get(fn.__name__)
    if k is None:
        if not AVAILABLE:
            raise RuntimeError("the compiled kernels need numba (pip install 'spectra-lens[fast]') "
                               "and SPECTRA_LENS_NUMBA not 0")
        import numba

        for name in _CALLS.get(fn.__name__, ()):  # Numba resolves a callee by its global name
            _PYTHON.setdefault(name, globals()[name])
            globals()[name] = _kernel(_PYTHON[name])

        options = dict(nogil=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})
        try:
            k = numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # no writable cache directory (NUMBA_CACHE_DIR sets one): compile per process
            k = numba.njit(**options)(fn)
        _COMPILED[fn.__name__] = k
    return k


@no_type_check  # compiled (`_kernel`): the test suite's runtime type checker must not wrap it
def _row_one(P, S, Pbits, qn, thr, floor, min_rest, rest_tiny, anchor, out, flag, extent, b, q):
    """Every metric but the top-mass counts of row (b, q); `extent` [n_b, n_q] gets each row's
    last visible key + 1 and `out[11]`, `out[12]` its p_0 and R = Σ_{j≥1} p_j. Rows whose R is
    below min_rest or below rest_tiny per visible key are flagged FLAG_REST.

    The largest p_j (j ≥ 1) is taken from `Pbits`, P's bits as integers: p ≥ 0 orders as its
    bits, and an integer max reduction lets the row's loop vectorize, which a float max without
    "nnan" does not (−25% time of this kernel on the default model). A NaN's bits are above
    every number's, so a NaN p makes the max NaN."""
    n_b, n_q, n_k = P.shape
    nan = np.nan
    # the visible keys lie in [0, e): the causal extent when no key after it is visible
    # (a count without early exit, which vectorizes), then back to the last visible key
    e = min(n_k, q + 1 + n_k - n_q)
    later = 0
    for j in range(e, n_k):
        later += S[b, q, j] > thr
    if later:
        e = n_k
    while e > 0 and not S[b, q, e - 1] > thr:
        e -= 1
    extent[b, q] = e
    if e == 0 or not S[b, q, 0] > thr:
        flag[b, q] = FLAG_ROW
        return
    # One pass: the sums off the first key, and the moments of the logits about the
    # first key's (x = s − s_0; p-weighted, and over the visible keys), from which the
    # spreads about the row's own centers follow (float64: no cancellation that matters).
    s0 = max(np.float64(S[b, q, 0]), floor)
    n_vis = 1
    R = 0.0
    B1 = 0.0
    mb = Pbits[b, q, 0] & 0  # the bits of the largest p_j, j ≥ 1
    G1 = 0.0  # Σ p x
    G2 = 0.0  # Σ p x²
    V1 = 0.0  # Σ_visible x
    V2 = 0.0  # Σ_visible x²
    for j in range(1, e):
        pj = np.float64(P[b, q, j])
        sj = np.float64(S[b, q, j])
        v = sj > thr
        x = max(sj, floor) - s0
        n_vis += v
        xv = x if v else 0.0
        V1 += xv
        V2 += xv * xv
        R += pj
        B1 += pj * pj
        g = pj * x
        G1 += g
        G2 += g * x
        mb = max(mb, Pbits[b, q, j])
    P0 = np.float64(P[b, q, 0])
    max1 = 0.0
    if mb > 0:  # the key that holds it
        j = 1
        while Pbits[b, q, j] != mb:
            j += 1
        max1 = np.float64(P[b, q, j])
    total = P0 + R
    # L = lse − s_0, from the first key where its p is a normal number, else the largest
    if P0 >= anchor or (P0 > 0 and P0 >= max1):
        L = -np.log(P0)
    elif max1 > 0:  # j: the key of max1 (above)
        L = max(np.float64(S[b, q, j]), floor) - s0 - np.log(max1)
    else:
        L = 0.0
    H = L * total - G1  # −Σ p log p with log p = x − L
    d = L - H  # the p-weighted mean of x
    G = max(G2 - 2.0 * d * G1 + d * d * total, 0.0)
    D = max(V2 - V1 * V1 / n_vis, 0.0)
    out[0, b, q] = H
    out[1, b, q] = n_vis
    out[2, b, q] = max(P0, max1)
    out[3, b, q] = 1.0 / (B1 + P0 * P0)
    out[5, b, q] = -G
    out[10, b, q] = np.sqrt(D / n_vis) / np.float64(qn[b, q])
    out[11, b, q] = P0
    out[12, b, q] = R
    if n_vis <= 1:  # nothing visible after the first key
        out[6, b, q] = nan
        out[7, b, q] = nan
        out[8, b, q] = nan
    else:
        out[6, b, q] = -(G1 - L * R) / R + np.log(R)  # Σ_{j≥1} p log p = G1 − L R
        out[7, b, q] = max1 / R
        out[8, b, q] = R * R / B1
        if R < min_rest or R < rest_tiny * n_vis:
            flag[b, q] = FLAG_REST


#: Candidate sets this small are sorted by insertion; larger ones are partitioned first.
_SMALL = 32


@no_type_check  # compiled (`_kernel`): the test suite's runtime type checker must not wrap it
def _sort_descending(buf, n):
    """buf[:n] sorted in descending order, by insertion (for a few values)."""
    for i in range(1, n):
        v = buf[i]
        j = i - 1
        while j >= 0 and buf[j] < v:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = v


@no_type_check  # compiled (`_kernel`): the test suite's runtime type checker must not wrap it
def _select_count(buf, n, thr, tmp, low):
    """The fewest largest values of buf[:n] (float64, ≥ 0) whose float64 sum reaches thr; −1
    where all of them do not. Destroys buf, tmp and low (each of length ≥ n).

    A quickselect on the mass: partition about a pivot (the median of three values at spread
    positions, so that the keys' order, e.g. large first and last keys, does not bias it) into
    the values above it (into tmp), equal to it and below it (into low); if the mass above
    reaches what is left of thr the count lies among them, else they are all counted, the
    pivot's copies are added one by one, and the search goes on below. The partition is free of
    branches (a comparison's 0 or 1 moves the write position and weighs the sum), and writes to
    arrays other than the one it reads (a store into it would feed the next load). The last few
    values are sorted by insertion and walked in descending order."""
    above = 0.0
    cnt = 0
    it = 0
    while n > _SMALL:
        h = it * 3 * 40503 + 1
        it += 1
        a = buf[h % n]
        b = buf[(h + 40503) % n]
        c = buf[(h + 2 * 40503) % n]
        piv = max(min(a, b), min(max(a, b), c))
        m_hi = 0.0
        n_hi = 0
        n_lo = 0
        for j in range(n):
            v = buf[j]
            gt = 1 if v > piv else 0
            lt = 1 if v < piv else 0
            tmp[n_hi] = v
            n_hi += gt
            low[n_lo] = v
            n_lo += lt
            m_hi += v * gt
        if above + m_hi >= thr:  # the count lies among the values above the pivot
            buf, tmp = tmp, buf
            n = n_hi
            continue
        above += m_hi
        cnt += n_hi
        for _ in range(n - n_hi - n_lo):  # the pivot's copies, one at a time
            above += piv
            cnt += 1
            if above >= thr:
                return cnt
        buf, low = low, buf
        n = n_lo
    _sort_descending(buf, n)
    for i in range(n):
        above += buf[i]
        cnt += 1
        if above >= thr:
            return cnt
    return -1


#: Candidate sets up to this size are sorted by insertion and walked (both counts at once).
_SORT_UP_TO = 64
#: Histogram buckets of the top-mass counts: a float64's bits >> 48 (exponent and 4 mantissa
#: bits, 1/16 of an octave each).
_BUCKET_SHIFT = 48
#: At most this many buckets (128 octaves below 1); smaller values share the lowest.
_BUCKETS = 2048


@no_type_check  # compiled (`_kernel`): the test suite's runtime type checker must not wrap it
def _sorted_counts(buf, n, p0, lim, thr_rest):
    """Both counts from buf[:n] (every candidate and p0) sorted descending by insertion: the
    fewest leading values reaching lim, and the same skipping one value equal to p0 (the first
    key) against thr_rest; −1 where a sum never does."""
    _sort_descending(buf, n)
    c_full = -1
    c_rest = -1
    acc = 0.0
    acc_r = 0.0
    k_r = 0
    skipped = False
    for t in range(n):
        x = buf[t]
        acc += x
        if c_full < 0 and acc >= lim:
            c_full = t + 1
        if c_rest < 0:
            if not skipped and x == p0:
                skipped = True
            else:
                acc_r += x
                k_r += 1
                if acc_r >= thr_rest:
                    c_rest = k_r
        if c_full >= 0 and c_rest >= 0:
            break
    return c_full, c_rest


@no_type_check  # compiled (`_kernel`): the test suite's runtime type checker must not wrap it
def _top_one(P, extent, P0, R, n_vis, flag, lim, n_k, full, rest, cand, buf, gat, tmp, low, hist_m, hist_c,
             b, q):
    """k_eff_top90 of row (b, q) of P [n_b, n_q, n] over its keys [0, extent): `full` the fewest
    largest p whose float64 sum reaches lim, `rest` the same without the first key (mass P0)
    against lim · R (R = Σ_{j≥1} p_j); n_k where a row never reaches its threshold, NaN for
    `rest` where nothing is visible after the first key (n_vis ≤ 1). A row flagged FLAG_ROW is
    skipped.

    No sort of the row. The keys whose p lies below c = (T − thr) / (number of keys) cannot be
    among the largest ones that reach thr (together they hold less than T − thr, with T the
    row's mass), so only the keys at or above c (the lower of the two counts' c, times 0.999
    against rounding) are copied, once, into `cand`. A few candidates are sorted and walked; more
    go into a histogram of mass and count by the top bits of each value (1/16 of an octave per
    bucket; two interleaved copies, so that a run of values in one bucket does not wait on its
    own sums), which the walk from the top bucket down narrows to the bucket where each count's
    mass crosses its threshold (one pass gathers both buckets' values); `_select_count` finds
    each count among them. Buffers: `cand`, `buf`, `gat`, `tmp`, `low` float64 of length
    ≥ n + 1; `hist_m`, `hist_c` float64 and int64 of length ≥ 2 · _BUCKETS."""
    one = np.float64(1.0)
    e = extent[b, q]
    if flag[b, q] == FLAG_ROW or e == 0:
        return
    p0 = P0[b, q]
    r = R[b, q]
    thr_rest = lim * r
    need_rest = n_vis[b, q] > 1
    need_full = p0 + r >= lim
    rest[b, q] = np.nan if not need_rest else n_k
    full[b, q] = n_k
    if need_rest and thr_rest <= 0.0:  # the first key after key 0 reaches it
        rest[b, q] = 1
        need_rest = False
    if not (need_rest or need_full):
        return
    c = np.inf
    if need_full:
        c = min(c, (p0 + r - lim) / e)
    if need_rest:
        c = min(c, (r - thr_rest) / max(e - 1, 1))
    c = max(0.999 * c, 1e-300)
    m = 0
    for j in range(1, e):
        v = np.float64(P[b, q, j])
        cand[m] = v
        m += v >= c
    if m + 1 <= _SORT_UP_TO:
        for i in range(m):
            buf[i] = cand[i]
        buf[m] = p0
        kf, kr = _sorted_counts(buf, m + 1, p0, lim, thr_rest)
        if need_full and kf >= 0:
            full[b, q] = kf
        if need_rest and kr >= 0:
            rest[b, q] = kr
        return
    bits = cand.view(np.int64)
    k_hi = one.view(np.int64) >> _BUCKET_SHIFT  # p ≤ 1
    k_lo = max(np.int64(np.float64(c).view(np.int64) >> _BUCKET_SHIFT), k_hi - (_BUCKETS - 1))
    nb = k_hi - k_lo + 1  # values below bucket 0 are counted in it
    for i in range(2 * nb):
        hist_m[i] = 0.0
        hist_c[i] = 0
    for j in range(0, m - 1, 2):  # two copies: even and odd positions
        i0 = min(max((bits[j] >> _BUCKET_SHIFT) - k_lo, 0), nb - 1)
        i1 = min(max((bits[j + 1] >> _BUCKET_SHIFT) - k_lo, 0), nb - 1) + nb
        hist_m[i0] += cand[j]
        hist_c[i0] += 1
        hist_m[i1] += cand[j + 1]
        hist_c[i1] += 1
    if m % 2:
        i0 = min(max((bits[m - 1] >> _BUCKET_SHIFT) - k_lo, 0), nb - 1)
        hist_m[i0] += cand[m - 1]
        hist_c[i0] += 1
    b0 = min(max((np.float64(p0).view(np.int64) >> _BUCKET_SHIFT) - k_lo, 0), nb - 1)
    acc_r = 0.0
    cnt_r = 0
    at_r = -1
    acc_f = 0.0
    cnt_f = 0
    at_f = -1
    for i in range(nb - 1, -1, -1):
        mass = hist_m[i] + hist_m[i + nb]
        count = hist_c[i] + hist_c[i + nb]
        if need_rest and at_r < 0:
            if acc_r + mass >= thr_rest:
                at_r = i
            else:
                acc_r += mass
                cnt_r += count
        if need_full and at_f < 0:
            mf = mass + p0 if i == b0 else mass
            if acc_f + mf >= lim:
                at_f = i
            else:
                acc_f += mf
                cnt_f += count + (i == b0)
        if (at_r >= 0 or not need_rest) and (at_f >= 0 or not need_full):
            break
    n_r = 0  # one pass gathers both crossing buckets' values (at −1: none)
    n_f = 0
    for j in range(m):
        i0 = min(max((bits[j] >> _BUCKET_SHIFT) - k_lo, 0), nb - 1)
        v = cand[j]
        buf[n_r] = v
        n_r += 1 if i0 == at_r else 0
        gat[n_f] = v
        n_f += 1 if i0 == at_f else 0
    if at_r >= 0:  # else not reached (rounding): left at n_k
        k = _select_count(buf, n_r, thr_rest - acc_r, tmp, low)
        if k >= 0:
            rest[b, q] = cnt_r + k
    if at_f >= 0:
        if b0 == at_f:
            gat[n_f] = p0
            n_f += 1
        k = _select_count(gat, n_f, lim - acc_f, tmp, low)
        if k >= 0:
            full[b, q] = cnt_f + k


@no_type_check  # compiled (`_kernel`): the test suite's runtime type checker must not wrap it
def _rows(P, S, Pbits, qn, thr, floor, min_rest, rest_tiny, anchor, out, flag, extent,
          top, lim, n_k, full, rest, cand, buf, gat, tmp, low, hist_m, hist_c):
    """`_row_one`, then (with `top`) `_top_one`, on every row: the second reads the row while
    the first has left it in the cache."""
    n_b, n_q, _ = P.shape
    for b in range(n_b):
        for q in range(n_q):
            _row_one(P, S, Pbits, qn, thr, floor, min_rest, rest_tiny, anchor, out, flag, extent, b, q)
            if top:
                _top_one(P, extent, out[11], out[12], out[1], flag, lim, n_k, full, rest, cand, buf, gat,
                         tmp, low, hist_m, hist_c, b, q)


def capture_rows(P: np.ndarray, S: np.ndarray, qn: np.ndarray, *, thr: float, floor: float,
                 top_mass: float | None, tol: float, min_rest: float,
                 n_keys: int | None = None, anchor: float = 1e-30,
                 rest_tiny: float = 0.0, reuse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The kernels on C-contiguous P, S [n_b, n_q, n_k] (float32 or float64) and query norms
    qn [n_b, n_q]. Returns (out [len(OUT_NAMES), n_b, n_q] float64, flag [n_b, n_q] int8): rows
    flagged FLAG_ROW hold no value, rows flagged FLAG_REST no valid sink-excluded value.

    The top-mass counts select, row by row, among the keys that can reach the mass
    (`_top_one`), without sorting the rows.

    P, S may also be one query block of a longer pattern cut to the block's key extent (the
    causal extent of its last row, or all keys; no visible key after it): each row's causal
    extent is then the whole pattern's (or larger where all keys are kept: the kernel walks back
    to the last visible key), and `n_keys` is the whole rows' length, the count of a row that
    never reaches the top mass (default n_k).

    Blocks read from float16 pass that type's smallest normal number (6.1e-5) as `anchor` (log p
    is never taken from a subnormal p_0, whose few digits would shift every log p) and as
    `rest_tiny` (a rest below it per visible key, whose keys are float16 subnormals, is flagged
    FLAG_REST and measured from the scores).

    With `reuse` the two arrays returned are this thread's scratch buffers, valid until its next
    call with `reuse` (for callers that copy them at once); the kernels' own working arrays are
    always reused.
    """
    n_b, n_q, _ = P.shape
    n_keys = P.shape[2] if n_keys is None else n_keys
    shape = (len(OUT_NAMES) + 2, n_b, n_q)
    out = _scratch("out", shape, np.float64) if reuse else np.empty(shape, np.float64)
    flag = _scratch("flag", (n_b, n_q), np.int8) if reuse else np.empty((n_b, n_q), np.int8)
    flag.fill(0)
    extent = _scratch("extent", (n_b, n_q), np.int64)  # every row written by the kernel
    bits = P.view(np.int32 if P.dtype == np.float32 else np.int64)
    i_top, i_top_ns = OUT_NAMES.index("k_eff_top90"), OUT_NAMES.index("k_eff_top90_ns")
    width = P.shape[2] + 1 if top_mass is not None else 1
    bufs = [_scratch(name, (width,), np.float64) for name in ("cand", "buf", "gat", "tmp", "low")]
    bufs += [_scratch("hist_m", (2 * _BUCKETS,), np.float64), _scratch("hist_c", (2 * _BUCKETS,), np.int64)]
    lim = top_mass - tol if top_mass is not None else 0.0
    _kernel(_rows)(P, S, bits, qn, thr, floor, min_rest, rest_tiny, anchor, out, flag, extent,
                   top_mass is not None, lim, n_keys, out[i_top], out[i_top_ns], *bufs)
    if top_mass is None:
        out[i_top] = np.nan
        out[i_top_ns] = np.nan
    return out[:len(OUT_NAMES)], flag


# --------------------------------------------------------------------------- the gain's α rows

#: e^x is taken as 0 below this exponent: a term under e^-110 (< 2e-48) changes no float64 sum
#: that holds e^0 = 1, and no count (the sums run over a row's keys in descending order).
EXP_CUT = -110.0
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@no_type_check  # compiled (`_kernel`): the test suite's runtime type checker must not wrap it
def _alpha_rows(A, alphas, lim_frac, n_keys, out, buf, x0, bits, two_n):
    """The sweep metrics of softmax(α·z) per α and row of A [rows, n] (z sorted ascending, the
    masked keys −inf first), into out [5, n_a, rows]: entropy, max p, k_eff_exp, k_eff_pr and
    the top-mass count (`metrics.SWEEP_METRICS`). Per α and row: e_j = exp(α (z_j − max z)) over
    the keys in descending order (e_0 = 1) down to EXP_CUT, Z = Σe, H = log Z − Σ e x / Z,
    max p = 1 / Z, 1 / Σp² = Z² / Σe², and the fewest leading e whose float64 sum reaches
    lim_frac · Z. A row with no visible key (or a NaN) gives NaN and a count of 1.

    e = 2^n · e^f with n = round(x log2 e) and |f| ≤ ln 2 / 2: e^f by its Taylor polynomial of
    degree 9 (relative error below 1e-11), 2^n from its float64 bits (`bits`, seen as floats
    through `two_n`), so that the loops vectorize (a call of the C library's exp does not).
    Buffers: buf, x0, bits [n] (two_n = bits.view(float64))."""
    rows, n = A.shape
    n_a = alphas.shape[0]
    for r in range(rows):
        a = A[r]
        lo = 0  # the first visible key (binary search over the −inf prefix)
        hi = n
        while lo < hi:
            mid = (lo + hi) // 2
            if a[mid] == -np.inf:
                lo = mid + 1
            else:
                hi = mid
        top = np.float64(a[n - 1]) if lo < n else np.nan
        if not np.isfinite(top):
            for ia in range(n_a):
                for k in range(4):
                    out[k, ia, r] = np.nan
                out[4, ia, r] = 1.0
            continue
        n_fin = n - lo
        for j in range(n_fin):  # z − max z in descending order, float64
            x0[j] = np.float64(a[n - 1 - j]) - top
        for ia in range(n_a):
            al = alphas[ia]
            x_cut = EXP_CUT / al  # keys below it: e < e^EXP_CUT
            lo2 = 0  # the first key below x_cut (binary search; key 0 is never below)
            hi2 = n_fin
            while lo2 < hi2:
                mid = (lo2 + hi2) // 2
                if x0[mid] >= x_cut:
                    lo2 = mid + 1
                else:
                    hi2 = mid
            m = lo2
            Z = 0.0
            SX = 0.0
            SE = 0.0
            for j in range(m):  # e^f, and 2^n as bits
                t = al * x0[j] * _LOG2E
                nn = np.floor(t + 0.5)
                f = (t - nn) * _LN2
                q = 1.0 / 362880.0
                q = q * f + 1.0 / 40320.0
                q = q * f + 1.0 / 5040.0
                q = q * f + 1.0 / 720.0
                q = q * f + 1.0 / 120.0
                q = q * f + 1.0 / 24.0
                q = q * f + 1.0 / 6.0
                q = q * f + 0.5
                q = q * f + 1.0
                q = q * f + 1.0
                buf[j] = q
                bits[j] = (np.int64(nn) + 1023) << 52
            for j in range(m):
                e = buf[j] * two_n[j]
                x = al * x0[j]
                buf[j] = e
                Z += e
                SX += e * x
                SE += e * e
            lim = lim_frac * Z
            c = n_keys
            acc = 0.0
            for j in range(m):
                acc += buf[j]
                if acc >= lim:
                    c = j + 1
                    break
            H = np.log(Z) - SX / Z
            out[0, ia, r] = H
            out[1, ia, r] = 1.0 / Z
            out[2, ia, r] = np.exp(H)
            out[3, ia, r] = Z * Z / SE
            out[4, ia, r] = min(c, n_keys)


def alpha_row_sums(z: np.ndarray, alphas: tuple[float, ...], *, top_mass: float,
                   tol: float) -> np.ndarray:
    """`_alpha_rows` on z [rows, n_keys] (float32, masked −inf): [5, n_a, rows] float64."""
    rows, n_keys = z.shape
    A = np.sort(z, axis=-1)
    out = np.empty((5, len(alphas), rows))
    bits = np.empty(max(n_keys, 1), np.int64)
    _kernel(_alpha_rows)(A, np.asarray(alphas, np.float64), top_mass - tol, n_keys, out,
               np.empty(max(n_keys, 1)), np.empty(max(n_keys, 1)), bits, bits.view(np.float64))
    return out
