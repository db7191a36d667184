"""A head's attention pattern with token labels, beside its per-token query norm and entropy.

`attention_pattern(...)` is a function of arrays (a pattern, token strings, two per-query
series) and returns a figure; `head_attention(model, text_or_tokens, layer, head)` captures
those arrays with one forward pass of the model first (TransformerLens' string inputs work).
"""

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from spectra_lens.errors import SpectraError
from spectra_lens.validate import HeadRef

__all__ = ["attention_pattern", "head_attention", "token_labels"]


def token_labels(tokens: Sequence[str]) -> list[str]:
    """Axis labels `"i: 'token'"`: unique when a token repeats, whitespace visible, long ones cut."""
    return [f"{i}: {t!r}" if len(t) <= 24 else f"{i}: {t[:21]!r}..." for i, t in enumerate(tokens)]


def attention_pattern(
    pattern,
    tokens: Sequence[str],
    q_norm,
    entropy,
    *,
    layer: int,
    head: int,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of `pattern` [query, key] (rows: query tokens, columns: key tokens) with bars of
    the query norm ‖q‖ and the entropy H (nats) of each query row on the right.

    The entropy bound log(t + 1) of a causal query at position t is drawn beside H."""
    p = np.asarray(pattern, dtype=float)
    qn = np.asarray(q_norm, dtype=float).reshape(-1)
    h = np.asarray(entropy, dtype=float).reshape(-1)
    n = len(tokens)
    if p.ndim != 2 or p.shape != (n, n):
        raise SpectraError(f"pattern must be [query, key] = [{n}, {n}] for {n} tokens, got {p.shape}")
    if qn.shape != (n,) or h.shape != (n,):
        raise SpectraError(f"q_norm and entropy must have one value per token ({n}), got "
                           f"{qn.shape} and {h.shape}")
    labels = token_labels(tokens)
    pos = np.arange(n)
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, column_widths=[0.64, 0.18, 0.18],
                        horizontal_spacing=0.02,
                        subplot_titles=(f"pattern {HeadRef(layer, head)}", "query norm ‖q‖", "entropy H (nats)"))
    hover = [[f"query {labels[i]}<br>key {labels[j]}<br>p = {p[i, j]:.4f}" for j in range(n)]
             for i in range(n)]
    fig.add_trace(go.Heatmap(z=p, x=pos, y=pos, colorscale="Blues", zmin=0, zmax=1,
                             text=hover, hoverinfo="text", colorbar=dict(title="p", x=-0.12)),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=qn, y=pos, orientation="h", name="‖q‖", marker_color="#636efa",
                         customdata=labels, hovertemplate="%{customdata}<br>‖q‖ = %{x:.3f}<extra></extra>"),
                  row=1, col=2)
    fig.add_trace(go.Bar(x=h, y=pos, orientation="h", name="H", marker_color="#ef553b",
                         customdata=labels, hovertemplate="%{customdata}<br>H = %{x:.3f}<extra></extra>"),
                  row=1, col=3)
    fig.add_trace(go.Scatter(x=np.log(pos + 1.0), y=pos, mode="lines", name="bound log(t+1)",
                             line=dict(color="gray", dash="dot")), row=1, col=3)
    tick = dict(tickmode="array", tickvals=pos, ticktext=labels)
    fig.update_yaxes(autorange="reversed", **tick, row=1, col=1)
    fig.update_xaxes(tickangle=-60, **tick, row=1, col=1)
    fig.update_layout(title=title or f"Attention of layer {layer} head {head}", showlegend=False,
                      height=max(360, 22 * n + 160), width=max(700, 22 * n + 520),
                      yaxis_title="query token", xaxis_title="key token",
                      template="plotly_white")
    return fig


def head_attention(model, text_or_tokens, layer: int, head: int, *, sequence: int = 0,
                   title: str | None = None) -> go.Figure:
    """`attention_pattern` of (layer, head) on one sequence: a string, a list of strings or
    tokens [batch, pos] (`sequence` picks the row), captured with one forward pass."""
    from spectra_lens.capture import capture_metrics, tokens_and_mask

    tokens, mask = tokens_and_mask(model, text_or_tokens)
    if not 0 <= sequence < tokens.shape[0]:
        raise SpectraError(f"sequence must be in [0, {tokens.shape[0]}), got {sequence}")
    row = tokens[sequence : sequence + 1]
    if mask is not None:  # a padded text of a list: show its own tokens only
        row = row[:, mask[sequence].cpu()]
    m = capture_metrics(model, row, layers=[layer], patterns_for=[(layer, head)])
    pattern = m.patterns[(layer, head)][0]
    if getattr(model, "tokenizer", None) is not None:
        strings = [str(t) for t in model.to_str_tokens(row[0])]
    else:  # no tokenizer: label the ids
        strings = [str(int(t)) for t in row[0]]
    return attention_pattern(pattern.cpu(), strings, m.q_norm[0, 0, head].cpu(),
                             m.entropy[0, 0, head].cpu(), layer=layer, head=head, title=title)
