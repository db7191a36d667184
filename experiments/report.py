"""The report of a results directory (`spectra_lens.present.report`) over the experiments.

    spectra-lens report RESULTS_DIR [--out FILE] [--overwrite]   (default: RESULTS_DIR/report.html)
    spectra-lens report RESULTS_DIR --pdf              (also report.pdf, printed by Chromium)

`EXPERIMENTS` names the experiments a report shows, in page order: a run directory is one whose
`manifest.json` names one of them, and its figures are built by that experiment module's own
`figures(tables)` from the CSVs its `OUTPUTS` declares. `SUMMARIES` read each run's headline
numbers, counts and strongest heads from its own tables for the top of the page; `VIEWS` say how
a table is sorted and which columns come first where the declaration's order is not the most
informative. The functions here are the library's with these experiments filled in.

An existing --out file (or the PDF beside it) is replaced only with --overwrite; the default
RESULTS_DIR/report.html is replaced when it is a report page.
"""

import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectra_lens.errors import SpectraError
from spectra_lens.present import report as R
from spectra_lens.present.report import Findings, Run, View, run_figures
from spectra_lens.validate import HeadRef

__all__ = ["EXPERIMENTS", "SUMMARIES", "VIEWS", "Run", "build_report", "command", "experiments", "find_runs",
           "run_figures", "write_report"]

# experiment name (manifest "experiment") -> module with OUTPUTS and figures(tables)
EXPERIMENTS: dict[str, str] = {
    "observational": "spectra_lens.experiments.observational",
    "intervention": "spectra_lens.experiments.intervention",
    "gain": "spectra_lens.experiments.gain",
    "qk_control": "spectra_lens.experiments.qk_control",
    "head_types": "spectra_lens.experiments.head_types",
    "ablate_norm": "spectra_lens.experiments.ablate_norm",
    "causal_map": "spectra_lens.experiments.causal_map",
    "length": "spectra_lens.experiments.length",
}

_TOP = 5  # strongest heads on the first screen


def _heads(frame: pd.DataFrame, key: str, columns: tuple[str, ...], n: int = _TOP) -> pd.DataFrame:
    """The `n` rows of largest |key|, with the `columns` present."""
    order = frame[key].abs().sort_values(ascending=False, na_position="last").index
    return frame.loc[order[:n], [c for c in columns if c in frame.columns]]


def _ci_counts(frame: pd.DataFrame, low: str, high: str, what: str) -> dict[str, int]:
    return {f"{what} < 0 (interval below 0)": int((frame[high] < 0).sum()),
            "interval includes 0": int(((frame[low] <= 0) & (frame[high] >= 0)).sum()),
            f"{what} > 0 (interval above 0)": int((frame[low] > 0).sum())}


def _observational(t: dict[str, pd.DataFrame]) -> Findings:
    heads, sig, cons = t.get("head_summary"), t.get("significant_heads"), t.get("consistent_heads")
    agreement, summary = t.get("agreement"), t.get("agreement_summary")
    headline: list[tuple[str, Any]] = []
    n = len(heads) if heads is not None else None
    if heads is not None:
        headline.append(("heads measured", n))
        r = heads["r_logq_entropy"]
        headline.append(("median r(ln ‖q‖, entropy) over heads", f"{r.median():+.3f} ({int((r < 0).sum())} of {n} "
                                                                  "negative)"))
    if sig is not None:
        headline.append(("heads with a significant r (document-clustered test, BH)",
                         f"{len(sig)} of {n}" if n else len(sig)))
    if cons is not None and "consistent" in cons.columns:
        headline.append(("significant with the same sign in every document fold",
                         int(cons["consistent"].astype(bool).sum())))
    counts: dict[str, int] = {}
    if summary is not None and len(summary):
        row = summary[summary["layer"].astype(str) == "all"]
        row = row.iloc[0] if len(row) else None
        if row is not None:
            if "spearman_obs_slope_gain" in row:
                headline.append(("Spearman(observational slope, causal gain) across heads",
                                 f"{row['spearman_obs_slope_gain']:+.3f} "
                                 f"(p = {row.get('p_spearman_heads_independent', np.nan):.3g})"))
            if "median_ratio" in row:
                headline.append(("median ratio observational slope / causal gain", f"{row['median_ratio']:.3g}"))
            counts = {c[2:].replace("_", " "): int(row[c]) for c in summary.columns
                      if c.startswith("n_") and c != "n_heads" and pd.notna(row[c])}
    if agreement is not None and "norm_share" in agreement.columns and agreement["norm_share"].notna().any():
        ns = agreement["norm_share"]
        above = int((agreement["norm_share_ci_low"] > 0).sum())
        below = int((agreement["norm_share_ci_high"] < 0).sum())
        headline.append(("median norm share (Var H − Var H_cf) / Var H, exact counterfactual",
                         f"{ns.median():+.1%} (interval above 0: {above}, below 0: {below} heads)"))
    if not counts and agreement is not None and "verdict" in agreement.columns:
        counts = {str(k): int(v) for k, v in agreement["verdict"].value_counts().items()}
    strongest = None
    if heads is not None:
        strongest = _heads(heads, "r_logq_entropy", ("layer", "head", "r_logq_entropy", "r_ci_low_logq_entropy",
                                                      "r_ci_high_logq_entropy", "q_doc_cr2_logq_entropy"))
        if agreement is not None and "verdict" in agreement.columns:
            strongest = strongest.merge(agreement[["layer", "head", "obs_slope", "gain_analytic", "verdict"]],
                                        on=["layer", "head"], how="left")
    return Findings(headline, counts, "verdicts: observational slope vs causal gain (heads)", strongest,
                    "strongest heads: largest |r(ln ‖q‖, entropy)|")


def _gain(t: dict[str, pd.DataFrame]) -> Findings:
    g = t.get("gain_summary")
    if g is None:
        return Findings()
    headline = [("heads", len(g)), ("median entropy gain dH/d ln α", f"{g['gain_entropy'].median():+.3f}")]
    if "is_monotonic" in g.columns:
        headline.append(("heads whose entropy is monotonic in α", f"{int(g['is_monotonic'].astype(bool).sum())} "
                                                                  f"of {len(g)}"))
    counts = _ci_counts(g, "gain_entropy_ci_low", "gain_entropy_ci_high", "gain") \
        if {"gain_entropy_ci_low", "gain_entropy_ci_high"} <= set(g.columns) else {}
    return Findings(headline, counts, "entropy gain of each head (document interval)",
                    _heads(g, "gain_entropy", ("layer", "head", "head_type", "gain_entropy", "gain_entropy_ci_low",
                                               "gain_entropy_ci_high", "analytic_gain", "r_squared")),
                    "largest |entropy gain|")


def _intervention(t: dict[str, pd.DataFrame]) -> Findings:
    headline: list[tuple[str, Any]] = []
    rows = []
    for name, frame in t.items():
        if not name.startswith("q_scale_intervention_") or "scale" not in frame.columns:
            continue
        lo, hi = frame.loc[frame["scale"].idxmin()], frame.loc[frame["scale"].idxmax()]
        who = f"{HeadRef(int(lo['layer']), int(lo['head']))} ({lo.get('head_type', '')})"
        headline.append((f"{who}: entropy change at α = {lo['scale']:g} / {hi['scale']:g}",
                         f"{lo['delta_entropy']:+.3f} / {hi['delta_entropy']:+.3f} nats"))
        rows.append(frame)
    effects = t.get("intervention_effects")
    counts = {}
    if effects is not None and "own_effect" in effects.columns:
        counts = {str(k): int(v) for k, v in effects["own_effect"].value_counts().items()}
    control = t.get("control_selection")
    chosen = control[control["role"].notna()] if control is not None and "role" in control.columns else None
    return Findings(headline, counts, "own effect of each scaling (conditions × α)", chosen,
                    "the heads scaled: target and control")


def _qk_control(t: dict[str, pd.DataFrame]) -> Findings:
    s = t.get("sensitivity_summary")
    if s is None:
        return Findings()
    headline: list[tuple[str, Any]] = []
    target = s[s["is_target"].astype(bool)] if "is_target" in s.columns else s.iloc[:0]
    for r in target.itertuples():
        headline.append((f"target {HeadRef(int(r.layer), int(r.head))}: entropy slope, query / key scaling",
                         f"{r.entropy_slope_q:+.3f} / {r.entropy_slope_k:+.3f}"))
    others = s[~s["is_target"].astype(bool)] if "is_target" in s.columns else s
    if len(others) and "pattern_changed_k" in s.columns:
        headline.append(("other heads of the kv group changed by key scaling / by query scaling",
                         f"{int(others['pattern_changed_k'].astype(bool).sum())} / "
                         f"{int(others['pattern_changed_q'].astype(bool).sum())} of {len(others)}"))
    counts = {str(k): int(v) for k, v in s["bilinear"].map({True: "bilinear check holds",
                                                             False: "bilinear check fails"}).value_counts().items()} \
        if "bilinear" in s.columns else {}
    return Findings(headline, counts, "heads of the kv group", s[[c for c in (
        "layer", "head", "kv_head", "is_target", "entropy_slope_q", "entropy_slope_k", "sensitivity_ratio")
        if c in s.columns]].head(_TOP * 2), "sensitivity of each head of the kv group")


def _head_types(t: dict[str, pd.DataFrame]) -> Findings:
    h = t.get("head_types")
    if h is None:
        return Findings()
    headline: list[tuple[str, Any]] = [("heads", len(h))]
    for col in ("induction_score", "duplicate_token_score", "prev_token_score"):
        if col in h.columns:
            r = h.loc[h[col].idxmax()]
            headline.append((f"largest {col}", f"{r[col]:.3f} ({HeadRef(int(r['layer']), int(r['head']))})"))
    by = t.get("head_types_by_label")
    if by is not None and len(by):
        g = by[by["value"] == "analytic_gain"]
        if len(g):
            r = g.loc[g["mean"].idxmin()]
            headline.append(("most negative mean analytic gain by label", f"{r['label']} ({r['mean']:+.3f}, n = {r['n']})"))
    counts = {str(k): int(v) for k, v in h["label"].value_counts().items()}
    return Findings(headline, counts, "heads by label", _heads(h, "induction_score", (
        "layer", "head", "label", "induction_score", "duplicate_token_score", "prev_token_score",
        "sink_score", "analytic_gain")), "largest induction scores")


def _ablate_norm(t: dict[str, pd.DataFrame]) -> Findings:
    a = t.get("norm_ablation")
    if a is None or not len(a):
        return Findings()
    headline: list[tuple[str, Any]] = [("heads", len(a)),
                                       ("median KL(p ‖ p_ablated), norm ablation", f"{a['norm_kl'].median():.3g}")]
    for base, what in (("rotation", "rotation by the natural angular spread"), ("mean_ablation", "mean ablation")):
        col = f"{base}_kl"
        if col in a.columns and a[col].notna().any():
            headline.append((f"median KL, {what}", f"{a[col].median():.3g}"))
            headline.append((f"heads whose norm ablation moves the output less than {what}",
                             f"{int((a['norm_kl'] < a[col]).sum())} of {int(a[col].notna().sum())}"))
    counts = _ci_counts(a, "norm_delta_loss_ci_low", "norm_delta_loss_ci_high", "Δloss") \
        if {"norm_delta_loss_ci_low", "norm_delta_loss_ci_high"} <= set(a.columns) else {}
    return Findings(headline, counts, "next-token loss change under norm ablation (document interval)",
                    _heads(a, "norm_kl", ("layer", "head", "norm_kl", "norm_kl_ci_low", "norm_kl_ci_high",
                                          "rotation_kl", "mean_ablation_kl")),
                    "largest KL under norm ablation")


def _causal_map(t: dict[str, pd.DataFrame]) -> Findings:
    m, s = t.get("causal_map"), t.get("causal_map_summary")
    if m is None or not len(m):
        return Findings()
    headline: list[tuple[str, Any]] = [("heads × scales", len(m))]
    if s is not None:
        for r in s.itertuples():
            headline.append((f"α = {r.alpha:g}: Spearman({r.x}, {r.y}) across {int(r.n_heads)} heads",
                             f"{r.spearman:+.3f} [{r.spearman_ci_low:+.3f}, {r.spearman_ci_high:+.3f}]"))
    counts = _ci_counts(m, "delta_loss_ci_low", "delta_loss_ci_high", "Δloss") \
        if {"delta_loss_ci_low", "delta_loss_ci_high"} <= set(m.columns) else {}
    return Findings(headline, counts, "next-token loss change per head and scale (document interval)",
                    _heads(m, "kl", ("alpha", "layer", "head", "kl", "kl_ci_low", "kl_ci_high", "delta_loss",
                                     "gain_analytic")),
                    "largest downstream KL")


def _length(t: dict[str, pd.DataFrame]) -> Findings:
    s = t.get("length_summary")
    if s is None or not len(s):
        return Findings()
    headline: list[tuple[str, Any]] = [
        ("heads", len(s)),
        ("median slope of ln ‖q‖ on ln t", f"{s['slope_logq_logt'].median():+.3f}")]
    counts = {str(k): int(v) for k, v in s["logq_direction"].value_counts().items()} \
        if "logq_direction" in s.columns else {}
    return Findings(headline, counts, "direction of ln ‖q‖ with position (document interval)",
                    _heads(s, "slope_logq_logt", ("layer", "head", "slope_logq_logt", "slope_logq_logt_ci_low",
                                                  "slope_logq_logt_ci_high", "logq_direction")),
                    "largest |slope of ln ‖q‖ on ln t|")


# experiment -> its first-screen summary of a run's tables
SUMMARIES: dict[str, Callable[[dict[str, pd.DataFrame]], Findings]] = {
    "observational": _observational, "intervention": _intervention, "gain": _gain,
    "qk_control": _qk_control, "head_types": _head_types, "ablate_norm": _ablate_norm,
    "causal_map": _causal_map, "length": _length,
}


def _mean_fold_r(frame: pd.DataFrame) -> pd.DataFrame:
    folds = [c for c in frame.columns if c.startswith("r_fold_")]
    return frame.assign(mean_abs_r_folds=frame[folds].abs().mean(axis=1)) if folds else frame


# experiment -> {declared table pattern: how the report shows it}
VIEWS: dict[str, dict[str, View]] = {
    "observational": {
        # every consistent head has frac_significant_same_sign = 1: order by strength inside that
        "consistent_heads.csv": View(
            sort_abs=("consistent", "frac_significant_same_sign", "mean_abs_r_folds"),
            columns=("layer", "head", "consistent", "mean_abs_r_folds", "frac_significant_same_sign",
                     "frac_same_sign", "n_folds", "r_fold_0", "r_fold_1", "r_fold_2", "r_fold_3"),
            derive=_mean_fold_r),
        # the measured quantities first, the original study's columns after them
        "significant_heads.csv": View(
            sort_abs=("r_logq_entropy",),
            columns=("layer", "head", "r_logq_entropy", "slope_logq_entropy", "slope_ci_low_logq_entropy",
                     "slope_ci_high_logq_entropy", "q_doc_cr2_logq_entropy", "r_logq_entropy_given_pos_sink",
                     "mean_q_norm", "mean_entropy", "n_documents", "n_tokens")),
        "head_summary.csv": View(sort_abs=("r_logq_entropy",)),
        "agreement.csv": View(sort_abs=("obs_slope", "gain_analytic")),
    },
}


@dataclass(frozen=True)
class _Shown:
    """An experiment as the report sees it: its module's `OUTPUTS` and `figures`, with the
    summary and views above."""

    OUTPUTS: Any
    figures: Callable = field(repr=False)
    summary: Callable | None = field(default=None, repr=False)
    views: dict = field(default_factory=dict, repr=False)


def experiments() -> dict[str, object]:
    """{name: experiment} of `EXPERIMENTS`, in page order: each module's `OUTPUTS` and
    `figures`, with its `SUMMARIES` and `VIEWS`."""
    out = {}
    for name, module in EXPERIMENTS.items():
        m = importlib.import_module(module)
        out[name] = _Shown(m.OUTPUTS, m.figures, SUMMARIES.get(name), VIEWS.get(name, {}))
    return out


def find_runs(results_dir: str | os.PathLike) -> list[Run]:
    """The runs of the experiments at or below `results_dir` (`present.report.find_runs`)."""
    return R.find_runs(results_dir, experiments())


def build_report(results_dir: str | os.PathLike, **kwargs) -> str:
    """The report page of `results_dir` (`present.report.build_report`: `plotlyjs`, `link_from`)."""
    return R.build_report(results_dir, experiments(), **kwargs)


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 plotlyjs: str | None = None, overwrite: bool = False) -> Path:
    """Write the report of `results_dir` atomically to `out` (default RESULTS_DIR/report.html;
    `present.report.write_report`: an existing `out` only with `overwrite`)."""
    return R.write_report(results_dir, experiments(), out, plotlyjs=plotlyjs, overwrite=overwrite)


def _runs_summary(runs: list[Run]) -> Iterator[str]:
    for r in runs:
        yield f"{r.outputs.label} {r.experiment} ({r.status})"


def command(cfg, *, progress: bool = True) -> int:
    """`spectra-lens report` (a `config.ReportConfig`): write the page, print what it holds."""
    cfg.validate()
    overwrite = getattr(cfg, "overwrite", False)
    runs = find_runs(cfg.results_dir)
    if cfg.pdf and not overwrite:  # refused before anything is written
        pdf = (Path(cfg.out) if cfg.out else Path(cfg.results_dir) / R.REPORT_NAME).with_suffix(".pdf")
        if cfg.out is not None and (pdf.exists() or pdf.is_symlink()):
            raise SpectraError(f"{str(pdf)!r} exists: pass --overwrite to replace it, or name another --out")
    path = write_report(cfg.results_dir, cfg.out, plotlyjs=cfg.plotlyjs, overwrite=overwrite)
    missing = [k for k in EXPERIMENTS if k not in {r.experiment for r in runs}]
    print(f"wrote {path}: {', '.join(_runs_summary(runs))}"
          + (f"; not in this directory: {', '.join(missing)}" if missing else ""))
    if cfg.pdf:  # drawn by the same headless browser that exports the figures' images
        from spectra_lens.present.figures.export import print_pdf

        print(f"wrote {print_pdf(path, path.with_suffix('.pdf'))}")
    return 0
