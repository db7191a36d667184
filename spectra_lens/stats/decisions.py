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
    cluster_mean_cr2,
    cluster_wald,
    fdr,
    pearson,
    slope_minus_mean,
)
from spectra_lens.stats.moments import DocumentMoments, _require_columns

__all__ = ["CONTROLS", "DIRECTIONS", "EQUIVALENCE_MARGIN", "HEADLINE", "SMALL_G", "VERDICTS", "VERDICT_RULE",
           "agreement", "agreement_summary", "document_folds", "document_replication",
           "equivalence_p", "fold_consistency", "head_statistics", "verdict", "verdict_rule"]


# Below this many documents the clustered test (CR1, t with G − 1 df) is flagged as fragile.
SMALL_G = 30
# Covariates and norms, not outcomes: head_statistics tests the other variables against ln‖q‖.
_NOT_OUTCOMES = ("q_norm", "log_k_norm", "log_position", "sink_mass", "local_gain")
# The controls of every association: none, log position (the headline: position confounds
# ln‖q‖ and entropy), and log position with the sink mass. Scaling q changes the first key's
# mass (∂p₀/∂ln α = p₀(s₀ − E_p[s])): the sink mass is a mediator of the norm's effect, not a
# confounder, so the association given it is labelled mediator-adjusted, never the headline.
CONTROLS: dict[str, tuple[str, ...]] = {
    "": (),
    "pos": ("log_position",),
    "mediator_adjusted": ("log_position", "sink_mass"),
}
# The control of the headline slope (agreement, fold consistency, replication).
HEADLINE = "pos"


def _name(stat: str, y: str, control: str) -> str:
    """Column name: `{stat}_logq_{y}`, with `_given_{control}` for a control set other than
    "mediator_adjusted", which gives `_mediator_adjusted` (given log position and sink mass)."""
    if not control:
        return f"{stat}_logq_{y}"
    if control == "mediator_adjusted":
        return f"{stat}_logq_{y}_mediator_adjusted"
    return f"{stat}_logq_{y}_given_{control}"


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

    For every y and every control set c in `controls` ("" none, "pos" = log position, the
    headline; "mediator_adjusted" = log position and sink mass, a mediator) the columns (names
    from `_name`) are:

    - `r_logq_{y}[_given_c]`: Pearson r (partial r given c), and `r2_…` its square;
    - `slope_logq_{y}[_given_c]`: OLS coefficient of ln ‖q‖ for y on [1, ln ‖q‖, c] in units of
      y per unit ln ‖q‖ (nats per unit ln ‖q‖ for entropy), `slope_ci_low/high_…` its
      document-clustered t interval from the same test;
    - `p_doc_{test}_…`: the two-sided document-clustered Wald test (`cluster_wald`, `test` =
      "cr2" or "cr1") of that coefficient = 0, which is also the test of
      r = 0 (partial r = 0); `q_doc_{test}_…` its Benjamini–Hochberg q, the family being every
      head of the table (one family per column: per y and control set);
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


# The equivalence margin of the verdict: "equivalent to a temperature" needs b/g within 1 ± this.
EQUIVALENCE_MARGIN = 0.2
VERDICTS = ("equivalent to a temperature", "differs", "undetermined")
DIRECTIONS = ("weaker", "stronger", "opposite sign")


def verdict_rule(margin: float = EQUIVALENCE_MARGIN, alpha: float = 0.05) -> str:
    """The verdict rule in words, with its margin and level (`VERDICT_RULE` at the defaults)."""
    lo, hi = 1 - margin, 1 + margin
    return (
        "b = the observational slope dH/d ln‖q‖ given log position (OLS of entropy on [1, ln‖q‖, "
        "ln(position + 1)]); g = the analytic causal gain (mean over the head's tokens of "
        "−Var_p(s), dH/d ln α when the query is scaled). Both come from the same documents: "
        "every contrast b − a·g has a joint document-clustered CR2 variance (per-document scores "
        "of both, so their covariance counts) and Bell–McCaffrey degrees of freedom "
        "(stats.inference.slope_minus_mean). 'equivalent to a temperature': two one-sided tests "
        f"at level {alpha:g} reject both b/g ≤ {lo:g} and b/g ≥ {hi:g} (margin ±{margin:g}·|g|; "
        f"the tests of b − {lo:g}·g and b − {hi:g}·g toward the inside, TOST p = the larger "
        f"one-sided p < {alpha:g}). 'differs': the two-sided test of b = g (b − g with the joint "
        f"variance) has Benjamini–Hochberg q < {alpha:g}, the family being every head of the run "
        "with a defined test, and the head is not equivalent. 'undetermined': neither. "
        "direction, for every head whose test of b = g has q < "
        f"{alpha:g}: 'stronger' when b − g has the sign of g (|b| > |g|), else 'weaker' "
        "(|b| < |g|), or 'opposite sign' when the slope's own 95% interval lies wholly on the "
        "other side of 0 from g; empty otherwise. A wider interval (more noise) can only raise "
        "the TOST p, so it never makes a head equivalent."
    )


VERDICT_RULE = verdict_rule()


def equivalence_p(estimate_lower, se_lower, df_lower, estimate_upper, se_upper, df_upper,
                  gain) -> dict[str, np.ndarray]:
    """Two one-sided tests that the ratio b/g lies inside (1 − m, 1 + m).

    `estimate_lower` = b − (1 − m)·g and `estimate_upper` = b − (1 + m)·g with their standard
    errors and degrees of freedom; s = sign(g). b/g > 1 − m ⇔ s·estimate_lower > 0 and
    b/g < 1 + m ⇔ s·estimate_upper < 0, so t_lower = s·estimate_lower/se_lower with
    p_lower = P(T > t_lower), t_upper = s·estimate_upper/se_upper with p_upper = P(T < t_upper),
    and the TOST p = max(p_lower, p_upper). NaN where any input is NaN or g = 0.
    """
    el, sl, dl, eu, su, du, g = (np.asarray(v, dtype=float) for v in (
        estimate_lower, se_lower, df_lower, estimate_upper, se_upper, df_upper, gain))
    sign = np.where(g != 0, np.sign(g), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_lower = sign * el / sl
        t_upper = sign * eu / su
        p_lower = stats.t.sf(t_lower, dl)
        p_upper = stats.t.cdf(t_upper, du)
    p = np.where(np.isnan(p_lower) | np.isnan(p_upper), np.nan, np.maximum(p_lower, p_upper))
    out = {"t_lower": t_lower, "t_upper": t_upper, "p_lower": p_lower, "p_upper": p_upper, "p": p}
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def verdict(p_equivalence, q_difference, slope, gain, slope_low, slope_high, *,
            alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(verdict, direction) per head from the TOST p, the BH q of b = g, the slope b with its
    interval and the gain g (`VERDICT_RULE`). NaN inputs give "undefined" and no direction."""
    _check_probability("alpha", alpha)
    pe, qd, b, g, lo, hi = (np.asarray(v, dtype=float) for v in (
        p_equivalence, q_difference, slope, gain, slope_low, slope_high))
    defined = ~(np.isnan(pe) | np.isnan(qd) | np.isnan(b) | np.isnan(g))
    equivalent = defined & (pe < alpha)
    differs = defined & (qd < alpha)
    out = np.full(pe.shape, "undefined", dtype=object)
    out[defined] = "undetermined"
    out[differs] = "differs"
    out[equivalent] = "equivalent to a temperature"
    direction = np.full(pe.shape, "", dtype=object)
    same = np.sign(b - g) == np.sign(g)
    other_side = np.where(g < 0, lo > 0, hi < 0)
    direction[differs & same] = "stronger"
    direction[differs & ~same] = "weaker"
    direction[differs & ~same & other_side] = "opposite sign"
    return out, direction


def agreement(moments: DocumentMoments, *, control: str = HEADLINE, test: str = "cr2",
              ci: float = 0.95, margin: float = EQUIVALENCE_MARGIN, alpha: float = 0.05,
              finite_difference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per head: the observational slope dH/d ln‖q‖ against the causal gain on the same tokens,
    and the verdict of `verdict_rule(margin, alpha)`.

    Columns: `layer`, `head`, `n_tokens`, `n_documents`; `obs_slope` (nats per unit ln‖q‖,
    given `control`: "pos" = log position, the headline; "" none; "mediator_adjusted" = log
    position and sink mass) with `obs_slope_ci_low/high`, `obs_slope_se` and
    `p_obs_slope_doc_{test}` (`cluster_wald`); `obs_slope_raw` (no control); `gain_analytic` =
    mean of the per-token local gain −Var_p(s) (dH/d ln α at α = 1 under query scaling) with
    its CR2 document-clustered t interval `gain_ci_low/high` (Bell–McCaffrey df) and
    `gain_se`; `cov_slope_gain` (their joint clustered covariance); `difference` = obs_slope −
    gain_analytic with `difference_se`, `difference_df`, `t_difference`,
    `p_difference_doc_cr2` and `q_difference_doc_cr2` (BH over every head of the table);
    `equivalence_margin`; `t_equivalence_lower/upper`, `p_equivalence_lower/upper` and
    `p_equivalence` (the TOST p, `equivalence_p`); `ratio` = obs_slope / gain_analytic (1 for
    a pure temperature); `temperature_share` = gain² · Var(ln‖q‖) / Var(H), the share of the
    entropy variance a pure temperature effect of the observed norm variation would explain;
    `verdict` and `direction` (`verdict`). With `finite_difference` (columns layer, head,
    gain_fd and others, e.g. gain_fd_ci_low/high, from real forward passes) its columns join,
    with `ratio_fd` = obs_slope / gain_fd.
    """
    if not 0 < margin < 1:
        raise SpectraError(f"equivalence margin must lie strictly between 0 and 1 (a share of "
                           f"|gain|); got {margin}")
    _check_probability("alpha", alpha)
    for v in ("log_q_norm", "entropy", "local_gain"):
        moments.index(v)
    zs = [moments.index(v) for v in CONTROLS[control]]
    s_docs, mu = moments.augmented()
    ix, iy, ig = (moments.index(v) for v in ("log_q_norm", "entropy", "local_gain"))
    wald = cluster_wald(s_docs, ix, iy, zs, kind=test, ci=ci)
    raw = cluster_wald(s_docs, ix, iy, (), kind=test, ci=ci)
    gain, gain_low, gain_high, gain_se, _ = cluster_mean_cr2(s_docs, mu, ig, ci=ci)
    joint = slope_minus_mean(s_docs, ix, iy, zs, ig, scales=(1.0, 1 - margin, 1 + margin),
                             ci=ci, mu=mu)
    diff, diff_se, diff_df = joint["estimate"][0], joint["se"][0], joint["df"][0]
    with np.errstate(invalid="ignore", divide="ignore"):
        t_diff = diff / diff_se
        p_diff = 2 * stats.t.sf(np.abs(t_diff), diff_df)
    q_diff = fdr(p_diff)
    tost = equivalence_p(joint["estimate"][1], joint["se"][1], joint["df"][1],
                         joint["estimate"][2], joint["se"][2], joint["df"][2], gain)
    c = _cov(s_docs.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = wald["beta"] / gain
        share = gain**2 * c[:, ix, ix] / c[:, iy, iy]
    out = pd.DataFrame({
        "layer": moments.layers, "head": moments.heads,
        "n_tokens": wald["n_tokens"].astype(np.int64),
        "n_documents": wald["n_documents"].astype(np.int64),
        "obs_slope": wald["beta"], "obs_slope_ci_low": wald["low"],
        "obs_slope_ci_high": wald["high"], "obs_slope_se": wald["se"],
        f"p_obs_slope_doc_{test}": wald["p"],
        "obs_slope_raw": raw["beta"],
        "gain_analytic": gain, "gain_ci_low": gain_low, "gain_ci_high": gain_high,
        "gain_se": gain_se, "cov_slope_gain": joint["cov"],
        "difference": diff, "difference_se": diff_se, "difference_df": diff_df,
        "t_difference": t_diff, "p_difference_doc_cr2": p_diff, "q_difference_doc_cr2": q_diff,
        "equivalence_margin": float(margin),
        "t_equivalence_lower": tost["t_lower"], "t_equivalence_upper": tost["t_upper"],
        "p_equivalence_lower": tost["p_lower"], "p_equivalence_upper": tost["p_upper"],
        "p_equivalence": tost["p"],
        "ratio": ratio, "temperature_share": share,
    })
    if finite_difference is not None:
        _require_columns(finite_difference, ("layer", "head", "gain_fd"), "finite_difference")
        keep = [col for col in finite_difference.columns
                if col in ("layer", "head") or col not in out.columns]
        out = out.merge(finite_difference[keep], on=["layer", "head"], how="left")
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ratio_fd"] = out["obs_slope"] / out["gain_fd"]
    out["verdict"], out["direction"] = verdict(
        out["p_equivalence"], out["q_difference_doc_cr2"], out["obs_slope"],
        out["gain_analytic"], out["obs_slope_ci_low"], out["obs_slope_ci_high"], alpha=alpha)
    return out


def agreement_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Across heads and per layer: heads per verdict, medians, Spearman(obs slope, gain)."""
    def summarize(frame: pd.DataFrame) -> dict:
        row = {"n_heads": len(frame)}
        for v in VERDICTS:
            row[f"n_{v.replace(' ', '_')}"] = int((frame["verdict"] == v).sum())
        for d in DIRECTIONS:
            row[f"n_differs_{d.replace(' ', '_')}"] = int(
                ((frame["verdict"] == "differs") & (frame["direction"] == d)).sum())
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
                     test: str = "cr2", control: str = HEADLINE) -> pd.DataFrame:
    """Share of disjoint document folds whose slope of y on ln‖q‖ given `control` (default log
    position, the headline slope) is significant (document-clustered test within the fold,
    p < alpha, no multiplicity correction: each head is judged on its own folds) with the sign
    of the pooled slope (given the same control), per head.

    Columns: `layer`, `head`, `n_folds` (folds where the head's test is defined), `r_fold_{k}`
    (partial r given the control), `p_fold_{k}_doc_{test}`, `frac_same_sign`,
    `frac_significant_same_sign`, and `consistent` = frac_significant_same_sign >= threshold
    with n_folds >= 2.
    """
    folds = document_folds(moments.documents, n_folds, seed)
    ix, iy = moments.index("log_q_norm"), moments.index(y)
    zs = [moments.index(v) for v in CONTROLS[control]]
    s_all, _ = moments.augmented()
    pooled = cluster_wald(s_all, ix, iy, zs, kind=test)["beta"]
    out = {"layer": moments.layers, "head": moments.heads}
    signs, sigs = [], []
    for k, docs in enumerate(folds):
        sub = moments.select(documents=docs)
        s, _ = sub.augmented()
        with np.errstate(invalid="ignore", divide="ignore"):
            r = pearson(*_partial(_cov(s.sum(axis=0)), ix, iy, zs))
        w = cluster_wald(s, ix, iy, zs, kind=test) if docs.size >= 2 else None
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
                         seed: int = 0, test: str = "cr2",
                         control: str = HEADLINE) -> pd.DataFrame:
    """Discovery on a random half of the documents, replication on the other half, of the slope
    of y on ln‖q‖ given `control` (default log position, the headline slope).

    `selected`: BH q < alpha (document-clustered test) in the discovery half, the family being
    every head with a defined test in that half; `replicated`: selected, and in the replication
    half the slope has the same sign with the one-sided p (same test) < alpha. Columns
    `r_discovery`, `q_discovery_doc_{test}`, `r_replication` (partial r given the control),
    `p_replication_doc_{test}_one_sided`, `selected`, `replicated`.
    """
    if moments.n_documents < 4:
        raise SpectraError(f"replication needs >= 4 documents; got {moments.n_documents}")
    halves = document_folds(moments.documents, 2, seed)
    ix, iy = moments.index("log_q_norm"), moments.index(y)
    zs = [moments.index(v) for v in CONTROLS[control]]
    res = []
    for docs in halves:
        sub = moments.select(documents=docs)
        s, _ = sub.augmented()
        w = cluster_wald(s, ix, iy, zs, kind=test)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = pearson(*_partial(_cov(s.sum(axis=0)), ix, iy, zs))
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
