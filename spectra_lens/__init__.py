"""spectra_lens: how the query norm sets attention sharpness, measured and causally tested.

The public surface: load a model (`load_model`), read its attention layout
(`attention_layout`), capture per-token metrics (`capture_metrics`, `MetricCapture`), and edit
the forward pass (`QueryScale`, `KeyScale`, `LogitScale`) inside `attached(...)`, and sweep query scale α for
every head (`sweep_heads`: the fast path softmax(α·s) where the logits are bilinear, the exact
forward pass elsewhere; `exact_sweep` for downstream effects). Statistics are in
`spectra_lens.stats`, figures in `spectra_lens.plots` and `spectra_lens.causal_plots`.
"""

from spectra_lens.errors import SpectraError
from spectra_lens.hooks import (
    METRIC_NAMES,
    KeyScale,
    LogitScale,
    MetricCapture,
    QueryScale,
    TokenMetrics,
    attached,
    capture_metrics,
    repeat_for_alphas,
)
from spectra_lens.models import (
    AttentionLayout,
    attention_layout,
    bridge_from_hf,
    load_model,
    load_tokenizer,
)
from spectra_lens.sweep import (
    ExactSweep,
    HeadSweep,
    analytic_gain,
    exact_sweep,
    fast_sweep,
    query_sweeps,
    sweep_heads,
)

__version__ = "0.1.0"

__all__ = [
    "METRIC_NAMES",
    "AttentionLayout",
    "ExactSweep",
    "HeadSweep",
    "KeyScale",
    "LogitScale",
    "MetricCapture",
    "QueryScale",
    "SpectraError",
    "TokenMetrics",
    "analytic_gain",
    "attached",
    "attention_layout",
    "bridge_from_hf",
    "capture_metrics",
    "exact_sweep",
    "fast_sweep",
    "load_model",
    "load_tokenizer",
    "query_sweeps",
    "repeat_for_alphas",
    "sweep_heads",
]
