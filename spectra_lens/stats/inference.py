"""Inference from per-document moments: the one Pearson correlation, partial correlations from
cross-product matrices, the document-clustered Wald test (CR2 with Bell–McCaffrey degrees of
freedom, or CR1), the clustered mean, the document bootstrap of partial correlations,
Benjamini–Hochberg FDR and t intervals.

The independent unit is the document: tests cluster by document and the bootstrap resamples
documents (a resample's moments are multinomial counts × the per-document moments).
"""

from collections.abc import Sequence

import numpy as np
from scipy import stats

from spectra_lens.errors import SpectraError
from spectra_lens.stats.moments import DocumentMoments

__all__ = ["CLUSTER_TESTS", "cluster_mean", "cluster_wald", "fdr", "pearson",
           "pearson_from_moments", "t_interval"]


def pearson(cxx, cyy, cxy) -> np.ndarray:
    """Pearson r = C_xy / √(C_xx C_yy) from centred cross-products (C_ab = Σ (a − ā)(b − b̄)).

    The one correlation of the package: every r, partial r (the cross-products of residuals,
    `_partial`, `_residual_corr`), bootstrap replicate and fit goes through it. Arrays
    broadcast; r is NaN where either variance is not > 0 (a constant variable) and is clipped to
    [−1, 1] (rounding can leave |r| a hair above 1).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cxy / np.sqrt(cxx * cyy)
    r = np.where((cxx > 0) & (cyy > 0), r, np.nan)
    return np.asarray(np.clip(r, -1.0, 1.0))  # an array also for scalar input


def pearson_from_moments(moments: DocumentMoments, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """(r, token-level two-sided p with n − 2 df) of x and y per head, from the moments.

    The token-level p treats tokens as independent (the original project's test); it is not
    calibrated when tokens cluster by document.
    """
    s, _ = moments.augmented()
    r = pearson(*_partial(_cov(s.sum(axis=0)), moments.index(x), moments.index(y), ()))
    return r, _t_pvalue(r, moments.n.sum(axis=0))


def _t_pvalue(r, n, *, n_covariates: int = 0) -> np.ndarray:
    """Two-sided p of t = r √(df / (1 − r²)), df = n − 2 − k: the test that treats tokens as
    independent (not calibrated when they cluster by document)."""
    r = np.asarray(r, dtype=float)
    df = np.asarray(n, dtype=float) - 2 - n_covariates
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / ((1 - r) * (1 + r)))
        df = np.where(df > 0, df, np.nan)
        return np.asarray(2 * stats.t.sf(np.abs(t), df))


def fdr(pvalues) -> np.ndarray:
    """q_(i) = min_{j ≥ i} m p_(j) / j over the m non-NaN p-values (Benjamini–Hochberg).

    NaN p-values stay NaN and do not count in m. The result has the shape of the input.
    """
    p = np.asarray(pvalues, dtype=float)
    q = np.full(p.shape, np.nan)
    present = ~np.isnan(p)
    bad = present & ~((p >= 0) & (p <= 1))
    if bad.any():
        raise SpectraError(f"p-values must lie in [0, 1] or be NaN; got {p[bad][:5].tolist()}")
    if present.any():
        q[present] = stats.false_discovery_control(p[present], method="bh")
    return q


def t_interval(
    values, *, ci: float = 0.95, axis: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean ± t_{n−1, (1+ci)/2} · sd / √n over `axis`: (mean, low, high).

    The entries along `axis` must be independent units: documents, or sequences where each
    comes from its own document. Tokens of one document are not independent, so per-token
    values must be averaged per unit first. With n < 2 the interval is NaN.
    """
    if not 0 < ci < 1:
        raise SpectraError(f"ci must lie strictly between 0 and 1, got {ci!r}")
    x = values.detach().cpu().double().numpy() if hasattr(values, "detach") else np.asarray(values, float)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan.copy()
    half = stats.t.ppf((1 + ci) / 2, n - 1) * x.std(axis=axis, ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half


def _check_probability(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise SpectraError(f"{name} must lie strictly between 0 and 1; got {value}")


def _cov(s: np.ndarray) -> np.ndarray:
    """Centred cross-product matrix C = A − b bᵀ / n of summed augmented moments (..., q, q)."""
    n = s[..., 0, 0]
    b = s[..., 1:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return s[..., 1:, 1:] - b[..., :, None] * b[..., None, :] / n[..., None, None]


def _partial(c: np.ndarray, x: int, y: int, z: Sequence[int]):
    """(C_xx·z, C_yy·z, C_xy·z): cross-products of x and y after least squares on z (and 1)."""
    cxx, cyy, cxy = c[..., x, x], c[..., y, y], c[..., x, y]
    if z:
        z = list(z)
        czz = c[..., z, :][..., :, z]
        czx = c[..., z, x]
        czy = c[..., z, y]
        try:
            inv = np.linalg.inv(czz)
        except np.linalg.LinAlgError:  # a constant control in some head or resample
            inv = np.linalg.pinv(czz)
        wx = np.einsum("...ij,...j->...i", inv, czx)
        wy = np.einsum("...ij,...j->...i", inv, czy)
        cxx = cxx - np.einsum("...i,...i->...", czx, wx)
        cyy = cyy - np.einsum("...i,...i->...", czy, wy)
        cxy = cxy - np.einsum("...i,...i->...", czx, wy)
    return cxx, cyy, cxy


def _residual_corr(c: np.ndarray, x: int, ys: Sequence[int], z: Sequence[int]) -> np.ndarray:
    """Partial r of x with each of ys given z (and 1), from cross-products C (..., p, p).

    C_res = C − C[:, z] C_zz⁻¹ C[z, :] is the cross-product matrix of the residuals after least
    squares on [1, z]; returns (..., len(ys)).
    """
    idx = _as_slice([x, *ys])
    sub = _take2(c, idx, idx)
    if z:
        z = _as_slice(z)
        czz = _take2(c, z, z)
        cz = _take2(c, z, idx)
        try:
            sol = np.linalg.solve(czz, cz)
        except np.linalg.LinAlgError:  # a constant control in some head or resample
            sol = np.linalg.pinv(czz) @ cz
        sub = sub - np.swapaxes(cz, -1, -2) @ sol
    cxx = sub[..., 0, 0][..., None]
    cyy = np.diagonal(sub, axis1=-2, axis2=-1)[..., 1:]
    return pearson(cxx, cyy, sub[..., 0, 1:])


def _as_slice(index):
    """A list of consecutive indices as a slice (basic indexing: a view, no copy)."""
    index = list(index)
    if index == list(range(index[0], index[-1] + 1)):
        return slice(index[0], index[-1] + 1)
    return index


def _take2(c, rows, cols):
    if isinstance(rows, slice) and isinstance(cols, slice):
        return c[..., rows, cols]
    return c[..., rows, :][..., :, cols]


CLUSTER_TESTS = ("cr2", "cr1")


def cluster_wald(s_docs: np.ndarray, x: int, y, z: Sequence[int] = (), *,
                 kind: str = "cr2", ci: float = 0.95) -> dict[str, np.ndarray]:
    """Slope of y on x given [1, z] with a document-clustered Wald test.

    `s_docs` is (doc, head, q, q) augmented moments (`DocumentMoments.augmented`: index 0 is
    the constant, variable j sits at j + 1; pass variable indices). With X = [1, x, z] the OLS
    coefficient β = B Xᵀy, B = (XᵀX)⁻¹, comes from the summed moments, and document g's score
    u_g = X_gᵀy_g − M_g β (M_g = X_gᵀX_g) is a linear form of its moment matrix. The variance
    of β is B (Σ_g ũ_g ũ_gᵀ) B · c, and the reference is a t distribution:

    - "cr1": ũ_g = u_g, c = G/(G − 1) · (N − 1)/(N − K), t with G − 1 df;
    - "cr2" (default): the bias-reduced linearization of Bell and McCaffrey, ũ_g =
      X_gᵀ(I − H_gg)^(−½) e_g, c = 1, t with the Bell–McCaffrey degrees of freedom (working
      model: independent errors). Both need only k×k matrices per document: H_gg = X_g B X_gᵀ
      has the nonzero eigenvalues of W_g = M_g^½ B M_g^½, so f(H_gg) = I + X_g(…)X_gᵀ and
      ũ_g = (I + M_g^½ f̃(W_g) M_g^½ B) u_g with f̃(λ) = ((1 − λ)^(−½) − 1)/λ; the degrees of
      freedom (Σλ)²/Σλ² of the matrix Q_gh = δ_gh d_g − v_gᵀ B v_h are computed from the
      k-vectors v_g and scalars d_g, so they are exact from the moments.

    `y` is one variable index, or a sequence of them (then every returned array has a leading
    axis over y; the design-only work, the leverages, is shared). G counts the documents
    holding the head's tokens. Under a null with clustered tokens
    (tests/stats/test_inference.py) CR1 with t(G − 1) rejects ≈ 1.7× too often at G = 16 and still
    ≈ 1.3× at G = 64; CR2 with Bell–McCaffrey df stays within Monte Carlo error, hence the
    default.
    """
    if kind not in CLUSTER_TESTS:
        raise SpectraError(f"kind must be one of {CLUSTER_TESTS}; got {kind!r}")
    single = np.ndim(y) == 0
    yc = [int(j) + 1 for j in np.atleast_1d(y)]
    cols = [0, x + 1, *[j + 1 for j in z]]
    s = s_docs.sum(axis=0)
    xtx = s[..., cols, :][..., :, cols]
    xty = s[..., cols, :][..., :, yc]  # (head, k, ny)
    n_tok = s[..., 0, 0]
    g = (s_docs[..., 0, 0] > 0).sum(axis=0).astype(float)
    k = len(cols)
    ok = (np.linalg.matrix_rank(xtx) == k) & (g >= 2)
    xtx = np.where(ok[:, None, None], xtx, np.eye(k))  # degenerate heads: NaN below
    bread = np.linalg.inv(xtx)
    beta = bread @ xty  # (head, k, ny)
    mg = s_docs[..., cols, :][..., :, cols]
    u = s_docs[..., cols, :][..., :, yc] - mg @ beta[None]  # (doc, head, k, ny)
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "cr2":
            root, lam, vec = _leverage(mg, bread)
            adjust = _leverage_fn(root, lam, vec, bread, _bm_half)
            u = u + adjust @ u
            factor = np.ones_like(g)
            bl = bread[:, :, 1]  # B ℓ for ℓ = the x coefficient
            mbl = np.einsum("ghij,hj->ghi", mg, bl)
            v = mbl + np.einsum("ghij,ghj->ghi", adjust, mbl)
            full = _leverage_fn(root, lam, vec, bread, _bm_full)
            d = np.einsum("hi,ghi->gh", bl, mbl + np.einsum("ghij,ghj->ghi", full, mbl))
            vbv = np.einsum("ghi,hij,ghj->gh", v, bread, v)
            bvv = bread @ np.einsum("ghi,ghj->hij", v, v)
            trace = d.sum(axis=0) - vbv.sum(axis=0)
            frob = ((d**2).sum(axis=0) - 2 * (d * vbv).sum(axis=0)
                    + np.einsum("hij,hji->h", bvv, bvv))
            df = (trace**2 / frob)[:, None]
        else:
            factor = g / (g - 1) * (n_tok - 1) / (n_tok - k)
            df = (g - 1)[:, None]
        # Var(β_x) for each y: (B u)_x summed over documents, squared.
        bu = np.einsum("hj,ghjy->ghy", bread[:, 1, :], u)
        var = (bu**2).sum(axis=0)  # (head, ny)
        se = np.sqrt(factor[:, None] * var)
        df = np.where(ok[:, None], df, np.nan)
        t = beta[:, 1, :] / se
        p = 2 * stats.t.sf(np.abs(t), df)
        half = stats.t.ppf(0.5 + ci / 2, df) * se
    okk = ok[:, None]
    b1 = np.where(okk, beta[:, 1, :], np.nan)
    out = {"beta": b1, "se": np.where(okk, se, np.nan), "p": np.where(okk, p, np.nan),
           "low": b1 - half, "high": b1 + half, "df": np.broadcast_to(df, b1.shape)}
    out = {key: (v[:, 0] if single else v.T) for key, v in out.items()}
    return out | {"n_documents": g, "n_tokens": n_tok}


def _leverage(mg, bread):
    """M_g^½ and the eigen-decomposition of W_g = M_g^½ B M_g^½ (eigenvalues: leverages)."""
    w, q = np.linalg.eigh(mg)
    root = (q * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(q, -1, -2)
    lam, vec = np.linalg.eigh(root @ bread[None] @ root)
    return root, np.clip(lam, 0.0, 1.0 - 1e-12), vec


def _leverage_fn(root, lam, vec, bread, f):
    """M^½ f(W) M^½ B, so that X_gᵀ φ(H_gg) e_g = (I + M^½ f(W) M^½ B) X_gᵀ e_g for
    φ(h) = 1 + h f(h) (H_gg^j = X_g (B M)^(j−1) B X_gᵀ, a power series in k×k matrices)."""
    fw = (vec * f(lam)[..., None, :]) @ np.swapaxes(vec, -1, -2)
    return root @ fw @ root @ bread[None]


def _bm_half(lam):  # ((1 − λ)^(−½) − 1)/λ, → ½ as λ → 0
    small = lam < 1e-9
    safe = np.where(small, 1.0, lam)
    return np.where(small, 0.5, ((1.0 - lam) ** -0.5 - 1.0) / safe)


def _bm_full(lam):  # ((1 − λ)^(−1) − 1)/λ = 1/(1 − λ)
    return 1.0 / (1.0 - lam)


def cluster_mean(s_docs: np.ndarray, mu: np.ndarray, y: int, *, ci: float = 0.95):
    """Mean of variable y with a document-clustered (CR1) t interval, G − 1 df."""
    s = s_docs.sum(axis=0)
    n_tok = s[..., 0, 0]
    delta = s[..., 0, y + 1] / n_tok  # mean − μ
    u = s_docs[..., 0, y + 1] - s_docs[..., 0, 0] * delta[None]
    g = (s_docs[..., 0, 0] > 0).sum(axis=0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(g / (g - 1) * (u**2).sum(axis=0)) / n_tok
        half = stats.t.ppf(0.5 + ci / 2, np.where(g >= 2, g - 1, np.nan)) * se
    m = mu[..., y] + delta
    return m, m - half, m + half


def _bootstrap_counts(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each unit is drawn in each of n_boot resamples of n_units with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=n_boot).astype(float)


def _quantiles(boot: np.ndarray, qs) -> list[np.ndarray]:
    """Linear-interpolation quantiles over axis 0 of the finite values (NaN if none)."""
    data = np.sort(boot, axis=0)  # NaN sorts last
    n = np.isfinite(data).sum(axis=0)
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = np.clip(np.floor(pos).astype(int), 0, data.shape[0] - 1)
        hi = np.clip(lo + 1, 0, np.maximum(n - 1, 0))
        frac = pos - np.floor(pos)
        vlo = np.take_along_axis(data, lo[None], axis=0)[0]
        vhi = np.take_along_axis(data, hi[None], axis=0)[0]
        out.append(np.where(n > 0, vlo + frac * (vhi - vlo), np.nan))
    return out


def _bootstrap_partial_r(s_docs: np.ndarray, keep: Sequence[int], counts: np.ndarray, n_y: int,
                         local_z: dict[str, list[int]], *, chunk: int = 50) -> dict[str, np.ndarray]:
    """Partial r of variable 0 with each of variables 1..n_y given each control set, in every
    resample. `sub` = `s_docs[:, :, keep][:, :, :, keep]` are (doc, head, q, q) augmented
    moments (index 0 the constant, variable j at j + 1; `local_z` indexes variables of `sub`),
    `counts` (n_boot, doc) how often each document is drawn. Returns
    {control: (n_boot, head, n_y)}.

    A partial r needs only the x row, the y diagonal and the control rows of the cross-product
    matrix, not the y × y block: only those sums are formed (a quarter of the matrix for 13 ys
    and 2 controls), and the controls' 1×1 / 2×2 systems are solved in closed form. The result
    equals `_residual_corr` on the full resampled matrix (`_bootstrap_partial_r_full`, used
    where a control's matrix is singular in some resample) up to rounding.
    """
    keep = np.asarray(keep)
    n_docs, n_heads = s_docs.shape[:2]
    x, ys = 1, list(range(2, 2 + n_y))  # augmented indices
    zs_all = sorted({j + 1 for z in local_z.values() for j in z})
    pairs: dict[tuple[int, int], int] = {}
    wanted = [(0, 0), *((u, 0) for u in [x, *ys, *zs_all]), (x, x), *((x, y) for y in ys),
              *((y, y) for y in ys), *((z, u) for z in zs_all for u in [x, *ys, *zs_all])]
    for pr in wanted:
        pairs.setdefault(pr, len(pairs))
    rows = np.array([pr[0] for pr in pairs])
    cols = np.array([pr[1] for pr in pairs])
    # (doc, pair, head): a resample's sums are counts @ flat, and each pair's sums over heads
    # are one contiguous row.
    flat = np.ascontiguousarray(np.swapaxes(s_docs[:, :, keep[rows], keep[cols]], 1, 2))
    flat = flat.reshape(n_docs, -1)
    # C = A − b bᵀ / n entry by entry, as `_cov` forms it, for the pairs (u, v) with u, v ≥ 1.
    need = [k for k, (u, v) in enumerate(pairs) if u and v]
    where = {pr: i for i, pr in enumerate(pr for pr in pairs if pr[0] and pr[1])}
    first = np.array([pairs[pr[0], 0] for pr in where])
    second = np.array([pairs[pr[1], 0] for pr in where])
    ix = lambda rows_, cols_: np.array([[where[r, c] for c in cols_] for r in rows_])  # noqa: E731
    at_xx, at_xy, at_yy = where[x, x], ix([x], ys)[0], np.array([where[y, y] for y in ys])
    n_boot = counts.shape[0]
    out = {c: np.empty((n_boot, n_heads, n_y)) for c in local_z}
    for start in range(0, n_boot, chunk):
        block = counts[start:start + chunk]
        m = (block @ flat).reshape(block.shape[0], len(pairs), n_heads)
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = m[:, need] - m[:, first] * m[:, second] / m[:, :1]  # (resample, pair, head)
            cxx = cov[:, at_xx][:, None]
            cxy = cov[:, at_xy]
            cyy = cov[:, at_yy]
            for c, z in local_z.items():
                za = [j + 1 for j in z]
                dest = out[c][start:start + block.shape[0]]
                if not za:
                    dest[...] = np.swapaxes(pearson(cxx, cyy, cxy), 1, 2)
                    continue
                # cz[:, k, u]: control k against u in [x, ys]; czz: the controls' own matrix.
                cz = cov[:, ix(za, [x, *ys])]
                sol = _small_solve(cov[:, ix(za, za)], cz)
                if sol is None:  # singular or undefined in some resample: the general path
                    sub = s_docs[:, :, keep, :][:, :, :, keep]
                    cb = _cov((block @ sub.reshape(n_docs, -1)).reshape(block.shape[0], *sub.shape[1:]))
                    dest[...] = _residual_corr(cb, 0, list(range(1, 1 + n_y)), z)
                    continue
                rxx = cxx[:, 0] - (cz[:, :, 0] * sol[:, :, 0]).sum(axis=1)
                rxy = cxy - (cz[:, :, :1] * sol[:, :, 1:]).sum(axis=1)
                ryy = cyy - (cz[:, :, 1:] * sol[:, :, 1:]).sum(axis=1)
                dest[...] = np.swapaxes(pearson(rxx[:, None], ryy, rxy), 1, 2)
    return out


def _small_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """a⁻¹ b for a (batch, k, k, head) and b (batch, k, m, head): closed form for k = 1, 2
    (np.linalg.solve beyond); None where some `a` is singular or not finite, so that the
    caller takes its general path."""
    k = a.shape[1]
    if not np.isfinite(a).all():
        return None
    if k == 1:
        d = a[:, 0, 0]
        if (d == 0).any():
            return None
        return b / d[:, None, None]
    if k == 2:
        p, q, r, s = a[:, 0, 0, None], a[:, 0, 1, None], a[:, 1, 0, None], a[:, 1, 1, None]
        det = p * s - q * r
        if (det == 0).any():
            return None
        b0, b1 = b[:, 0], b[:, 1]
        return np.stack([(s * b0 - q * b1) / det, (p * b1 - r * b0) / det], axis=1)
    try:
        sol = np.linalg.solve(np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1))
    except np.linalg.LinAlgError:
        return None
    return np.moveaxis(sol, 1, -1)


def _bootstrap_partial_r_full(s_docs, keep, counts, n_y, local_z, *, chunk=50):
    """`_bootstrap_partial_r` by `_residual_corr` on the full resampled matrix (the reference)."""
    sub = s_docs[:, :, keep, :][:, :, :, keep]
    flat = sub.reshape(sub.shape[0], -1)
    out = {c: np.empty((counts.shape[0], sub.shape[1], n_y)) for c in local_z}
    for start in range(0, counts.shape[0], chunk):
        block = counts[start:start + chunk]
        cb = _cov((block @ flat).reshape(block.shape[0], *sub.shape[1:]))
        for c, z in local_z.items():
            out[c][start:start + block.shape[0]] = _residual_corr(cb, 0, list(range(1, 1 + n_y)), z)
    return out
