"""Per-head tables and the rules that decide from them: `head_statistics` (every association of
a metric with ln ‖q‖, raw and controlled), the agreement of the observational slope with the
causal gain and its verdict, consistency across document folds, and replication on held-out
documents. Every rule is computed from per-document moments with document-clustered tests.
"""

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from spectra_lens.errors import SpectraError
from spectra_lens.stats.inference import (
    _bootstrap_counts,
    _bootstrap_partial_r,
    _check_probability,
    _cov,
    _partial,
    _quantiles,
    _residual_corr,
    _t_pvalue,
    cluster_mean,
    cluster_wald,
    fdr,
    pearson,
)
from spectra_lens.stats.moments import DocumentMoments, _require_columns

__all__ = ["CONTROLS", "SMALL_G", "VERDICTS", "VERDICT_RULE", "agreement", "agreement_summary",
           "document_folds", "document_replication", "fold_consistency", "head_statistics",
           "verdict"]


# Below this many documents the clustered test (CR1, t with G − 1 df) is flagged as fragile.
SMALL_G = 30
# Covariates and norms, not outcomes: head_statistics tests the other variables against ln‖q‖.
_NOT_OUTCOMES = ("q_norm", "log_k_norm", "log_position", "sink_mass", "local_gain")
# The controls of every association: none, log position, log position and sink mass.
CONTROLS: dict[str, tuple[str, ...]] = {
    "": (),
    "pos": ("log_position",),
    "pos_sink": ("log_position", "sink_mass"),
}


def _name(stat: str, y: str, control: str) -> str:
    """Column name: `{stat}_logq_{y}` with `_given_{control}` for a controlled association."""
    return f"{stat}_logq_{y}" + (f"_given_{control}" if control else "")


def head_statistics(
    moments: DocumentMoments,
    *,
    ys: Sequence[str] | None = None,
    x: str = "log_q_norm",
    controls: dict[str, tuple[str, ...]] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    alpha: float = 0.05,
    seed: int = 0,
    test: str = "cr2",
    boot_chunk: int = 200,
) -> pd.DataFrame:
    """Per head, the association of each y with x = ln ‖q‖, raw and controlled, from moments.

    For every y and every control set c in `controls` ("" none, "pos" = log position,
    "pos_sink" = log position and sink mass) the columns (names from `_name`) are:

    - `r_logq_{y}[_given_c]`: Pearson r (partial r given c), and `r2_…` its square;
    - `slope_logq_{y}[_given_c]`: OLS coefficient of ln ‖q‖ for y on [1, ln ‖q‖, c] in units of
      y per unit ln ‖q‖ (nats per unit ln ‖q‖ for entropy), `slope_ci_low/high_…` its
      document-clustered t interval from the same test;
    - `p_doc_{test}_…`: the two-sided document-clustered Wald test (`cluster_wald`, `test` =
      "cr2" or "cr1") of that coefficient = 0, which is also the test of
      r = 0 (partial r = 0); `q_doc_{test}_…` its Benjamini–Hochberg q over heads;
    - `r_ci_low/high_…`: percentile interval of r over `n_boot` resamples of documents (each
      resample adds the chosen documents' moments: multinomial counts × moments);
    - `p_token_…`: the t-test that treats tokens as independent (n − 2 − k df); shown only to
      compare, it is not calibrated under clustering.

    Also `layer`, `head`, `n_tokens`, `n_documents` and `mean_{v}` for every variable. A
    RuntimeWarning says when fewer than `SMALL_G` documents carry the heads.
    """
    if n_boot < 1:
        raise SpectraError(f"n_boot must be >= 1; got {n_boot}")
    _check_probability("ci", ci)
    _check_probability("alpha", alpha)
    controls = CONTROLS if controls is None else controls
    if ys is None:
        ys = [v for v in moments.variables if v not in (x, *_NOT_OUTCOMES)]
    ix = moments.index(x)
    zs = {c: [moments.index(v) for v in names] for c, names in controls.items()}
    iy = [moments.index(y) for y in ys]
    s_docs, mu = moments.augmented()
    g = (moments.n > 0).sum(axis=0)
    if moments.n_documents < 2:
        raise SpectraError(f"document-clustered statistics need >= 2 documents; got "
                           f"{moments.n_documents}")
    if g.min() < SMALL_G:
        warnings.warn(
            f"only {int(g.min())} documents: the document-clustered p-values are approximate "
            f"with so few clusters (below {SMALL_G}); treat them with care and add documents",
            RuntimeWarning, stacklevel=2)
    n_tok = moments.n.sum(axis=0)
    columns: dict[str, np.ndarray] = {"layer": moments.layers, "head": moments.heads,
                                      "n_tokens": n_tok.astype(np.int64),
                                      "n_documents": g.astype(np.int64)}
    for j, v in enumerate(moments.variables):
        columns[f"mean_{v}"] = mu[:, j].copy()  # mu is the cached, read-only one
    c_all = _cov(s_docs.sum(axis=0))
    for c, z in zs.items():
        r = _residual_corr(c_all, ix, iy, z)  # (head, ny)
        wald = cluster_wald(s_docs, ix, iy, z, kind=test, ci=ci)
        for k, y in enumerate(ys):
            columns[_name("r", y, c)] = r[:, k]
            columns[_name("r2", y, c)] = r[:, k] ** 2
            columns[_name("slope", y, c)] = wald["beta"][k]
            columns[_name("slope_ci_low", y, c)] = wald["low"][k]
            columns[_name("slope_ci_high", y, c)] = wald["high"][k]
            columns[_name(f"p_doc_{test}", y, c)] = wald["p"][k]
            columns[_name(f"q_doc_{test}", y, c)] = fdr(wald["p"][k])
            columns[_name("p_token", y, c)] = _t_pvalue(r[:, k], n_tok, n_covariates=len(z))
    # The document bootstrap: resampled moments are counts @ per-document moments. Only the
    # variables the correlations use, ordered [x, ys, controls].
    control_vars = list(dict.fromkeys(j for z in zs.values() for j in z))
    order = [ix, *iy, *control_vars]
    keep = [0, *(j + 1 for j in order)]
    counts = _bootstrap_counts(moments.n_documents, n_boot, seed)
    local_z = {c: [order.index(j) for j in z] for c, z in zs.items()}
    boot = _bootstrap_partial_r(s_docs, keep, counts, len(iy), local_z, chunk=boot_chunk)
    enough = g >= 2
    for c in zs:
        low, high = _quantiles(boot[c], (0.5 - ci / 2, 0.5 + ci / 2))
        for k, y in enumerate(ys):
            columns[_name("r_ci_low", y, c)] = np.where(enough, low[:, k], np.nan)
            columns[_name("r_ci_high", y, c)] = np.where(enough, high[:, k], np.nan)
    out = pd.DataFrame(columns)
    _warn_undefined(out, [_name("r", y, "") for y in ys])
    return out


def _warn_undefined(summary: pd.DataFrame, columns: list[str]) -> None:
    for column in columns:
        undefined = int(summary[column].isna().sum())
        if undefined:
            warnings.warn(
                f"{column} is NaN for {undefined} head(s): a constant metric has no correlation",
                RuntimeWarning,
                stacklevel=3,
            )


VERDICT_RULE = (
    "g = the analytic causal gain (mean of −Var_p(s) over the head's tokens, the entropy change "
    "per unit ln α when the head's query is scaled); [lo, hi] = the document-clustered interval "
    "of the observational slope dH/d ln‖q‖ given log position. 'agrees': lo ≤ g ≤ hi and hi < 0 "
    "(a negative slope, as large as a pure temperature predicts); 'stronger than temperature': "
    "hi < g; 'weaker than temperature': g < lo and hi < 0; 'opposite sign': lo > 0 (entropy rises "
    "with ‖q‖ although scaling q lowers it); 'no norm effect seen': lo ≤ 0 ≤ hi and g outside "
    "[lo, hi]; 'inconclusive': lo ≤ 0 ≤ hi and g inside [lo, hi]."
)


VERDICTS = ("agrees", "stronger than temperature", "weaker than temperature", "opposite sign",
            "no norm effect seen", "inconclusive")


def verdict(slope_low, slope_high, gain) -> np.ndarray:
    """The per-head verdict in words from the slope interval and the causal gain (`VERDICT_RULE`)."""
    lo, hi, g = (np.asarray(a, dtype=float) for a in (slope_low, slope_high, gain))
    out = np.full(lo.shape, "undefined", dtype=object)
    covers_zero = (lo <= 0) & (hi >= 0)
    covers_g = (lo <= g) & (g <= hi)
    out[(hi < 0) & covers_g] = "agrees"
    out[hi < g] = "stronger than temperature"
    out[(g < lo) & (hi < 0)] = "weaker than temperature"
    out[lo > 0] = "opposite sign"
    out[covers_zero & ~covers_g] = "no norm effect seen"
    out[covers_zero & covers_g] = "inconclusive"
    return out


def agreement(moments: DocumentMoments, *, control: str = "pos", test: str = "cr2",
              ci: float = 0.95, finite_difference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per head: the observational slope dH/d ln‖q‖ against the causal gain on the same tokens.

    Columns: `layer`, `head`, `n_tokens`, `n_documents`; `obs_slope` (nats per unit ln‖q‖,
    given `control`; "" for none) with `obs_slope_ci_low/high` and `p_obs_slope_doc_{test}`
    (`cluster_wald`); `obs_slope_raw` (no control); `gain_analytic` = mean of the per-token
    local gain −Var_p(s) (dH/d ln α at α = 1 under query scaling) with a document-clustered
    t interval `gain_ci_low/high`; `ratio` = obs_slope / gain_analytic (1 for a pure
    temperature); `temperature_share` = gain² · Var(ln‖q‖) / Var(H), the share of the entropy
    variance a pure temperature effect of the observed norm variation would explain;
    `verdict` (`VERDICT_RULE`). With `finite_difference` (columns layer, head, gain_fd and
    others, e.g. gain_fd_ci_low/high, from real forward passes) its columns join, with
    `ratio_fd` = obs_slope / gain_fd.
    """
    for v in ("log_q_norm", "entropy", "local_gain"):
        moments.index(v)
    zs = [moments.index(v) for v in CONTROLS[control]]
    s_docs, mu = moments.augmented()
    ix, iy, ig = (moments.index(v) for v in ("log_q_norm", "entropy", "local_gain"))
    wald = cluster_wald(s_docs, ix, iy, zs, kind=test, ci=ci)
    raw = cluster_wald(s_docs, ix, iy, (), kind=test, ci=ci)
    gain, gain_low, gain_high = cluster_mean(s_docs, mu, ig, ci=ci)
    c = _cov(s_docs.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = wald["beta"] / gain
        share = gain**2 * c[:, ix, ix] / c[:, iy, iy]
    out = pd.DataFrame({
        "layer": moments.layers, "head": moments.heads,
        "n_tokens": wald["n_tokens"].astype(np.int64),
        "n_documents": wald["n_documents"].astype(np.int64),
        "obs_slope": wald["beta"], "obs_slope_ci_low": wald["low"],
        "obs_slope_ci_high": wald["high"], f"p_obs_slope_doc_{test}": wald["p"],
        "obs_slope_raw": raw["beta"],
        "gain_analytic": gain, "gain_ci_low": gain_low, "gain_ci_high": gain_high,
        "ratio": ratio, "temperature_share": share,
    })
    if finite_difference is not None:
        _require_columns(finite_difference, ("layer", "head", "gain_fd"), "finite_difference")
        keep = [col for col in finite_difference.columns
                if col in ("layer", "head") or col not in out.columns]
        out = out.merge(finite_difference[keep], on=["layer", "head"], how="left")
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ratio_fd"] = out["obs_slope"] / out["gain_fd"]
    out["verdict"] = verdict(out["obs_slope_ci_low"], out["obs_slope_ci_high"],
                             out["gain_analytic"])
    return out


def agreement_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Across heads and per layer: heads per verdict, medians, Spearman(obs slope, gain)."""
    def summarize(frame: pd.DataFrame) -> dict:
        row = {"n_heads": len(frame)}
        for v in VERDICTS:
            row[f"n_{v.replace(' ', '_')}"] = int((frame["verdict"] == v).sum())
        row["median_obs_slope"] = frame["obs_slope"].median()
        row["median_gain_analytic"] = frame["gain_analytic"].median()
        row["median_ratio"] = frame["ratio"].median()
        row["median_temperature_share"] = frame["temperature_share"].median()
        row["frac_obs_slope_negative"] = float((frame["obs_slope"] < 0).mean())
        if len(frame) >= 3:
            rho, p = stats.spearmanr(frame["obs_slope"], frame["gain_analytic"],
                                     nan_policy="omit")
        else:
            rho, p = np.nan, np.nan
        row["spearman_obs_slope_gain"] = float(rho)
        row["p_spearman_heads_independent"] = float(p)
        return row

    rows = [{"layer": "all", **summarize(table)}]
    for layer, frame in table.groupby("layer", sort=True):
        rows.append({"layer": str(layer), **summarize(frame)})
    return pd.DataFrame(rows)


def document_folds(documents, n_folds: int, seed: int) -> list[np.ndarray]:
    """Split document ids into `n_folds` disjoint random groups of near-equal size."""
    ids = np.random.default_rng(seed).permutation(np.asarray(documents))
    return [np.sort(f) for f in np.array_split(ids, n_folds) if f.size]


def fold_consistency(moments: DocumentMoments, *, y: str = "entropy", n_folds: int = 4,
                     alpha: float = 0.05, threshold: float = 0.8, seed: int = 0,
                     test: str = "cr2") -> pd.DataFrame:
    """Share of disjoint document folds whose slope of y on ln‖q‖ is significant (document-
    clustered test within the fold, p < alpha) with the sign of the pooled slope, per head.

    Columns: `layer`, `head`, `n_folds` (folds where the head's test is defined), `r_fold_{k}`,
    `p_fold_{k}_doc_{test}`, `frac_same_sign`, `frac_significant_same_sign`, and `consistent`
    = frac_significant_same_sign >= threshold with n_folds >= 2.
    """
    folds = document_folds(moments.documents, n_folds, seed)
    ix, iy = moments.index("log_q_norm"), moments.index(y)
    s_all, _ = moments.augmented()
    pooled = cluster_wald(s_all, ix, iy, (), kind=test)["beta"]
    out = {"layer": moments.layers, "head": moments.heads}
    signs, sigs = [], []
    for k, docs in enumerate(folds):
        sub = moments.select(documents=docs)
        s, _ = sub.augmented()
        with np.errstate(invalid="ignore", divide="ignore"):
            r = pearson(*_partial(_cov(s.sum(axis=0)), ix, iy, ()))
        w = cluster_wald(s, ix, iy, (), kind=test) if docs.size >= 2 else None
        p = w["p"] if w is not None else np.full(len(moments.layers), np.nan)
        out[f"r_fold_{k}"] = r
        out[f"p_fold_{k}_doc_{test}"] = p
        signs.append(np.where(np.isfinite(p), np.sign(r) == np.sign(pooled), np.nan))
        sigs.append(np.where(np.isfinite(p), (np.sign(r) == np.sign(pooled)) & (p < alpha),
                             np.nan))
    signs, sigs = np.array(signs), np.array(sigs)
    counted = np.isfinite(signs).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["n_folds"] = counted
        out["frac_same_sign"] = np.nansum(signs, axis=0) / counted
        out["frac_significant_same_sign"] = np.nansum(sigs, axis=0) / counted
    frame = pd.DataFrame(out)
    frame["consistent"] = (frame["frac_significant_same_sign"] >= threshold) & (counted >= 2)
    return frame


def document_replication(moments: DocumentMoments, *, y: str = "entropy", alpha: float = 0.05,
                         seed: int = 0, test: str = "cr2") -> pd.DataFrame:
    """Discovery on a random half of the documents, replication on the other half.

    `selected`: BH q < alpha (document-clustered test) in the discovery half; `replicated`:
    selected, and in the replication half the slope has the same sign with the one-sided
    p (same test) < alpha. Columns `r_discovery`, `q_discovery_doc_{test}`, `r_replication`,
    `p_replication_doc_{test}_one_sided`, `selected`, `replicated`.
    """
    if moments.n_documents < 4:
        raise SpectraError(f"replication needs >= 4 documents; got {moments.n_documents}")
    halves = document_folds(moments.documents, 2, seed)
    ix, iy = moments.index("log_q_norm"), moments.index(y)
    res = []
    for docs in halves:
        sub = moments.select(documents=docs)
        s, _ = sub.augmented()
        w = cluster_wald(s, ix, iy, (), kind=test)
        r = pearson(*_partial(_cov(s.sum(axis=0)), ix, iy, ()))
        res.append((r, w))
    (r_d, w_d), (r_r, w_r) = res
    q_d = fdr(w_d["p"])
    sign = np.sign(w_d["beta"])
    with np.errstate(invalid="ignore", divide="ignore"):
        t = w_r["beta"] / w_r["se"]
        p_one = stats.t.sf(sign * t, w_r["df"])
    selected = q_d < alpha
    frame = pd.DataFrame({
        "layer": moments.layers, "head": moments.heads, "r_discovery": r_d,
        f"q_discovery_doc_{test}": q_d, "r_replication": r_r,
        f"p_replication_doc_{test}_one_sided": p_one, "selected": selected,
    })
    frame["replicated"] = selected & (np.sign(w_r["beta"]) == sign) & (p_one < alpha)
    return frame
