"""spectra_lens: how the query norm sets attention sharpness, measured and causally tested.

The public surface: load a model (`load_model`), read its attention layout
(`attention_layout`), capture per-token metrics (`capture_metrics`, `MetricCapture`), and edit
the forward pass (`QueryScale`, `KeyScale`, `LogitScale`) inside `attached(...)`.
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

__version__ = "0.1.0"

__all__ = [
    "METRIC_NAMES",
    "AttentionLayout",
    "KeyScale",
    "LogitScale",
    "MetricCapture",
    "QueryScale",
    "SpectraError",
    "TokenMetrics",
    "attached",
    "attention_layout",
    "bridge_from_hf",
    "capture_metrics",
    "load_model",
    "load_tokenizer",
    "repeat_for_alphas",
]
