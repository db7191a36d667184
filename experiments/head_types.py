"""Head types: every head's sink / previous-token / induction / local / positional scores and
its label (rule: `spectra_lens.head_types.LABEL_RULE`), beside its gain.

    spectra-lens head-types [--model M] [--corpus C] [--n-sequences 8] [--seq-len 64]
        [--n-repeated 8] [--half-len 32] [--agreement agreement.csv] [--gain gain_summary.csv]
        [--out results/head_types] [--overwrite]

The sink, previous-token and local scores, the normalized entropy and the analytic gain
−Var_p(s) (dH/d ln α at α = 1) are measured on `n_sequences` sequences of the corpus; the
induction and positional scores on `n_repeated` sequences of `half_len` random tokens shown
twice (`head_types.diagnostic_inputs`). Definitions: `spectra_lens.head_types`.

Outputs (in --out): `head_types.csv` (one row per head: layer, head, label, the scores, their sd
over sequences, mean_entropy, analytic_gain, and the columns of --agreement / --gain joined on
(layer, head); a name they share gets the suffix `_agreement` / `_gain`),
`head_types_by_label.csv` (for each value column — analytic_gain, obs_slope, gain_analytic,
gain_entropy, where present — and each label: n, mean, median, min and mean rank, rank 1 = most
negative of all heads), figures under `figures/` and `manifest.json`.
"""

import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import plotly.graph_objects as go

from spectra_lens.config import HeadTypesConfig
from spectra_lens.errors import SpectraError
from spectra_lens.head_types import (
    LABEL_RULE,
    by_label,
    diagnostic_inputs,
    head_type_scores,
    join_heads,
)
from spectra_lens.layout import attention_layout
from spectra_lens.present.figures import head_types as FT
from spectra_lens.runs import outputs as O
from spectra_lens.runs import pipeline as P
from spectra_lens.validate import HeadRef

__all__ = ["BY_LABEL_COLUMNS", "OUTPUTS", "HeadTypesResult", "command", "compute", "figures", "run",
           "tables"]

EXPERIMENT = "head_types"


@dataclass(frozen=True, repr=False)
class HeadTypesResult:
    """The tables of one head-types run."""

    types: pd.DataFrame  # head_types.csv
    by_label: pd.DataFrame  # head_types_by_label.csv
    out: Path | None = None

    def __repr__(self) -> str:
        counts = self.types["label"].value_counts().to_dict()
        return f"HeadTypesResult(heads={len(self.types)}, labels={counts}, out={self.out})"

    def _repr_html_(self) -> str:
        return (f"<b>{escape(repr(self))}</b><p>label rule: {escape(LABEL_RULE)}</p>"
                + self.by_label.to_html(index=False, float_format="%.4g"))


# Value columns summarised per label when present: this run's analytic gain, agreement.csv's
# observational slope and analytic gain, gain_summary.csv's fitted entropy gain.
BY_LABEL_COLUMNS = ("analytic_gain", "obs_slope", "gain_analytic", "gain_entropy")


def _join(types: pd.DataFrame, agreement: pd.DataFrame | None, gain: pd.DataFrame | None
          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(types with the agreement / gain tables' columns joined on (layer, head), a clashing
    name suffixed `_agreement` / `_gain`; per value column × label: n, mean, median, min, mean rank)."""
    extra = [(t, s) for t, s in ((agreement, "_agreement"), (gain, "_gain")) if t is not None]
    joined = join_heads(types, *(t for t, _ in extra), suffixes=tuple(s for _, s in extra))
    parts = []
    for col in BY_LABEL_COLUMNS:
        if col in joined.columns and joined[col].notna().any():
            t = by_label(joined, col)
            t = t.rename(columns={f"mean_{col}": "mean", f"median_{col}": "median", f"min_{col}": "min"})
            t.insert(0, "value", col)
            parts.append(t)
    summary = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["value", "label", "n", "mean", "median", "min", "mean_rank"])
    return joined, summary


OUTPUTS = O.Outputs(
    "TYPES", "head types: sink, previous-token, induction, local, positional", "spectra-lens head-types",
    (
        O.Table("head_types.csv", "heads by induction score", ("induction_score",),
                ("layer", "head", "label", "induction_score", "prev_token_score", "sink_score",
                 "local_score", "positional_score", "entropy_norm", "analytic_gain", "obs_slope",
                 "gain_analytic", "gain_entropy", "verdict"), rows=20),
        O.Table("head_types_by_label.csv", "each gain by head type (mean rank 1 = most negative)", (),
                ("value", "label", "n", "mean", "median", "min", "mean_rank"), rows=40),
    ),
)


def tables(result: HeadTypesResult) -> dict[str, pd.DataFrame]:
    """The run's tables by file stem."""
    return {"head_types": result.types, "head_types_by_label": result.by_label}


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """The run's figures from its tables: the label map, the score heatmaps, and each gain-like
    column grouped by label."""
    types = tables.get("head_types")
    if types is None:
        return {}
    out = {"head_types_map": FT.head_type_map(types, title="head types (label rule: first match wins)"),
           "head_type_scores": FT.head_type_scores(types)}
    for col in BY_LABEL_COLUMNS:
        if col in types.columns and types[col].notna().any():
            out[f"{col}_by_type"] = FT.gain_by_type(types, col)
    return out


def _read_table(path: str | None, what: str) -> pd.DataFrame | None:
    if path is None:
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise SpectraError(f"--{what} {path!r} is not a readable CSV ({type(e).__name__}: {e})") from e


def compute(cfg: HeadTypesConfig, model, text, *, agreement: pd.DataFrame | None = None,
            gain: pd.DataFrame | None = None, rd=None, progress: bool = False) -> HeadTypesResult:
    """Every head's scores and label, joined with the agreement / gain tables (no files written)."""
    from spectra_lens.present.display import stages

    with P.timed(rd, "scores_s"), stages("head types", ["inputs", "scores"], enabled=progress) as stage:
        stage("inputs")
        inputs = diagnostic_inputs(model, text, n_repeated=cfg.n_repeated, half_len=cfg.half_len,
                                   seed=cfg.seed)
        stage("scores")
        types = head_type_scores(model, inputs, window=cfg.window, batch_size=cfg.batch_size)
    return HeadTypesResult(*_join(types, agreement, gain))


def run(cfg: HeadTypesConfig = HeadTypesConfig(), *, model=None, tokens=None,
        progress: bool = True) -> HeadTypesResult:
    """Head types into `cfg.out`: head_types.csv, head_types_by_label.csv, figures, manifest."""
    cfg.validate()
    agreement, gain = _read_table(cfg.agreement, "agreement"), _read_table(cfg.gain, "gain")
    with P.run_directory(cfg, EXPERIMENT) as rd:
        with P.timed(rd, "load_model_s"):
            model, model_name = P.load_run_model(cfg, model, progress=progress)
            layout = attention_layout(model)
        with P.timed(rd, "tokens_s"):
            # every head is scored, none is chosen: no held-out selection sequences (n_select = 0)
            spec = SimpleNamespace(corpus=cfg.corpus, seq_len=cfg.seq_len, n_sequences=cfg.n_sequences,
                                   n_select=0)
            text = P.load_run_tokens(spec, model, tokens)
        rd.start(cfg, overwrite=cfg.overwrite)  # the manifest, once the model and text are there
        result = compute(cfg, model, text.measure, agreement=agreement, gain=gain, rd=rd,
                         progress=progress)
        with P.timed(rd, "write_s"):
            t = tables(result)
            files = O.write_outputs(rd, t, figures(t), images=cfg.images, progress=progress)
        rd.finish(model=P.model_info(model_name, layout, model), corpus=text.corpus,
                  n_sequences=int(text.measure.shape[0]), seq_len=int(text.measure.shape[1]),
                  label_rule=LABEL_RULE, joined={"agreement": cfg.agreement, "gain": cfg.gain},
                  files=files, labels=result.types["label"].value_counts().to_dict())
    return HeadTypesResult(result.types, result.by_label, out=rd.path)


def command(cfg: HeadTypesConfig, *, progress: bool = True) -> int:
    """`spectra-lens head-types`: run `cfg`, print the labels; SpectraError for bad input."""
    t0 = time.time()
    result = run(cfg, progress=progress)
    counts = result.types["label"].value_counts()
    print(f"{len(result.types)} heads: " + ", ".join(f"{n} {label}" for label, n in counts.items()))
    for label in ("induction", "previous-token"):
        heads = result.types[result.types["label"] == label]
        if len(heads):
            print(f"{label}: " + ", ".join(f"{HeadRef(int(r.layer), int(r.head))}" for r in heads.itertuples()))
    print("mean analytic gain by label (most negative first):")
    gains = result.by_label[result.by_label["value"] == "analytic_gain"]
    for r in gains.itertuples():
        print(f"  {r.label:<15} {r.mean:+.3f}  (n = {r.n}, mean rank {r.mean_rank:.0f} of {len(result.types)})")
    print(f"wrote {result.out} in {time.time() - t0:.0f} s")
    return 0

