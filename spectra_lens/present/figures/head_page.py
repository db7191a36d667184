"""Figures of one head's page (`head_page`): its pattern on a sequence, ‖q‖ and entropy along
the text, its α-curve, slope-vs-gain estimates with intervals, its type scores and the log-prob
difference of a scaled generation. Functions of data; they return `go.Figure`."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spectra_lens.errors import SpectraError
from spectra_lens.head_types import SCORE_COLUMNS, THRESHOLDS

__all__ = ["alpha_curve", "estimates", "generation_delta", "pattern", "qnorm_entropy", "type_scores"]


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SpectraError(f"{what} needs columns {list(columns)}; missing {missing}")



def _ticks(labels: list[str]) -> dict:
    # Numeric axes with token tick labels: a categorical axis would merge repeated tokens.
    return dict(tickmode="array", tickvals=list(range(len(labels))),
                ticktext=list(labels), tickfont=dict(size=9))


def pattern(p: np.ndarray, labels: list[str], *, title: str) -> go.Figure:
    """One head's pattern `[query, key]` as a heatmap with token tick labels (masked cells blank)."""
    n = len(labels)
    z = np.where(np.tril(np.ones((n, n), bool)), p, np.nan)
    hover = [[f"query {i} {labels[i]!r} → key {j} {labels[j]!r}" for j in range(n)] for i in range(n)]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n)), y=list(range(n)), colorscale="Blues", zmin=0, zmax=1,
                               text=hover, hovertemplate="%{text}<br>p = %{z:.3f}<extra></extra>",
                               colorbar=dict(title="p")))
    size = max(420, min(900, 18 * n + 160))
    fig.update_layout(title=title, template="plotly_white", height=size,
                      xaxis=dict(title="key", **_ticks(labels)),
                      yaxis=dict(title="query", autorange="reversed", **_ticks(labels)))
    return fig


def qnorm_entropy(q_norm, entropy, labels: list[str], *, title: str) -> go.Figure:
    """‖q‖ (left axis) and attention entropy (right axis) of one head at each token."""
    x = list(range(len(labels)))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=q_norm, mode="lines+markers", name="‖q‖", text=labels,
                             hovertemplate="%{text}: ‖q‖ = %{y:.3f}<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=entropy, mode="lines+markers", name="entropy (nats)", text=labels,
                             hovertemplate="%{text}: H = %{y:.3f}<extra></extra>"), secondary_y=True)
    fig.update_layout(title=title, template="plotly_white", height=420,
                      xaxis=dict(title="token", **_ticks(labels)), legend=dict(orientation="h", y=-0.35))
    fig.update_yaxes(title_text="‖q‖ (effective query)", secondary_y=False)
    fig.update_yaxes(title_text="entropy (nats)", secondary_y=True)
    return fig


def alpha_curve(curve: pd.DataFrame, *, marks=(), title: str) -> go.Figure:
    """Mean entropy vs α (log axis) with its interval band; dotted lines at `marks`."""
    _require(curve, ("scale", "mean_entropy", "mean_entropy_ci_low", "mean_entropy_ci_high"), "alpha_curve")
    x = curve["scale"].tolist()
    fig = go.Figure([
        go.Scatter(x=x + x[::-1], y=curve["mean_entropy_ci_high"].tolist() + curve["mean_entropy_ci_low"].tolist()[::-1],
                   fill="toself", line=dict(width=0), fillcolor="rgba(31,119,180,0.2)", name="interval",
                   hoverinfo="skip"),
        go.Scatter(x=x, y=curve["mean_entropy"], mode="lines+markers", name="mean entropy",
                   hovertemplate="α = %{x:.3g}: H = %{y:.3f}<extra></extra>"),
    ])
    for a in marks:
        fig.add_vline(x=a, line=dict(dash="dot", color="gray"))
    fig.update_layout(title=title, template="plotly_white", height=420, xaxis=dict(title="α (query scale)", type="log"),
                      yaxis_title="mean entropy (nats)", legend=dict(orientation="h", y=-0.25))
    return fig


def estimates(est: pd.DataFrame, *, title: str) -> go.Figure:
    """Point estimates with intervals, one row each (`estimate`, `value`, `ci_low`, `ci_high`, `source`)."""
    _require(est, ("estimate", "value", "ci_low", "ci_high", "source"), "estimates")
    fig = go.Figure(go.Scatter(
        x=est["value"], y=est["estimate"], mode="markers", marker=dict(size=11),
        error_x=dict(type="data", symmetric=False, array=(est["ci_high"] - est["value"]).tolist(),
                     arrayminus=(est["value"] - est["ci_low"]).tolist()),
        text=est["source"], hovertemplate="%{y}: %{x:.4f} (%{text})<extra></extra>", name="estimate"))
    fig.add_vline(x=0, line=dict(color="gray"))
    fig.update_layout(title=title, template="plotly_white", height=360, xaxis_title="nats per unit log",
                      margin=dict(l=260))
    return fig


def type_scores(scores: dict, *, title: str) -> go.Figure:
    """One head's head-type scores as bars, with each label's threshold marked."""
    cols = [c for c in SCORE_COLUMNS if c in scores]
    thr = {c: t for _, c, t in THRESHOLDS}
    fig = go.Figure([
        go.Bar(x=cols, y=[float(scores[c]) for c in cols], name="score",
               hovertemplate="%{x}: %{y:.3f}<extra></extra>"),
        go.Scatter(x=[c for c in cols if c in thr], y=[thr[c] for c in cols if c in thr], mode="markers",
                   marker=dict(symbol="line-ew-open", size=30, color="crimson"), name="label threshold"),
    ])
    fig.update_layout(title=title, template="plotly_white", height=380, yaxis=dict(range=[0, 1.05], title="score"),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def generation_delta(gens: dict, *, title: str) -> go.Figure:
    """Per generated token of each scaled continuation ({α: GenerationDiff}): log p_scaled − log p_plain."""
    fig = go.Figure()
    for a, g in gens.items():
        c = g.scaled
        fig.add_trace(go.Bar(x=list(range(len(c.tokens))), y=c.delta_logprob, name=f"α = {a:g}",
                             text=list(c.pieces), hovertemplate="%{text}: Δ log p = %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=380, barmode="group",
                      xaxis_title="generated token", yaxis_title="log p_scaled − log p_plain (nats)",
                      legend=dict(orientation="h", y=-0.25))
    return fig
