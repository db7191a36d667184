"""Plotly figures of the causal experiments (EXP1 intervention, EXP2 gain, EXP3 Q vs K).

Every function takes the experiment's tables (pandas DataFrames with the CSV columns) and
returns a `go.Figure`; none shows or writes (`figures.save_figure` writes). The α axis is
logarithmic throughout, so a constant gain dH/d ln α is a straight line.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from spectra_lens.errors import SpectraError
from spectra_lens.validate import HeadRef

__all__ = [
    "effects_panels",
    "gain_comparison",
    "gain_fit",
    "gain_vs_analytic",
    "intervention_panels",
    "later_heads_heatmap",
    "metric_vs_scale",
    "output_effects",
    "qk_metric",
    "qk_output_effects",
]

_LABELS = {
    "mean_entropy": "entropy (nats)",
    "mean_max_attn": "max attention",
    "mean_k_eff": "k_eff = exp(H)",
    "delta_entropy": "Δ entropy (nats)",
    "delta_loss": "Δ next-token loss (nats)",
    "kl_from_unscaled": "KL(p_1 ‖ p_α), unscaled ‖ scaled (nats)",
    "kl_unscaled_scaled": "KL(p_1 ‖ p_x), unintervened ‖ intervened (nats)",
    "later_mean_abs_delta_entropy": "later heads: mean |Δ entropy| (nats)",
}
_PANELS = ("mean_entropy", "mean_max_attn", "mean_k_eff")


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise SpectraError(f"{what} must be a DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SpectraError(f"{what} lacks columns {missing}; got {list(frame.columns)}")


def _color(i: int) -> str:
    return qualitative.Plotly[i % len(qualitative.Plotly)]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# Powers of two label a log α axis; plotly's default labels 0.3 ... 0.9 as "3" ... "9".
_ALPHA_TICKS = [2.0**k for k in range(-6, 7)]
_LOG_ALPHA = dict(type="log", tickvals=_ALPHA_TICKS, ticktext=[f"{v:g}" for v in _ALPHA_TICKS])


def _line_with_band(fig, frame: pd.DataFrame, column: str, *, name: str, color: str, row=None,
                    col=None, showlegend=True, dash=None, legendgroup=None) -> None:
    frame = frame.sort_values("scale")
    kw = dict(row=row, col=col) if row is not None else {}
    low, high = f"{column}_ci_low", f"{column}_ci_high"
    group = legendgroup or name
    if low in frame.columns and high in frame.columns and frame[low].notna().any():
        fig.add_trace(go.Scatter(
            x=np.concatenate([frame["scale"], frame["scale"][::-1]]),
            y=np.concatenate([frame[high], frame[low][::-1]]),
            mode="lines", fill="toself", fillcolor=_rgba(color, 0.15), line=dict(width=0),
            hoverinfo="skip",
            showlegend=False, legendgroup=group, name=f"{name} interval"), **kw)
    fig.add_trace(go.Scatter(x=frame["scale"], y=frame[column], mode="lines+markers", name=name,
                             line=dict(color=color, dash=dash), legendgroup=group,
                             showlegend=showlegend), **kw)


def metric_vs_scale(
    frames: Mapping[str, pd.DataFrame], column: str, *, title: str | None = None,
    prediction: str | None = None,
) -> go.Figure:
    """`column` against the scale α (log axis) for each labelled table, with its interval band
    (`{column}_ci_low/high`) and, if given, a dashed `prediction` column (e.g. softmax(α·s))."""
    fig = go.Figure()
    for i, (label, frame) in enumerate(frames.items()):
        _require(frame, ["scale", column], f"table {label!r}")
        _line_with_band(fig, frame, column, name=label, color=_color(i))
        if prediction and prediction in frame.columns and frame[prediction].notna().any():
            f = frame.sort_values("scale")
            fig.add_trace(go.Scatter(x=f["scale"], y=f[prediction], mode="lines",
                                     name=f"{label}: softmax(α·s)", line=dict(color=_color(i), dash="dot")))
    fig.add_vline(x=1.0, line=dict(color="grey", width=1, dash="dot"))
    fig.update_xaxes(**_LOG_ALPHA, title_text="query scale α")
    fig.update_layout(title=title or f"{column} vs query scale", yaxis_title=_LABELS.get(column, column),
                      template="plotly_white")
    return fig


def intervention_panels(frames: Mapping[str, pd.DataFrame], *, title: str) -> go.Figure:
    """Three panels: mean entropy, max attention and k_eff = exp(H) against α, with intervals."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=[_LABELS[c] for c in _PANELS])
    for i, (label, frame) in enumerate(frames.items()):
        _require(frame, ["scale", *_PANELS], f"table {label!r}")
        for j, column in enumerate(_PANELS):
            _line_with_band(fig, frame, column, name=label, color=_color(i), row=1, col=j + 1,
                            showlegend=j == 0)
    fig.update_xaxes(**_LOG_ALPHA, title_text="query scale α")
    fig.update_layout(title=title, template="plotly_white", height=420)
    return fig


def output_effects(frames: Mapping[str, pd.DataFrame], *, title: str) -> go.Figure:
    """Two panels: Δ next-token loss and KL(p_1 ‖ p_α) against α, one line per labelled table."""
    cols = ("delta_loss", "kl_from_unscaled")
    fig = make_subplots(rows=1, cols=2, subplot_titles=[_LABELS[c] for c in cols])
    for i, (label, frame) in enumerate(frames.items()):
        _require(frame, ["scale", *cols], f"table {label!r}")
        for j, column in enumerate(cols):
            _line_with_band(fig, frame, column, name=label, color=_color(i), row=1, col=j + 1,
                            showlegend=j == 0)
    fig.update_xaxes(**_LOG_ALPHA, title_text="scale α")
    fig.update_layout(title=title, template="plotly_white", height=420)
    return fig


def later_heads_heatmap(downstream: pd.DataFrame, scales: Sequence[float], *, title: str) -> go.Figure:
    """Layer × head maps of the mean entropy change of every measured head, one per scale."""
    _require(downstream, ["scale", "layer", "head", "delta_entropy"], "downstream table")
    scales = list(scales)
    if not scales:
        raise SpectraError("expected at least one scale to show, got none")
    fig = make_subplots(rows=1, cols=len(scales), subplot_titles=[f"α = {a:.3g}" for a in scales],
                        shared_yaxes=True)
    zmax = float(np.nanmax(np.abs(downstream["delta_entropy"]))) if len(downstream) else 1.0
    for j, a in enumerate(scales):
        sub = downstream[np.isclose(downstream["scale"], a)]
        table = sub.pivot(index="layer", columns="head", values="delta_entropy").sort_index()
        fig.add_trace(go.Heatmap(
            z=table.to_numpy(float), x=list(table.columns), y=list(table.index), zmid=0,
            zmin=-zmax, zmax=zmax, colorscale="RdBu_r", showscale=j == 0,
            colorbar=dict(title="Δ entropy"),
            hovertemplate="layer %{y}, head %{x}<br>Δ entropy = %{z:.4f}<extra></extra>"), row=1, col=j + 1)
        fig.update_xaxes(title_text="head", row=1, col=j + 1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def gain_fit(
    curve: pd.DataFrame, column: str, *, slope: float, intercept: float, title: str,
    analytic_gain: float | None = None,
) -> go.Figure:
    """One head's `column` against ln α: the measured means (with interval), the least-squares
    line `intercept + slope · ln α`, and the tangent at α = 1 with the analytic gain."""
    _require(curve, ["scale", column], "curve")
    fig = go.Figure()
    _line_with_band(fig, curve, column, name="measured", color=_color(0))
    x = np.asarray(sorted(curve["scale"]), dtype=float)
    fig.add_trace(go.Scatter(x=x, y=intercept + slope * np.log(x), mode="lines",
                             name=f"fit: slope {slope:+.3f} per ln α", line=dict(color=_color(1), dash="dash")))
    if analytic_gain is not None and np.isfinite(analytic_gain):
        at_one = curve.loc[np.isclose(curve["scale"], 1.0), column]
        if len(at_one):
            near = x[(x >= 0.5) & (x <= 2.0)]
            fig.add_trace(go.Scatter(
                x=near, y=float(at_one.iloc[0]) + analytic_gain * np.log(near), mode="lines",
                name=f"tangent at α=1: −Var_p(s) = {analytic_gain:+.3f}",
                line=dict(color=_color(2), dash="dot", width=3)))
    fig.update_xaxes(**_LOG_ALPHA, title_text="query scale α")
    fig.update_layout(title=title, yaxis_title=_LABELS.get(column, column), template="plotly_white")
    return fig


def gain_comparison(summary: pd.DataFrame, *, columns: Sequence[str], title: str) -> go.Figure:
    """Bars of each gain column for the heads in `summary` (one group per column), with the
    interval (`{column}_ci_low/high`) as error bars where present."""
    _require(summary, ["layer", "head", *columns], "gain summary")
    fig = go.Figure()
    for i, (_, row) in enumerate(summary.iterrows()):
        label = str(HeadRef(int(row['layer']), int(row['head'])))
        if "head_type" in summary.columns and isinstance(row["head_type"], str) and row["head_type"]:
            label = f"{row['head_type']} ({label})"
        y = [float(row[c]) for c in columns]
        lo = [float(row.get(f"{c}_ci_low", np.nan)) for c in columns]
        hi = [float(row.get(f"{c}_ci_high", np.nan)) for c in columns]
        err = dict(type="data", symmetric=False, array=[h - v for h, v in zip(hi, y)],
                   arrayminus=[v - l for v, l in zip(y, lo)]) if np.isfinite(lo).any() else None
        fig.add_trace(go.Bar(x=list(columns), y=y, name=label, marker_color=_color(i), error_y=err))
    fig.update_layout(barmode="group", title=title, yaxis_title="per ln α", template="plotly_white")
    return fig


def gain_vs_analytic(summary: pd.DataFrame, *, title: str) -> go.Figure:
    """Every head: the fitted entropy slope over the α grid against the analytic local gain
    −Var_p(s) at α = 1 (the identity line is where the response is linear in ln α)."""
    _require(summary, ["layer", "head", "gain_entropy", "analytic_gain"], "gain summary")
    fig = go.Figure()
    groups = summary.groupby("method") if "method" in summary.columns else [("", summary)]
    for i, (method, sub) in enumerate(groups):
        fig.add_trace(go.Scatter(
            x=sub["analytic_gain"], y=sub["gain_entropy"], mode="markers", name=str(method) or "heads",
            marker=dict(color=sub["layer"], colorscale="Viridis", size=7, showscale=i == 0,
                        colorbar=dict(title="layer"), symbol=["circle", "x"][i % 2]),
            text=[str(HeadRef(l, h)) for l, h in zip(sub["layer"], sub["head"])],
            hovertemplate="%{text}<br>analytic %{x:.3f}<br>fitted %{y:.3f}<extra></extra>"))
    lo = float(np.nanmin([summary["analytic_gain"].min(), summary["gain_entropy"].min(), 0.0]))
    fig.add_trace(go.Scatter(x=[lo, 0], y=[lo, 0], mode="lines", name="identity",
                             line=dict(color="grey", dash="dot")))
    fig.update_layout(title=title, xaxis_title="analytic gain −Var_p(s) at α = 1",
                      yaxis_title="fitted slope dH / d ln α over the grid", template="plotly_white")
    return fig


def qk_metric(frame: pd.DataFrame, column: str, *, title: str) -> go.Figure:
    """`column` against α for every head of the kv group: query scaling solid, key scaling dashed."""
    _require(frame, ["scale", "layer", "head", "scaled", column], "Q/K table")
    fig = go.Figure()
    for i, ((layer, head), sub) in enumerate(frame.groupby(["layer", "head"])):
        is_target = bool(sub["is_target"].iloc[0]) if "is_target" in sub.columns else False
        name = str(HeadRef(layer, head)) + (" (target)" if is_target else "")
        for scaled, dash in (("query", None), ("key", "dash")):
            part = sub[sub["scaled"] == scaled]
            if len(part):
                _line_with_band(fig, part, column, name=f"{name}, {scaled} scaled", color=_color(i),
                                dash=dash, legendgroup=f"{name} {scaled}")
    fig.add_vline(x=1.0, line=dict(color="grey", width=1, dash="dot"))
    fig.update_xaxes(**_LOG_ALPHA, title_text="scale α")
    fig.update_layout(title=title, yaxis_title=_LABELS.get(column, column), template="plotly_white")
    return fig


def qk_output_effects(frame: pd.DataFrame, *, title: str) -> go.Figure:
    """Δ loss and KL(p_α ‖ p_1) against α under query scaling and under key scaling."""
    _require(frame, ["scale", "scaled", "delta_loss", "kl_from_unscaled"], "Q/K table")
    per = {s: g.drop_duplicates("scale") for s, g in frame.groupby("scaled")}
    return output_effects({f"{s} scaled": g for s, g in sorted(per.items(), reverse=True)}, title=title)


_EFFECTS = ("delta_loss", "kl_unscaled_scaled", "later_mean_abs_delta_entropy")


def effects_panels(effects: pd.DataFrame, *, title: str) -> go.Figure:
    """The outcomes that can come out either way, with their document-bootstrap bands.

    Row 1: Δ loss, KL(p_1 ‖ p_x) and the later heads' mean |Δ entropy| against the query scale
    α for every `*_scale` condition (target, control); row 2: the same against the rotation
    angle (degrees) for the `rotation` condition, with the sham (the hook at α = 1) at angle 0.
    """
    _require(effects, ["condition", "value", *_EFFECTS], "effects table")
    fig = make_subplots(rows=2, cols=3, vertical_spacing=0.18,
                        subplot_titles=[_LABELS[c] for c in _EFFECTS] + [""] * 3)
    scaled = [c for c in effects["condition"].unique() if str(c).endswith("_scale")]
    for i, cond in enumerate(scaled):
        f = effects[effects["condition"] == cond].rename(columns={"value": "scale"})
        label = f"{cond} {HeadRef(int(f['layer'].iloc[0]), int(f['head'].iloc[0]))}"
        for j, column in enumerate(_EFFECTS):
            shown = f[f[column].notna()]  # NaN: no later layer to measure
            if not shown.empty:
                _line_with_band(fig, shown, column, name=label, color=_color(i), row=1, col=j + 1,
                                showlegend=j == 0)
    rot = effects[effects["condition"].isin(["sham", "rotation"])].copy()
    if not rot.empty:
        rot["scale"] = np.where(rot["condition"] == "sham", 0.0, np.degrees(rot["value"]))
        for j, column in enumerate(_EFFECTS):
            shown = rot[rot[column].notna()]
            if not shown.empty:
                _line_with_band(fig, shown, column, name="rotation (sham at 0°)",
                                color=_color(len(scaled)), row=2, col=j + 1, showlegend=j == 0)
    for j in range(3):
        fig.update_xaxes(**_LOG_ALPHA, title_text="query scale α", row=1, col=j + 1)
        fig.update_xaxes(title_text="rotation angle of q (degrees)", row=2, col=j + 1)
    fig.update_layout(title=title, template="plotly_white", height=720)
    return fig
