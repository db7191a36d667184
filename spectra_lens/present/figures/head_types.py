"""Figures of head types (`head_types`): the layer × head map of labels, the score heatmaps, and a
per-head value (a gain) grouped by label. Functions of tables; they return `go.Figure`."""

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spectra_lens.errors import SpectraError
from spectra_lens.head_types import LABELS, SCORE_COLUMNS, THRESHOLDS
from spectra_lens.validate import HeadRef

__all__ = ["LABEL_COLORS", "gain_by_type", "head_type_map", "head_type_scores"]

# One colour per label (head_types.LABELS order), readable on white.
LABEL_COLORS = {
    "induction": "#d62728", "previous-token": "#ff7f0e", "sink": "#1f77b4", "local": "#2ca02c",
    "diffuse": "#c7c7c7", "positional": "#9467bd", "mixed": "#8c8c8c",
}


# The label rule's columns are required; a score added later (duplicate_token_score) is drawn
# when the table has it, so tables of older runs still draw.
_RULE_COLUMNS = tuple(dict.fromkeys(c for _, c, _ in THRESHOLDS))


def _scores(types: pd.DataFrame) -> list[str]:
    return [c for c in SCORE_COLUMNS if c in types.columns]


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SpectraError(f"{what} needs columns {list(columns)}; missing {missing}")


def head_type_map(types: pd.DataFrame, *, title: str = "head types") -> go.Figure:
    """A layer × head grid, each cell coloured by the head's label, scores in the hover."""
    _require(types, ("layer", "head", "label", *_RULE_COLUMNS), "head_type_map")
    scores = _scores(types)
    labels = [l for l in LABELS if l in set(types["label"])]
    code = {l: i for i, l in enumerate(labels)}
    grid = types.pivot(index="layer", columns="head", values="label").sort_index()
    z = grid.apply(lambda col: col.map(code)).to_numpy(dtype=float)
    n = max(1, len(labels))
    scale = []
    for i, l in enumerate(labels):  # a stepped colour scale: one flat band per label
        scale += [[i / n, LABEL_COLORS.get(l, "#444")], [(i + 1) / n, LABEL_COLORS.get(l, "#444")]]
    by = types.set_index(["layer", "head"])
    hover = [[f"{HeadRef(l, h)} {by.loc[(l, h), 'label']}<br>" +
              "<br>".join(f"{c} = {by.loc[(l, h), c]:.3f}" for c in scores)
              for h in grid.columns] for l in grid.index]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(grid.columns), y=list(grid.index), zmin=-0.5, zmax=n - 0.5, colorscale=scale,
        text=hover, hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1,
        colorbar=dict(tickvals=list(range(n)), ticktext=labels, title="label"),
    ))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="head", yaxis_title="layer",
                      height=max(420, 22 * len(grid.index) + 160))
    return fig


def head_type_scores(types: pd.DataFrame, *, title: str = "head-type scores") -> go.Figure:
    """One layer × head heatmap per score (0 … 1)."""
    _require(types, ("layer", "head", *_RULE_COLUMNS), "head_type_scores")
    scores = _scores(types)
    fig = make_subplots(rows=1, cols=len(scores), shared_yaxes=True,
                        subplot_titles=[c.replace("_score", "") for c in scores],
                        horizontal_spacing=0.02)
    for i, c in enumerate(scores, start=1):
        g = types.pivot(index="layer", columns="head", values=c).sort_index()
        fig.add_trace(go.Heatmap(z=g.to_numpy(float), x=list(g.columns), y=list(g.index), zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=i == len(scores),
                                 hovertemplate=f"L%{{y}}H%{{x}} {c} = %{{z:.3f}}<extra></extra>"),
                      row=1, col=i)
    fig.update_layout(title=title, template="plotly_white", yaxis_title="layer",
                      height=max(420, 18 * types["layer"].nunique() + 180))
    return fig


def gain_by_type(frame: pd.DataFrame, column: str, *, title: str | None = None) -> go.Figure:
    """`column` (e.g. a gain) of every head, grouped by label: box with every head as a point."""
    _require(frame, ("layer", "head", "label", column), "gain_by_type")
    order = (frame.groupby("label")[column].mean().sort_values().index.tolist())
    fig = go.Figure()
    for l in order:
        d = frame[frame["label"] == l]
        fig.add_trace(go.Box(y=d[column], name=f"{l} ({len(d)})", boxpoints="all", jitter=0.4,
                             pointpos=0, marker=dict(color=LABEL_COLORS.get(l, "#444"), size=5),
                             text=[str(HeadRef(a, b)) for a, b in zip(d["layer"], d["head"])],
                             hovertemplate="%{text}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title or f"{column} by head type (sorted by mean)", template="plotly_white",
                      yaxis_title=column, showlegend=False, height=460)
    return fig

