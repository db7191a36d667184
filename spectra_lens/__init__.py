"""spectra_lens: how the query norm sets attention sharpness, measured and causally tested.

The public surface: load a model (`load_model`), read its attention layout
(`attention_layout`), capture per-token metrics (`capture_metrics`, `MetricCapture`), edit the
forward pass (`QueryScale`, `KeyScale`, `LogitScale`, `QueryRotate`) inside `attached(...)`, and ask the two
sweep questions: each head's own α-curve (`head_curves`: the fast path softmax(α·s) where the
logits are bilinear, the exact forward pass elsewhere) and one intervention's consequences
(`intervention_effects` of a `Scan` such as `QueryScale.scan(layer, head)`: downstream loss,
KL and later heads), plus `analytic_gain`.
Statistics are in `spectra_lens.stats`, figures in `spectra_lens.present.figures`, the four experiments
in `spectra_lens.experiments`.

Names resolve lazily, so `import spectra_lens` (and the command line's --help) does not import
torch until a name that needs it is used.
"""

import importlib
import os
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# OpenMP threads (torch's CPU thread pool, MKL) with no work sleep at once instead of spinning.
# On cores shared with other work a spinning thread keeps a core from the thread that has work,
# and every parallel region waits for it: on a 2-core machine at load average 4.7-5.5, the first
# `capture_metrics(model, "hello")` after `load_model()` took 11.2-16.8 s with spinning threads
# and 2.1-2.6 s without (interleaved runs; the layout probe's two passes are most of it). The
# results are the same bit for bit: the work is split among the same threads, only idle ones
# behave differently. The OpenMP runtime reads this once, when torch is first imported, so it is
# set only if torch is not imported yet, and never over the user's value (ACTIVE: spin).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_EXPORTS = {
    "SpectraError": "spectra_lens.errors",
    "METRIC_NAMES": "spectra_lens.capture",
    "MetricCapture": "spectra_lens.capture",
    "SweepCapture": "spectra_lens.capture",
    "TokenMetrics": "spectra_lens.capture",
    "attached": "spectra_lens.capture",
    "capture_metrics": "spectra_lens.capture",
    "KeyScale": "spectra_lens.interventions",
    "LogitScale": "spectra_lens.interventions",
    "QueryRotate": "spectra_lens.interventions",
    "QueryScale": "spectra_lens.interventions",
    "Scan": "spectra_lens.interventions",
    "repeat_for_alphas": "spectra_lens.interventions",
    "AttentionLayout": "spectra_lens.layout",
    "attention_layout": "spectra_lens.layout",
    "bridge_from_hf": "spectra_lens.models",
    "load_model": "spectra_lens.models",
    "load_tokenizer": "spectra_lens.models",
    "ExactSweep": "spectra_lens.sweep",
    "HeadSweep": "spectra_lens.sweep",
    "analytic_gain": "spectra_lens.sweep",
    "head_curves": "spectra_lens.sweep",
    "intervention_effects": "spectra_lens.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spectra_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time names resolve lazily
    from spectra_lens.capture import (  # noqa: F401
        METRIC_NAMES,
        MetricCapture,
        SweepCapture,
        TokenMetrics,
        attached,
        capture_metrics,
    )
    from spectra_lens.errors import SpectraError  # noqa: F401
    from spectra_lens.interventions import (  # noqa: F401
        KeyScale,
        LogitScale,
        QueryRotate,
        QueryScale,
        Scan,
        repeat_for_alphas,
    )
    from spectra_lens.layout import AttentionLayout, attention_layout  # noqa: F401
    from spectra_lens.models import bridge_from_hf, load_model, load_tokenizer  # noqa: F401
    from spectra_lens.sweep import (  # noqa: F401
        ExactSweep,
        HeadSweep,
        analytic_gain,
        head_curves,
        intervention_effects,
    )
