"""Plotly figures of per-head observational results (EXP0): heatmaps over (layer, head), r
distributions, layer summaries, query norm vs entropy. Functions take tables and return
`go.Figure`; none shows or writes (`figures.save_figure` writes)."""

import logging

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spectra_lens.errors import SpectraError
from spectra_lens.validate import HeadRef

__all__ = [
    "head_heatmap",
    "r_distribution",
    "layer_summary",
    "norm_entropy_scatter",
]

log = logging.getLogger(__name__)


def _grid(summary: pd.DataFrame, column: str) -> tuple[np.ndarray, list[int], list[int]]:
    for c in ("layer", "head", column):
        if c not in summary.columns:
            raise SpectraError(f"expected a per-head table with column {c!r}; got {list(summary.columns)}")
    table = summary.pivot(index="layer", columns="head", values=column).sort_index()
    return table.to_numpy(dtype=float), list(table.index), list(table.columns)


def head_heatmap(
    summary: pd.DataFrame, column: str, *, title: str | None = None, zmid: float | None = 0.0,
    colorscale: str = "RdBu_r", mark: str | None = None,
) -> go.Figure:
    """A layer × head map of `column`; heads where boolean column `mark` is True get a dot."""
    z, layers, heads = _grid(summary, column)
    fig = go.Figure(go.Heatmap(
        z=z, x=heads, y=layers, zmid=zmid, colorscale=colorscale, colorbar=dict(title=column),
        hovertemplate="layer %{y}, head %{x}<br>" + column + " = %{z:.3f}<extra></extra>",
    ))
    if mark is not None and mark in summary.columns:
        sel = summary[summary[mark].astype(bool)]
        fig.add_trace(go.Scatter(x=sel["head"], y=sel["layer"], mode="markers", name=mark,
                                 marker=dict(symbol="circle", size=5, color="black")))
    fig.update_layout(title=title or column, xaxis_title="head", yaxis_title="layer",
                      template="plotly_white", legend=dict(orientation="h", y=-0.15))
    return fig


def r_distribution(summary: pd.DataFrame, columns: dict[str, str], *, title: str) -> go.Figure:
    """Overlaid histograms of per-head correlations; `columns` maps column → legend label."""
    fig = go.Figure()
    for col, label in columns.items():
        if col not in summary.columns:
            raise SpectraError(f"expected column {col!r} in the head summary")
        fig.add_trace(go.Histogram(x=summary[col], name=label, opacity=0.6, nbinsx=40))
    fig.update_layout(barmode="overlay", title=title, xaxis_title="r", yaxis_title="heads",
                      template="plotly_white")
    return fig


def layer_summary(layer_stats: pd.DataFrame, *, title: str) -> go.Figure:
    """Per-layer mean |r| (with its spread) and the fraction of significant heads."""
    for c in ("layer", "mean_abs_r", "frac_significant"):
        if c not in layer_stats.columns:
            raise SpectraError(f"expected column {c!r} in the layer statistics")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean |r| per layer", "fraction significant"))
    err = layer_stats["std_r"] if "std_r" in layer_stats.columns else None
    fig.add_trace(go.Bar(x=layer_stats["layer"], y=layer_stats["mean_abs_r"], name="mean |r|",
                         error_y=dict(array=err) if err is not None else None), row=1, col=1)
    fig.add_trace(go.Bar(x=layer_stats["layer"], y=layer_stats["frac_significant"],
                         name="fraction significant"), row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", showlegend=False)
    return fig


def norm_entropy_scatter(
    records: pd.DataFrame, heads: list[tuple[int, int]], *, y: str = "entropy",
    max_points: int = 3000, seed: int = 0,
) -> go.Figure:
    """Query norm vs `y` for each head in `heads` (one panel each), coloured by position."""
    if not heads:
        raise SpectraError("expected at least one (layer, head) to plot, got none")
    cols = min(3, len(heads))
    rows = -(-len(heads) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[str(HeadRef(l, h)) for l, h in heads])
    rng = np.random.default_rng(seed)
    for i, (l, h) in enumerate(heads):
        sub = records[(records["layer"] == l) & (records["head"] == h)]
        if len(sub) > max_points:
            sub = sub.iloc[rng.choice(len(sub), max_points, replace=False)]
        fig.add_trace(go.Scattergl(
            x=sub["q_norm"], y=sub[y], mode="markers", showlegend=False,
            marker=dict(size=3, color=sub["position"], colorscale="Viridis", opacity=0.5,
                        showscale=i == 0, colorbar=dict(title="position")),
        ), row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(type="log", title_text="query norm")
    fig.update_yaxes(title_text=y)
    fig.update_layout(title=f"query norm vs {y}, strongest heads", template="plotly_white",
                      height=320 * rows)
    return fig


def agreement_scatter(agreement: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Observational slope dH/d ln‖q‖ (with its interval) against the causal gain, per head.

    One point per head, coloured by verdict; the line y = x is a pure temperature effect
    (ratio 1), y = 0 no observable norm effect. Points hover with layer, head and verdict.
    """
    for c in ("layer", "head", "obs_slope", "obs_slope_ci_low", "obs_slope_ci_high",
              "gain_analytic", "verdict"):
        if c not in agreement.columns:
            raise SpectraError(f"expected column {c!r} in the agreement table; got "
                               f"{list(agreement.columns)}")
    fig = go.Figure()
    for verdict, sub in agreement.groupby("verdict", sort=True):
        fig.add_trace(go.Scatter(
            x=sub["gain_analytic"], y=sub["obs_slope"], mode="markers", name=str(verdict),
            error_y=dict(type="data", symmetric=False,
                         array=sub["obs_slope_ci_high"] - sub["obs_slope"],
                         arrayminus=sub["obs_slope"] - sub["obs_slope_ci_low"],
                         thickness=0.8, width=0),
            customdata=np.stack([sub["layer"], sub["head"]], axis=1),
            hovertemplate=("L%{customdata[0]} H%{customdata[1]}<br>gain %{x:.3f}<br>"
                           "obs slope %{y:.3f}<extra>" + str(verdict) + "</extra>"),
        ))
    lo = float(np.nanmin([agreement["gain_analytic"].min(), 0.0]))
    fig.add_trace(go.Scatter(x=[lo, 0], y=[lo, 0], mode="lines", name="pure temperature (y = x)",
                             line=dict(color="black", dash="dash")))
    fig.add_hline(y=0, line=dict(color="grey", width=1))
    fig.update_layout(
        title=title or "observational slope vs causal gain per head",
        xaxis_title="causal gain −Var_p(s) (nats per unit ln α)",
        yaxis_title="observational dH/d ln‖q‖ | log position (nats)",
        template="plotly_white")
    return fig
