"""The share of a head's entropy variance that its query norm carries, from the exact norm
counterfactual (`capture.MetricCapture` with a `reference.ReferenceNorm`).

Per head, over the tokens of the measured documents (the selection documents that estimated
the reference norm left out):

    norm_share = (Var H − Var H_cf) / Var H,

H the observed entropy, H_cf = H(softmax(s · r/‖q‖)) the entropy of the same token with its
query at the head's reference norm (direction kept). `norm_share_given_position` is the same
with the within-bin variances of the log-position bins (the residual sums of squares given the
bin indicators: position's own effect on the entropy, and the bin's reference norm, removed).
Intervals: percentile intervals over resamples of whole documents (each resample adds the
drawn documents' moments, `inference._bootstrap_counts`).
"""

import numpy as np
import pandas as pd

from spectra_lens.errors import SpectraError
from spectra_lens.stats.inference import (
    _bootstrap_counts,
    _check_probability,
    _cov,
    _partial,
    _quantiles,
)
from spectra_lens.stats.moments import DocumentMoments

__all__ = ["NORM_SHARE_COLUMNS", "norm_share"]

#: The columns of `norm_share` after layer and head.
NORM_SHARE_COLUMNS = ("norm_share", "norm_share_ci_low", "norm_share_ci_high",
                      "norm_share_given_position", "norm_share_given_position_ci_low",
                      "norm_share_given_position_ci_high", "mean_abs_delta_h_cf",
                      "n_documents_norm_share")


def _shares(s: np.ndarray, ih: int, ic: int, bins: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(raw share, within-bin share) from summed augmented moments s (..., q, q); the indices
    are of variables (position j + 1 in s)."""
    c = _cov(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = 1.0 - c[..., ic, ic] / c[..., ih, ih]
        vh, vc, _ = _partial(c, ih, ic, bins)
        within = 1.0 - vc / vh
    ok = c[..., ih, ih] > 0
    return np.where(ok, raw, np.nan), np.where(ok & (vh > 0), within, np.nan)


def norm_share(moments: DocumentMoments, *, exclude_documents=(), n_boot: int = 1000,
               ci: float = 0.95, seed: int = 0, chunk: int = 100) -> pd.DataFrame:
    """Per head: `NORM_SHARE_COLUMNS` from counterfactual moments (`counterfactual_variables`)
    of the documents not in `exclude_documents` (the selection documents).

    `mean_abs_delta_h_cf` = mean |H − H_cf| over the tokens (nats); `n_documents_norm_share` the
    measured documents. Shares are NaN where H is constant; intervals NaN below 2 documents.
    """
    if n_boot < 1:
        raise SpectraError(f"n_boot must be >= 1; got {n_boot}")
    _check_probability("ci", ci)
    measured = np.setdiff1d(moments.documents, np.asarray(list(exclude_documents), dtype=np.int64))
    sub = moments.select(documents=measured)
    ih, ic, idel = (sub.index(v) for v in ("entropy", "entropy_cf", "abs_delta_h_cf"))
    bins = [j for j, v in enumerate(sub.variables) if v.startswith("position_bin_")]
    out = {"layer": moments.layers, "head": moments.heads}
    n_heads = moments.layers.size
    if sub.n_documents == 0:
        nan = np.full(n_heads, np.nan)
        for c in NORM_SHARE_COLUMNS:
            out[c] = nan
        out["n_documents_norm_share"] = np.zeros(n_heads, dtype=np.int64)
        return pd.DataFrame(out)
    s_docs, mu = sub.augmented()
    total = s_docs.sum(axis=0)
    raw, within = _shares(total, ih, ic, bins)
    g = (sub.n > 0).sum(axis=0)
    counts = _bootstrap_counts(sub.n_documents, n_boot, seed)
    flat = s_docs.reshape(sub.n_documents, -1)
    b_raw, b_within = [], []
    for i in range(0, n_boot, chunk):
        s_b = (counts[i:i + chunk] @ flat).reshape(-1, *s_docs.shape[1:])
        r, w = _shares(s_b, ih, ic, bins)
        b_raw.append(r)
        b_within.append(w)
    qs = (0.5 - ci / 2, 0.5 + ci / 2)
    enough = g >= 2
    out["norm_share"] = raw
    for name, boot in (("norm_share", b_raw), ("norm_share_given_position", b_within)):
        low, high = _quantiles(np.concatenate(boot), qs)
        if name != "norm_share":
            out[name] = within
        out[f"{name}_ci_low"] = np.where(enough, low, np.nan)
        out[f"{name}_ci_high"] = np.where(enough, high, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean_abs_delta_h_cf"] = mu[:, idel] + total[:, 0, idel + 1] / total[:, 0, 0]
    out["n_documents_norm_share"] = g.astype(np.int64)
    return pd.DataFrame(out)[["layer", "head", *NORM_SHARE_COLUMNS]]
