"""EXP2, gain: how strongly every head's attention sharpness responds to its query scale.

    python -m experiments.gain [--alphas ...] [--n-sequences 16] [--seq-len 128] [--model M]
        [--corpus C] [--out DIR] [--target-layer L --target-head H ...] [--overwrite]
    spectra-lens gain ...

For every head, the metrics at each α of the grid (default 21 log-spaced values 1/4..4) come
from `sweep.head_curves`: the fast path softmax(α·s) from one unscaled pass where the layer's
logits are bilinear in q, real forward passes with QueryScale elsewhere (`method`, `reason`).
Each metric's per-α mean over sequences is fitted against ln α by least squares
(`stats.fit_log_slopes`): the slope is the head's gain over the grid, with its standard error,
R² and a monotonicity flag; the slope's interval is a t-interval over per-sequence slopes. The
analytic local gain dH/d ln α at α = 1 = −Var_p(s) (free from the unscaled pass) is reported
with a t-interval over sequences, and `fd_gain_entropy` is the central difference of the
measured entropy around α = 1 on the grid, which it should match.

Outputs (in --out): `gain_summary.csv` (one row per head), `gain_curves.csv` (one row per head
× α), figures under `figures/` (layer × head heatmaps of the gains, fit plots of the target and
control heads, their bar comparison, fitted vs analytic gain) and `manifest.json`. The target /
control heads only choose which fits are drawn (rule: experiments/_common.py).
"""

import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from spectra_lens import figures as figs
from spectra_lens.config import GainConfig
from spectra_lens.errors import SpectraError
from spectra_lens.layout import attention_layout
from spectra_lens.stats import fit_log_slopes, t_interval
from spectra_lens.sweep import HeadSweep, head_curves

from . import _common as C

__all__ = ["GainResult", "compute", "gain_table", "command", "main", "run"]

log = logging.getLogger(__name__)
EXPERIMENT = "gain"

# metric of the sweep -> gain column; the first is the primary fit (r_squared, std_error, ...)
_GAINS = {"entropy": "gain_entropy", "max_attn": "gain_max_attn", "k_eff_exp": "gain_k_eff",
          "k_eff_pr": "gain_k_eff_pr", "k_eff_top90": "gain_k_eff_top90"}


@dataclass(frozen=True, repr=False)
class GainResult:
    """The tables of one EXP2 run."""

    summary: pd.DataFrame  # gain_summary.csv: one row per head
    curves: pd.DataFrame  # gain_curves.csv: one row per head × α
    sweep: HeadSweep
    choice: C.HeadChoice
    out: Path | None = None

    def __repr__(self) -> str:
        s = self.summary
        return (f"GainResult(heads={len(s)}, alphas={len(self.sweep.alphas)}, "
                f"fast/exact layers={self.sweep.method.count('fast')}/{self.sweep.method.count('exact')}, "
                f"out={self.out})")

    def _repr_html_(self) -> str:
        cols = ["layer", "head", "gain_entropy", "analytic_gain", "r_squared", "is_monotonic", "method"]
        top = self.summary.reindex(self.summary["gain_entropy"].abs().sort_values(ascending=False).index)
        shown = top[[c for c in cols if c in top.columns]].head(10)
        return (f"<b>{escape(repr(self))}</b><p>most sensitive heads (|dH/d ln α|):</p>"
                + shown.to_html(index=False, float_format="%.4g"))


def _central_difference(alphas: tuple[float, ...], values: np.ndarray) -> np.ndarray:
    """(v(α₊) − v(α₋)) / (ln α₊ − ln α₋) around α = 1 on the grid (NaN without 1 and neighbours)."""
    if 1.0 not in alphas:
        return np.full(values.shape[1:], np.nan)
    i = alphas.index(1.0)
    if i == 0 or i == len(alphas) - 1:
        return np.full(values.shape[1:], np.nan)
    return (values[i + 1] - values[i - 1]) / (np.log(alphas[i + 1]) - np.log(alphas[i - 1]))


def gain_table(sweep: HeadSweep, layout, *, ci: float = 0.95) -> pd.DataFrame:
    """One row per head: fitted gains of every metric against ln α, the analytic gain and the
    central difference at α = 1, with `method` / `reason` from the sweep.

    Columns: `layer`, `head`, `gain_entropy`, `gain_max_attn`, `gain_k_eff` (k_eff = exp(H)),
    `gain_k_eff_pr`, `gain_k_eff_top90` with `_ci_low/_ci_high` (t-interval of per-sequence
    slopes); `r_squared`, `std_error`, `is_monotonic`, `intercept` of the entropy fit and
    `r_squared_{m}`, `std_error_{m}`, `is_monotonic_{m}` for m in max_attn, k_eff;
    `analytic_gain` with `_ci_low/_ci_high`; `analytic_gain_applies` (the layer is bilinear in
    q); `fd_gain_entropy`; `mean_entropy_unscaled`; `n_sequences`, `method`, `reason`.
    """
    alphas = sweep.alphas
    m = sweep.metrics
    n_alpha, n_batch, n_layer, n_head = m.entropy.shape
    cols: dict[str, object] = {
        "layer": np.repeat(np.asarray(sweep.layers), n_head),
        "head": np.tile(np.arange(n_head), n_layer),
    }
    for metric, name in _GAINS.items():
        values = m.metric(metric).double()  # [alpha, batch, layer, head]
        mean_curve = values.mean(1).reshape(n_alpha, -1).T.numpy()  # [layer·head, alpha]
        fit = fit_log_slopes(alphas, mean_curve)
        per_seq = values.permute(2, 3, 1, 0).reshape(-1, n_alpha).numpy()  # [layer·head·batch, alpha]
        slopes = fit_log_slopes(alphas, per_seq)["slope"].to_numpy().reshape(-1, n_batch)
        _, low, high = t_interval(slopes, ci=ci, axis=1)
        cols[name] = fit["slope"].to_numpy()
        cols[f"{name}_ci_low"], cols[f"{name}_ci_high"] = low, high
        suffix = {"entropy": "", "max_attn": "_max_attn", "k_eff_exp": "_k_eff"}.get(metric)
        if suffix is not None:
            cols[f"r_squared{suffix}"] = fit["r_squared"].to_numpy()
            cols[f"std_error{suffix}"] = fit["std_error"].to_numpy()
            cols[f"is_monotonic{suffix}"] = fit["is_monotonic"].to_numpy()
            if metric == "entropy":
                cols["intercept"] = fit["intercept"].to_numpy()
    mean, low, high = t_interval(sweep.local_gain, ci=ci, axis=0)
    cols["analytic_gain"] = mean.reshape(-1)
    cols["analytic_gain_ci_low"], cols["analytic_gain_ci_high"] = low.reshape(-1), high.reshape(-1)
    cols["analytic_gain_applies"] = np.repeat([bool(layout.q_bilinear[l]) for l in sweep.layers], n_head)
    entropy_curve = m.entropy.double().mean(1).numpy()  # [alpha, layer, head]
    cols["fd_gain_entropy"] = _central_difference(alphas, entropy_curve).reshape(-1)
    cols["mean_entropy_unscaled"] = (entropy_curve[alphas.index(1.0)].reshape(-1) if 1.0 in alphas
                                     else np.full(n_layer * n_head, np.nan))
    cols["n_sequences"] = n_batch
    cols["method"] = np.repeat(np.asarray(sweep.method, dtype=object), n_head)
    cols["reason"] = np.repeat(np.asarray([r or "" for r in sweep.reason], dtype=object), n_head)
    return pd.DataFrame(cols)


def compute(cfg: GainConfig, model, tokens: C.RunTokens, *, progress: bool = False, rd=None) -> GainResult:
    """The EXP2 measurements on a loaded model and tokens (no files written)."""
    alphas = C.checked_alphas(cfg)
    if len(alphas) < 3:
        raise SpectraError(f"a slope fit needs at least 3 alphas, got {list(alphas)}")
    layout = attention_layout(model)
    with C.timed(rd, "choose_heads_s"):
        choice, _ = C.choose_heads(cfg, model, layout, tokens, control=True)
    with C.timed(rd, "sweep_s"):
        sweep = head_curves(model, tokens.measure, alphas, min_position=cfg.min_position,
                            batch_size=cfg.batch_size, max_rows=cfg.max_rows, progress=progress)
    with C.timed(rd, "fits_s"):
        summary = gain_table(sweep, layout, ci=cfg.ci)
        role = {choice.target: "target", choice.control: "control"}
        summary.insert(2, "head_type", [role.get((int(l), int(h)), "")
                                        for l, h in zip(summary["layer"], summary["head"])])
        curves = sweep.summary(ci=cfg.ci)
    return GainResult(summary=summary, curves=curves, sweep=sweep, choice=choice)


OUTPUTS = C.Outputs(
    "EXP2", "gain: entropy sensitivity to query scale, every head", "spectra-lens gain",
    (
        C.Table("gain_summary.csv", "heads with the largest entropy gain", ("gain_entropy",),
                ("layer", "head", "head_type", "gain_entropy", "gain_entropy_ci_low",
                 "gain_entropy_ci_high", "analytic_gain", "fd_gain_entropy", "gain_max_attn",
                 "gain_k_eff", "r_squared", "std_error", "is_monotonic", "mean_entropy_unscaled",
                 "method")),
        C.Table("gain_curves.csv", "per-α curves of every head", (), (), rows=0),
    ),
)


def tables(result: GainResult) -> dict[str, pd.DataFrame]:
    """The run's tables by file stem."""
    return {"gain_summary": result.summary, "gain_curves": result.curves}


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """Every EXP2 figure, from the tables alone (`tables(result)` or the run's CSVs)."""
    out: dict[str, go.Figure] = {}
    s = tables.get("gain_summary")
    if s is None:
        return out
    for column, title in (("gain_entropy", "fitted entropy gain dH/d ln α over the grid"),
                          ("analytic_gain", "analytic local gain −Var_p(s) at α = 1"),
                          ("gain_max_attn", "fitted max-attention gain"),
                          ("gain_k_eff", "fitted k_eff = exp(H) gain")):
        if column in s.columns:
            out[f"gain_heatmap_{column.removeprefix('gain_')}"] = figs.head_heatmap(s, column, title=title)
    roles = s["head_type"].fillna("").astype(str) if "head_type" in s.columns else pd.Series("", index=s.index)
    curves = tables.get("gain_curves")
    if curves is not None:
        for role in ("target", "control"):
            for _, row in s[roles == role].iterrows():
                l, h = int(row["layer"]), int(row["head"])
                curve = curves[(curves["layer"] == l) & (curves["head"] == h)]
                out[f"gain_fit_L{l}_H{h}_{role}"] = figs.gain_fit(
                    curve, "mean_entropy", slope=float(row["gain_entropy"]),
                    intercept=float(row["intercept"]), analytic_gain=float(row["analytic_gain"]),
                    title=f"L{l} H{h} ({role}): entropy vs ln α, R² = {row['r_squared']:.3f} ({row['method']})")
    chosen = s[roles != ""].sort_values("head_type", ascending=False)
    if len(chosen):
        out["gain_comparison"] = figs.gain_comparison(
            chosen, columns=("gain_entropy", "analytic_gain", "gain_max_attn"),
            title="target vs control: entropy gain (fitted, analytic) and max-attention gain")
    out["gain_vs_analytic"] = figs.gain_vs_analytic(s, title="fitted entropy gain vs analytic gain, every head")
    return out


def run(cfg: GainConfig = GainConfig(), *, model=None, tokens: torch.Tensor | None = None,
        progress: bool = True) -> GainResult:
    """EXP2 into `cfg.out`: gain_summary.csv, gain_curves.csv, figures, manifest.json."""
    with C.begin_run(cfg, EXPERIMENT, model=model, tokens=tokens, progress=progress) as setup:
        rd = setup.rd
        result = compute(cfg, setup.model, setup.tokens, progress=progress, rd=rd)
        with C.timed(rd, "write_s"):
            t = tables(result)
            files = C.write_outputs(rd, t, figures(t), images=cfg.images)
        rd.finish(
            **C.provenance(setup, result.choice, cfg.seed),
            alphas=list(result.sweep.alphas),
            files=files,
            methods={str(l): m for l, m in zip(result.sweep.layers, result.sweep.method)},
            definitions={**C.k_eff_definitions(),
                         "gain_*": "least-squares slope of the per-α mean over sequences against ln α",
                         "gain_*_ci": f"t-interval ({cfg.ci:g}) of per-sequence slopes",
                         "r_squared/std_error/is_monotonic": "of the entropy fit (suffixed columns: other metrics)",
                         "analytic_gain": "-Var_p(s) at alpha = 1, mean over sequences of per-sequence token means",
                         "fd_gain_entropy": "central difference of mean entropy around alpha = 1 on the grid"},
        )
    return dataclasses.replace(result, out=rd.path)




def command(cfg: GainConfig, *, progress: bool = True) -> int:
    """`spectra-lens gain`: run `cfg`, print a summary; SpectraError for bad input."""
    t0 = time.perf_counter()
    result = run(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    s = result.summary
    strongest = s.loc[s["gain_entropy"].idxmin()]
    print(f"{len(s)} heads, {len(result.sweep.alphas)} alphas, methods: "
          f"{dict(Counter(result.sweep.method))} layers")
    print(f"median entropy gain {s['gain_entropy'].median():+.3f} per ln α; strongest "
          f"L{int(strongest['layer'])} H{int(strongest['head'])} {strongest['gain_entropy']:+.3f} "
          f"(analytic at α=1 {strongest['analytic_gain']:+.3f})")
    print(f"identity checks (properties of softmax(α·s), not findings): entropy monotonic in "
          f"{int(s['is_monotonic'].sum())}/{len(s)} heads; corr(central difference, analytic) = "
          f"{s['fd_gain_entropy'].corr(s['analytic_gain']):.3f}")
    print(f"wrote {result.out} in {seconds:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.gain`: the same as `spectra-lens gain`."""
    from spectra_lens.cli import main as cli_main

    return cli_main(["gain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
