"""Plotly figures: functions of tables that return `go.Figure` (never show, never write), and
`save_figure` / `write_figures`, which write them (HTML, and PNG/SVG drawn by a system Chromium:
`export`). `heads`: per-head observational figures (EXP0); `causal`: the
α-sweep, intervention, gain and Q-vs-K figures (EXP1-EXP3); `attention`: one head's
token-labelled attention pattern beside its per-token query norm and entropy. Each experiment composes these in its
own `figures(tables)`, which the report calls too, so every figure is defined once."""

from spectra_lens.present.figures.attention import attention_pattern, head_attention, token_labels
from spectra_lens.present.figures.causal import (
    effects_panels,
    gain_comparison,
    gain_fit,
    gain_vs_analytic,
    intervention_panels,
    later_heads_heatmap,
    metric_vs_scale,
    output_effects,
    qk_metric,
    qk_output_effects,
)
from spectra_lens.present.figures.export import (
    deferred_images,
    export_images,
    find_browser,
    image_formats,
    print_pdf,
    save_figure,
    write_figures,
)
from spectra_lens.present.figures.heads import (
    agreement_scatter,
    head_heatmap,
    layer_summary,
    norm_entropy_scatter,
    r_distribution,
)

__all__ = [
    "agreement_scatter",
    "attention_pattern",
    "effects_panels",
    "gain_comparison",
    "gain_fit",
    "gain_vs_analytic",
    "head_attention",
    "head_heatmap",
    "intervention_panels",
    "later_heads_heatmap",
    "layer_summary",
    "metric_vs_scale",
    "norm_entropy_scatter",
    "output_effects",
    "qk_metric",
    "qk_output_effects",
    "r_distribution",
    "save_figure",
    "token_labels",
    "deferred_images",
    "export_images",
    "find_browser",
    "image_formats",
    "print_pdf",
    "write_figures",
]
