"""Synthetic token records and moments with a document structure, and the per-token reference
formulas (residual regression, explicit cluster sums) that the moment statistics must equal."""

import numpy as np
import pandas as pd
from scipy import stats as sps

from spectra_lens.stats.moments import DocumentMoments

VARS = ("log_q_norm", "log_position", "sink_mass", "entropy", "max_attn", "local_gain")


def clustered_null(rng, n_docs, n_heads, *, icc=0.5, mean_size=8):
    """x = ln‖q‖ and y = entropy, independent, each with a document effect (ICC `icc`);
    documents of unequal size (2 .. 2·mean_size − 1 tokens)."""
    sizes = rng.integers(2, 2 * mean_size, n_docs)
    t = sizes.max()
    valid = np.broadcast_to((np.arange(t)[None, :] < sizes[:, None])[:, None, :],
                            (n_docs, n_heads, t))
    values = (rng.normal(size=(n_docs, n_heads, 1, 2)) * np.sqrt(icc)
              + rng.normal(size=(n_docs, n_heads, t, 2)) * np.sqrt(1 - icc))
    return DocumentMoments.from_tokens(values, valid, np.arange(n_docs),
                                       layers=np.zeros(n_heads, int), heads=np.arange(n_heads),
                                       variables=("log_q_norm", "entropy"))


def records(rng, n_docs=9, n_seq_per_doc=2, seq_len=12, layers=(0, 1), heads=2):
    """Per-token records of 4 heads over `n_docs` documents of `n_seq_per_doc` sequences each:
    entropy falls with ln‖q‖ and with the sink mass, and shifts by document."""
    rows = []
    seq = 0
    for d in range(n_docs):
        for _ in range(n_seq_per_doc):
            for layer in layers:
                for h in range(heads):
                    pos = np.arange(seq_len)
                    z = rng.normal(size=seq_len) + 0.5 * rng.normal()
                    q = np.exp(1.0 + 0.3 * z + 0.1 * rng.normal(size=seq_len))
                    sink = 1 / (1 + np.exp(-(z + rng.normal(size=seq_len))))
                    ent = 2 - 0.4 * np.log(q) - sink + 0.2 * rng.normal(size=seq_len) + 0.1 * d
                    rows.append(pd.DataFrame({
                        "document": 100 + d, "sequence": seq, "position": pos, "layer": layer,
                        "head": h, "q_norm": q, "entropy": ent, "sink_mass": sink,
                        "max_attn": np.exp(-ent) + 0.05 * rng.normal(size=seq_len),
                        "local_gain": -0.3 + 0.05 * rng.normal(size=seq_len),
                    }))
            seq += 1
    return pd.concat(rows, ignore_index=True)


def reference_fit(frame, y, controls, groups):
    """Per-token formulas: residual regression, explicit cluster sums, leave-one-out refits."""
    x = np.log(frame["q_norm"].to_numpy())
    yy = frame[y].to_numpy()
    cols = [np.ones_like(x), x]
    for c in controls:
        cols.append(np.log1p(frame["position"].to_numpy()) if c == "log_position"
                    else frame[c].to_numpy())
    X = np.column_stack(cols)
    beta, *_ = np.linalg.lstsq(X, yy, rcond=None)
    resid_y = yy - X[:, [0, *range(2, X.shape[1])]] @ np.linalg.lstsq(
        X[:, [0, *range(2, X.shape[1])]], yy, rcond=None)[0]
    resid_x = x - X[:, [0, *range(2, X.shape[1])]] @ np.linalg.lstsq(
        X[:, [0, *range(2, X.shape[1])]], x, rcond=None)[0]
    r = np.corrcoef(resid_x, resid_y)[0, 1]
    bread = np.linalg.inv(X.T @ X)
    e = yy - X @ beta
    ids = np.unique(groups)
    G, N, K = ids.size, len(x), X.shape[1]
    meat1 = np.zeros((K, K))
    meat2 = np.zeros((K, K))
    ell = np.zeros(K)
    ell[1] = 1.0
    columns = []
    hat = X @ bread @ X.T
    for g in ids:
        m = groups == g
        u = X[m].T @ e[m]
        meat1 += np.outer(u, u)
        w, q = np.linalg.eigh(np.eye(m.sum()) - hat[np.ix_(m, m)])
        a_g = q @ np.diag(w**-0.5) @ q.T  # (I − H_gg)^(−½)
        u2 = X[m].T @ a_g @ e[m]
        meat2 += np.outer(u2, u2)
        # Bell–McCaffrey: column g of (I − H)[:, g] A_g X_g B ℓ
        columns.append((np.eye(N)[:, m] - hat[:, m]) @ a_g @ X[m] @ bread @ ell)
    v1 = G / (G - 1) * (N - 1) / (N - K) * bread @ meat1 @ bread
    v2 = bread @ meat2 @ bread
    gtg = np.column_stack(columns).T @ np.column_stack(columns)
    df = np.trace(gtg) ** 2 / np.trace(gtg @ gtg)
    p1 = 2 * sps.t.sf(abs(beta[1]) / np.sqrt(v1[1, 1]), G - 1)
    p3 = 2 * sps.t.sf(abs(beta[1]) / np.sqrt(v2[1, 1]), df)
    return {"r": r, "beta": beta[1], "p1": p1, "p3": p3, "se1": np.sqrt(v1[1, 1]),
            "se3": np.sqrt(v2[1, 1]), "df3": df, "G": G}
