"""Plotly figures of the per-head causal tables (`norm_ablation.csv`, `causal_map.csv`): a
layer × head map of a downstream effect, one effect against another per head, and the analytic
gain against the downstream effect. Functions of tables that return `go.Figure`; none shows or
writes (`figures.save_figure` writes)."""

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from spectra_lens.errors import SpectraError

__all__ = ["effect_heatmap", "effect_scatter", "gain_vs_effect"]


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise SpectraError(f"{what} must be a DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SpectraError(f"{what} lacks columns {missing}; got {list(frame.columns)}")


def _log10(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, np.log10(np.where(x > 0, x, 1.0)), np.nan)


def effect_heatmap(table: pd.DataFrame, column: str, *, title: str, log: bool = True) -> go.Figure:
    """A layer × head map of `column` (log10 where `log`; a value ≤ 0 is left blank)."""
    _require(table, ("layer", "head", column), "the effect table")
    grid = table.pivot(index="layer", columns="head", values=column).sort_index()
    z = grid.to_numpy(dtype=float)
    label = f"log10 {column}" if log else column
    fig = go.Figure(go.Heatmap(
        z=_log10(z) if log else z, x=list(grid.columns), y=list(grid.index), colorscale="Viridis",
        colorbar=dict(title=label), customdata=z,
        hovertemplate="layer %{y}, head %{x}<br>" + column + " = %{customdata:.3g}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", template="plotly_white")
    return fig


def _errors(frame: pd.DataFrame, column: str) -> dict | None:
    low, high = f"{column}_ci_low", f"{column}_ci_high"
    if low not in frame.columns or high not in frame.columns:
        return None
    return dict(type="data", symmetric=False, array=frame[high] - frame[column],
                arrayminus=frame[column] - frame[low], thickness=0.6, width=0)


def effect_scatter(table: pd.DataFrame, x: str, ys: Mapping[str, str], *, title: str,
                   x_label: str, y_label: str) -> go.Figure:
    """One point per head and column of `ys` ({column: legend label}) against `x`, log-log,
    with each column's interval; the line y = x."""
    _require(table, ("layer", "head", x, *ys), "the effect table")
    fig = go.Figure()
    for i, (col, name) in enumerate(ys.items()):
        fig.add_trace(go.Scatter(
            x=table[x], y=table[col], mode="markers", name=name, error_y=_errors(table, col),
            marker=dict(color=qualitative.Plotly[i % 10], size=6),
            customdata=np.stack([table["layer"], table["head"]], axis=1),
            hovertemplate="L%{customdata[0]}H%{customdata[1]}<br>x %{x:.3g}<br>y %{y:.3g}<extra>" + name + "</extra>"))
    values = pd.concat([table[x], *(table[c] for c in ys)]).to_numpy(dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                                 line=dict(color="black", dash="dash")))
    fig.update_xaxes(type="log", title_text=x_label)
    fig.update_yaxes(type="log", title_text=y_label)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def gain_vs_effect(table: pd.DataFrame, effect: str, *, title: str, by: str = "alpha") -> go.Figure:
    """The analytic gain −Var_p(s) of each head (x) against its downstream `effect` (y, log),
    one colour per value of `by` (the α of the map)."""
    _require(table, ("layer", "head", "gain_analytic", effect, by), "the causal map")
    fig = go.Figure()
    for i, (value, sub) in enumerate(table.groupby(by, sort=True)):
        fig.add_trace(go.Scatter(
            x=sub["gain_analytic"], y=sub[effect], mode="markers", name=f"{by} = {value:g}",
            error_y=_errors(sub, effect), marker=dict(color=qualitative.Plotly[i % 10], size=6),
            customdata=np.stack([sub["layer"], sub["head"]], axis=1),
            hovertemplate="L%{customdata[0]}H%{customdata[1]}<br>gain %{x:.3f}<br>" + effect
                          + " %{y:.3g}<extra></extra>"))
    fig.update_xaxes(title_text="analytic gain −Var_p(s) = dH/d ln α at α = 1 (nats)")
    fig.update_yaxes(type="log", title_text=effect)
    fig.update_layout(title=title, template="plotly_white")
    return fig
