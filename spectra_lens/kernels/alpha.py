"""The α-sweep engines: the metrics of softmax(α·s) for every α of a grid.

`alpha_metrics` gives per-sequence means over query rows (query blocks of `kernels.blocked`);
on the CPU each block goes through `alpha_row_metrics`, the metrics per row.
`row_alpha_entropy` gives the entropy of softmax(α_i·s_i) with one α per row (the norm
counterfactual of a capture, `metrics.counterfactual_entropy`).

Equal to the definitions of `spectra_lens.metrics` (`entropy`, `max_attention`, `k_eff_exp`,
`k_eff_participation`, `k_eff_top_mass`) of `softmax(α·z)` row by row (tested in
tests/capture/test_kernels_alpha.py); `backend` "compiled" (numba, `kernels.compiled`) or "numpy".
"""

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spectra_lens.errors import SpectraError
from spectra_lens.kernels import compiled
from spectra_lens.kernels.blocked import (
    _SCORE_FLOOR,
    _TOP_TOL,
    ALPHA_CHUNK_ELEMENTS,
    _row_sum,
    query_blocks,
    sorted_row_metrics,
)
from spectra_lens.metrics import SWEEP_METRICS
from spectra_lens.validate import check_alphas

__all__ = ["alpha_metrics", "alpha_row_metrics", "row_alpha_entropy"]

_EXP_FLOOR = -87.0
# `alpha_row_metrics`: rows padded to a multiple of _ALPHA_PAD keys (whole vectors for exp);
# keys per chunk of the chunk sums behind k_eff_top90 (divides _ALPHA_PAD); pattern entries per
# piece of the exponentials and their sums (2**17 floats = 512 KiB: a piece, its exponents and
# its exponentials stay in the cache while they are summed).
_ALPHA_PAD = 16
_ALPHA_KEY_CHUNK = 8
_ALPHA_PIECE = 2**17
_F32_EPS = 2.0**-24  # unit roundoff of float32


def alpha_row_metrics(
    z: Float[Tensor, "rows key_pos"], alphas: Sequence[float], *, chunk_elements: int = ALPHA_CHUNK_ELEMENTS,
    backend: str | None = None,
) -> dict[str, Float[Tensor, "alpha rows"]]:
    """Metrics of softmax(α·z) for every α, per row of z [rows, keys] (float32, masked −inf).

    Sorts each row once (softmax(α·z) keeps the order of z for α > 0); per α:
    e = exp(α (z − max z)) (so e_0 = 1), Z = Σ e, H = log Z − α Σ e (z − max) / Z,
    max p = 1 / Z, 1 / Σ p² = Z² / Σ e², and the top-mass count from e against 0.9 · Z
    (`_top_count_from_chunks`: exactly the float64 count of `k_eff_top_mass`). Σ e² is summed
    as Σ exp(2α (z − max z)) (equal to float32 rounding; squares of small e would be subnormal
    floats, which are many times slower), which is the Z of 2α where 2α is on the grid too
    (log-spaced grids with a point per octave).

    The α grid runs in chunks of at most `chunk_elements` entries of e; inside a chunk the
    exponentials and their sums are formed in cache-sized pieces. Every per-row quantity depends
    only on that row and α, so the chunking does not change any result.

    `backend`: "compiled" (the default where numba is available: `compiled.alpha_row_sums`, one
    pass per α and row in float64, no chunks) or "numpy" (the kernel above, the reference).
    """
    if backend not in (None, "numpy", "compiled") or (backend == "compiled" and not compiled.AVAILABLE):
        raise SpectraError(f"backend must be None, 'numpy' or 'compiled' (numba available: "
                           f"{compiled.AVAILABLE}), got {backend!r}")
    got = _alpha_rows(z.float().numpy(), check_alphas(alphas), chunk_elements, backend)
    return {n: torch.from_numpy(v).float() for n, v in got.items()}


def _alpha_rows(z: np.ndarray, alphas: tuple[float, ...], chunk_elements: int,
                backend: str | None = None) -> dict[str, np.ndarray]:
    """`alpha_row_metrics` on z [rows, keys] (float32 NumPy), in float64 [alpha, rows]."""
    if backend == "compiled" or (backend is None and compiled.AVAILABLE):
        got = compiled.alpha_row_sums(z, alphas, top_mass=0.9, tol=_TOP_TOL)
        return {n: got[i] for i, n in enumerate(SWEEP_METRICS)}
    rows, n_keys = z.shape
    kc = _ALPHA_KEY_CHUNK
    width = n_keys + (-n_keys % _ALPHA_PAD)
    n_chunks = width // kc
    zs = np.sort(z, axis=-1)[:, ::-1]  # descending, −inf last
    zc = np.full((rows, width), _SCORE_FLOOR, dtype=np.float32)  # exp(α · floor) = 0
    with np.errstate(invalid="ignore"):  # a row with no visible key (padding) gives NaN
        np.maximum(zs - zs[:, :1], _SCORE_FLOOR, out=zc[:, :n_keys])
    n_a = len(alphas)
    a_all = np.asarray(alphas, dtype=np.float32)
    # double[i]: the index of 2 α_i on the grid (exact in float32), or -1: Σ e² summed
    double = [next((j for j in range(n_a) if a_all[j] == 2 * a_all[i]), -1) for i in range(n_a)]
    out = {n: np.empty((n_a, rows)) for n in SWEEP_METRICS}
    Z_all = np.empty((n_a, rows))
    step = max(1, chunk_elements // zc.size)  # α per chunk
    piece = max(1, min(chunk_elements, _ALPHA_PIECE))
    if zc.size <= piece:  # a piece: several α × every row, or one α × a range of rows
        p_a, p_r = piece // zc.size, rows
    else:
        p_a, p_r = 1, max(1, piece // width)
    c_a = min(step, n_a)
    E = np.empty((c_a, rows, width), np.float32)  # e of one chunk, for the top-mass count
    E_t = torch.from_numpy(E)
    sums = np.zeros((3, c_a, rows), np.float32)  # Z, Σ e·x, Σ e² (x = α (z − max z))
    chunk_sums = np.zeros((1 + n_chunks, c_a * rows), np.float32)  # [0 | key chunk, (α, row)]
    x_buf = np.empty(min(p_a, c_a) * min(p_r, rows) * width, np.float32)
    y_buf = np.empty(min(p_r, rows) * width, np.float32)  # exp(2x) of one α
    ones = np.ones(kc, np.float32)
    for i in range(0, n_a, step):
        n_ai = min(step, n_a - i)
        for ia in range(0, n_ai, p_a):
            ib = min(ia + p_a, n_ai)
            for r0 in range(0, rows, p_r):
                r1 = min(r0 + p_r, rows)
                x = x_buf[: (ib - ia) * (r1 - r0) * width].reshape(ib - ia, r1 - r0, width)
                np.multiply(zc[None, r0:r1], a_all[i + ia : i + ib, None, None], out=x)
                # exp is many times slower below −87 (subnormal range and beyond): clamp the
                # exponent there (exp = 1.6e−38, the smallest normal float): such terms add
                # < 1e−36 each to any sum.
                x_t = torch.from_numpy(x).clamp_min_(_EXP_FLOOR)
                torch.exp(x_t, out=E_t[ia:ib, r0:r1])
                e = E[ia:ib, r0:r1].reshape(-1, width)
                xf = x.reshape(-1, width)
                sums[0, ia:ib, r0:r1] = np.einsum("ij->i", e).reshape(ib - ia, r1 - r0)
                sums[1, ia:ib, r0:r1] = np.einsum("ij,ij->i", e, xf).reshape(ib - ia, r1 - r0)
                for ja in range(ia, ib):
                    if double[i + ja] < 0:  # Σ exp(2x), clamped as every exponent
                        y = y_buf[: (r1 - r0) * width].reshape(r1 - r0, width)
                        np.multiply(x[ja - ia], np.float32(2), out=y)
                        y_t = torch.from_numpy(y).clamp_min_(_EXP_FLOOR)
                        torch.exp(y_t, out=y_t)
                        sums[2, ja, r0:r1] = np.einsum("ij->i", y)
                cs = (e.reshape(-1, kc) @ ones).reshape(-1, n_chunks)
                chunk_sums[1:, ia * rows + r0 : (ib - 1) * rows + r1] = cs.T
        n = n_ai * rows
        Z, ex, ee = (v.reshape(-1).astype(np.float64) for v in sums[:, :n_ai])
        top = _top_count_from_chunks(E[:n_ai].reshape(n, width), (0.9 - _TOP_TOL) * Z, chunk_sums[:, :n])
        H = np.log(Z) - ex / Z
        got = {"entropy": H, "max_attn": 1.0 / Z, "k_eff_exp": np.exp(H), "k_eff_pr": ee,
               "k_eff_top90": np.minimum(top, n_keys)}
        for name, v in got.items():
            out[name][i : i + n_ai] = v.reshape(n_ai, rows)
        Z_all[i : i + n_ai] = Z.reshape(n_ai, rows)
    for i, j in enumerate(double):  # k_eff_pr = Z² / Σ e², Σ e² held there so far where j < 0
        out["k_eff_pr"][i] = Z_all[i] ** 2 / (Z_all[j] if j >= 0 else out["k_eff_pr"][i])
    return out


def _top_count_from_chunks(E: np.ndarray, lim: np.ndarray, chunk_sums: np.ndarray) -> np.ndarray:
    """Rows of E [N, W] (float32 ≥ 0, sorted in descending order, W a multiple of
    `_ALPHA_KEY_CHUNK`): the fewest leading entries whose float64 sum reaches lim [N] (float64);
    W where the row never does. `chunk_sums` [1 + W / _ALPHA_KEY_CHUNK, N] (float32): zeros,
    then each row's sums of its consecutive chunks of keys; overwritten (cumulative sums).

    Found in float32, one operation over all rows at a time: the chunk where the cumulative sum
    reaches lim, then the key inside it. A float32 partial sum (a chunk sum, the sum of the
    chunk sums before it, the keys of its chunk) adds at most n_chunks + 2·chunk nonnegative
    terms, so it is within (n_chunks + 2·chunk) u Z of the exact one (u = 2⁻²⁴, Z the row's
    sum); with δ = 2 (n_chunks + 2·chunk + 2) u Z (which also covers rounding lim ± δ to
    float32), where no partial sum of that chunk (nor the sum before it) lies within δ of lim,
    the count is the float64 count. The few other rows (a partial sum within δ of lim, a NaN
    row) are counted again with a float64 cumulative sum.
    """
    kc = _ALPHA_KEY_CHUNK
    N, W = E.shape
    n_chunks = W // kc
    C = chunk_sums  # C[c]: the sum of the first c chunks
    for c in range(2, n_chunks + 1):
        np.add(C[c], C[c - 1], out=C[c])
    delta = C[-1].astype(np.float64) * (2 * (n_chunks + 2 * kc + 2) * _F32_EPS)
    lim32, lo32, hi32 = (v.astype(np.float32) for v in (lim, lim - delta, lim + delta))
    # whole chunks below lim (≤ n_chunks; uint8 counts of a bool view are the fast sum)
    j = (C[1:] < lim32).view(np.uint8).sum(0, dtype=np.uint8 if n_chunks < 256 else np.int64)
    jj = np.minimum(j, n_chunks - 1).astype(np.intp)
    r = np.arange(N)
    base = np.take(C.reshape(-1), jj * N + r)  # the sum before chunk jj
    w = np.take(E.reshape(N * n_chunks, kc), r * n_chunks + jj, axis=0).T.copy()  # [key, row]
    w[0] += base
    for t in range(1, kc):
        np.add(w[t], w[t - 1], out=w[t])

    def below(v):  # keys of chunk jj whose partial sum is below v
        return (w < v).view(np.uint8).sum(0, dtype=np.uint8)

    k, k_lo, k_hi = below(lim32), below(lo32), below(hi32)
    settled = (k_lo == k_hi) & (k_hi < kc) & ((jj == 0) | (base < lo32))
    count = jj * kc + k + 1
    redo = np.flatnonzero(~settled)
    if redo.size:
        c = torch.from_numpy(np.take(E, redo, axis=0)).cumsum(-1, dtype=torch.float64)
        count[redo] = ((c < torch.from_numpy(lim[redo, None])).sum(-1) + 1).clamp_max_(W).numpy()
    return count


def alpha_metrics(
    scores: Float[Tensor, "*batch query_pos key_pos"],
    visible: Bool[Tensor, "*batch query_pos key_pos"],
    alphas: Sequence[float],
    *,
    chunk_elements: int = ALPHA_CHUNK_ELEMENTS,
    row_weight: Float[Tensor, "*#batch query_pos"] | None = None,
) -> dict[str, Float[Tensor, " alpha *batch"]]:
    """Mean over query rows of each metric of p(α) = softmax(α·s) over the visible keys.

    `scores` may be shifted by any per-row constant (log p works). Keys are sorted once per row
    (softmax(α·s) keeps the order of s); the α grid runs in chunks of at most `chunk_elements`
    pattern entries. Every query row must see at least one key, except rows of weight 0 in
    `row_weight` (padding), which the mean leaves out. On the CPU each query block goes through
    `alpha_row_metrics` (NumPy's sort; the metrics from e = exp(α (s − max s)) and its sums, no
    softmax); on other devices through torch's log-softmax and sort.
    """
    alphas = check_alphas(alphas)
    if scores.device.type == "cpu":  # NumPy's sort and no softmax: `alpha_row_metrics`
        lead, (n_rows, n_k) = scores.shape[:-2], scores.shape[-2:]
        s3, v3 = scores.reshape(-1, n_rows, n_k), visible.reshape(-1, n_rows, n_k)
        n_b = s3.shape[0]
        rw = None if row_weight is None else row_weight.expand(*lead, n_rows).reshape(n_b, n_rows).double().numpy()
        acc = {n: np.zeros((len(alphas), n_b)) for n in SWEEP_METRICS}
        for rows, n_keys in query_blocks(visible):
            n_r = rows.stop - rows.start
            z = torch.where(v3[:, rows, :n_keys], s3[:, rows, :n_keys].float(), float("-inf"))
            got = _alpha_rows(z.reshape(-1, n_keys).numpy(), alphas, chunk_elements)
            for n in SWEEP_METRICS:
                v = got[n].reshape(len(alphas), n_b, n_r)
                acc[n] += v.sum(-1) if rw is None else np.where(rw[:, rows] > 0, v * rw[:, rows], 0.0).sum(-1)
        denom = n_rows if rw is None else rw.sum(-1)
        return {n: torch.from_numpy(v / denom).float().reshape(len(alphas), *lead) for n, v in acc.items()}
    a_all = torch.tensor(alphas, dtype=torch.float32, device=scores.device)
    n_q = scores.shape[-2] if row_weight is None else row_weight.sum(-1)
    sums = {n: scores.new_zeros((len(alphas), *scores.shape[:-2]), dtype=torch.float32)
            for n in SWEEP_METRICS}
    for rows, n_keys in query_blocks(visible):
        z = scores[..., rows, :n_keys].float().masked_fill(~visible[..., rows, :n_keys], float("-inf"))
        z = z.sort(dim=-1, descending=True).values
        step = max(1, chunk_elements // max(1, z.numel()))
        for i in range(0, len(alphas), step):
            a = a_all[i : i + step].view(-1, *([1] * z.ndim))
            logp = torch.log_softmax(a * z, dim=-1)
            for n, v in sorted_row_metrics(logp.exp(), logp).items():
                sums[n][i : i + step] += _row_sum(v, row_weight, rows)
            del logp
    return {n: v / n_q for n, v in sums.items()}


def row_alpha_entropy(
    scores: Float[Tensor, "*batch query_pos key_pos"],
    visible: Bool[Tensor, "*batch query_pos key_pos"],
    alpha: Float[Tensor, "*batch query_pos"],
) -> Float[Tensor, "*batch query_pos"]:
    """H(softmax(α_i·s_i)) for every query row i with its own α_i (`metrics.counterfactual_entropy`).

    In query blocks over the keys some row of the block sees (`query_blocks`), in float64: with
    x = α (s − max s) over the visible keys, e = exp(x), Z = Σ e, H = log Z − Σ e x / Z. One read
    of each row; a row with no visible key, or a NaN α, gives NaN. `scores` may be shifted by
    any per-row constant (log p works).
    """
    out = torch.empty(scores.shape[:-1], dtype=torch.float32, device=scores.device)
    a_all = torch.as_tensor(alpha, device=scores.device)
    if a_all.shape != out.shape:
        raise SpectraError(f"alpha must have one value per query row {tuple(out.shape)}, got "
                           f"{tuple(a_all.shape)}")
    with torch.no_grad():
        for rows, n_keys in query_blocks(visible):
            v = visible[..., rows, :n_keys]
            s = scores[..., rows, :n_keys].double().masked_fill(~v, float("-inf"))
            x = s - s.amax(-1, keepdim=True)
            x = (a_all[..., rows].double()[..., None] * x).masked_fill(~v, float("-inf"))
            e = x.exp()
            z = e.sum(-1)
            out[..., rows] = (z.log() - (e * x.masked_fill(~v, 0.0)).sum(-1) / z).float()
    return out
