"""Study: EXP0 + observational-vs-causal agreement (+ EXP2 gain) over several models and corpora.

    spectra-lens study [--models default Qwen2.5-Coder-0.5B-Instruct]
        [--corpora default kjv chatterbot] [--n-sequences 64] [--seq-len 128]
        [--gain-sequences 16] [--no-run-gain] [--out results/study] [--overwrite]

For every model (loaded once) and every corpus, the observational experiment runs into
`OUT/<model>/<corpus>/observational` (its own run directory: shards, records, head tables,
`agreement.csv` where the observational run writes it, figures, manifest), and with gain the
gain experiment into `OUT/<model>/<corpus>/gain`. Each cell of the study is then summarized
in one row of `study_table.csv` (columns: `STUDY_COLUMNS`; what each means: `DEFINITIONS`,
also in the manifest), and `figures/study_comparison.html` shows, for every cell, the
observational slope dH/d ln ‖q‖ of each head against its causal gain (analytic −Var_p(s))
with the line of agreement, so the cells can be compared at a glance.

A cell whose runs are complete is reused when the study is run again (each experiment's own
resume rule); `--overwrite` redoes every cell.
"""

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy import stats as sps

from spectra_lens.config import StudyConfig
from spectra_lens.errors import SpectraError
from spectra_lens.runs import outputs as O
from spectra_lens.runs.rundir import RunDir
from spectra_lens.validate import HeadRef

__all__ = ["DEFINITIONS", "STUDY_COLUMNS", "StudyConfig", "StudyResult", "command", "run",
           "summarize_cell"]

log = logging.getLogger(__name__)
EXPERIMENT = "study"

DEFINITIONS = {
    "model / corpus / genre": "the model spec, the corpus name and the genre of its text",
    "n_heads": "heads summarized",
    "n_sequences / n_documents": "measured sequences of EXP0 and the documents they come from",
    "median_r_logq_entropy": "median over heads of the token-level Pearson r(ln ||q||, entropy)",
    "frac_r_positive": "share of heads with r(ln ||q||, entropy) > 0",
    "frac_significant": "share of heads flagged significant by EXP0 (its test, as named in its tables)",
    "median_partial_r_controlled": "median over heads of the most controlled partial r EXP0 reports "
                                   "(given log position and sink mass where available)",
    "median_obs_slope": "median over heads of the observational slope dH/d ln ||q|| (agreement.csv)",
    "median_causal_gain": "median over heads of the causal gain dH/d ln alpha at alpha = 1 "
                          "(analytic -Var_p(s)); <= 0 for every head by construction",
    "frac_slope_positive": "share of heads whose observational slope is > 0 (the causal gain never is)",
    "spearman_slope_gain": "Spearman rank correlation across heads of observational slope and causal gain",
    "median_temperature_share": "median share of entropy variance a pure temperature effect would explain",
    "frac_agree": "share of heads whose agreement verdict says the two sides agree",
    "median_gain_entropy": "EXP2: median fitted entropy gain over the alpha grid",
    "frac_monotonic": "EXP2: share of heads whose entropy is monotonic in alpha",
}
STUDY_COLUMNS = ("model", "corpus", "genre", "n_heads", "n_sequences", "n_documents",
                 "median_r_logq_entropy", "frac_r_positive", "frac_significant",
                 "median_partial_r_controlled", "median_obs_slope", "median_causal_gain",
                 "frac_slope_positive", "spearman_slope_gain", "median_temperature_share",
                 "frac_agree", "median_gain_entropy", "frac_monotonic", "observational_dir",
                 "gain_dir")


@dataclass(frozen=True, repr=False)
class StudyResult:
    table: pd.DataFrame  # study_table.csv
    cells: dict  # (model, corpus) -> {"observational": dir, "gain": dir | None}
    out: Path | None = None

    def __repr__(self) -> str:
        return f"StudyResult(cells={len(self.cells)}, out={self.out})"

    def _repr_html_(self) -> str:
        return f"<b>{repr(self)}</b>" + self.table.drop(columns=["observational_dir", "gain_dir"]) \
            .to_html(index=False, float_format="%.3g")


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name if "/" in spec and Path(spec).exists() else spec)


def _first(frame: pd.DataFrame | None, *names: str) -> pd.Series | None:
    """The first of `names` that is a column of `frame` (None if none is)."""
    if frame is None:
        return None
    for n in names:
        if n in frame.columns:
            return pd.to_numeric(frame[n], errors="coerce")
    return None


def _median(x: pd.Series | None) -> float:
    return float(x.median()) if x is not None and x.notna().any() else math.nan


def _share(mask: pd.Series | None) -> float:
    return float(mask.mean()) if mask is not None and len(mask) else math.nan


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def summarize_cell(obs_dir: Path, gain_dir: Path | None = None) -> dict:
    """One row of the study table from a finished observational (and gain) run directory."""
    summary = _read(obs_dir / "head_summary.csv")
    if summary is None:
        raise SpectraError(f"{obs_dir} holds no head_summary.csv; is the observational run complete?")
    agreement = _read(obs_dir / "agreement.csv")
    manifest = _json(obs_dir / "manifest.json")
    r = _first(summary, "r_logq_entropy", "r_entropy", "r_q_entropy", "correlation")
    sig = summary["significant"].astype(bool) if "significant" in summary.columns else None
    partial = _first(summary, "r_logq_entropy_given_pos_sink", "partial_r_entropy_sink",
                     "r_logq_entropy_given_pos", "partial_r_entropy")
    slope = _first(agreement, "obs_slope")
    gain = _first(agreement, "gain_analytic", "analytic_gain")
    verdict = agreement["verdict"].astype(str) if agreement is not None and "verdict" in agreement else None
    row = {
        "n_heads": len(summary),
        "n_sequences": manifest.get("n_sequences"),
        "n_documents": manifest.get("n_documents", manifest.get("documents", {}).get("n")
                                    if isinstance(manifest.get("documents"), dict) else None),
        "median_r_logq_entropy": _median(r),
        "frac_r_positive": _share(r > 0) if r is not None else math.nan,
        "frac_significant": _share(sig),
        "median_partial_r_controlled": _median(partial),
        "median_obs_slope": _median(slope),
        "median_causal_gain": _median(gain),
        "frac_slope_positive": _share(slope > 0) if slope is not None else math.nan,
        "spearman_slope_gain": (float(sps.spearmanr(slope, gain, nan_policy="omit").statistic)
                                if slope is not None and gain is not None else math.nan),
        "median_temperature_share": _median(_first(agreement, "temperature_share")),
        "frac_agree": (_share(verdict.str.startswith("agree")) if verdict is not None else math.nan),
        "median_gain_entropy": math.nan,
        "frac_monotonic": math.nan,
        "observational_dir": str(obs_dir),
        "gain_dir": str(gain_dir) if gain_dir else "",
    }
    if gain_dir is not None:
        g = _read(gain_dir / "gain_summary.csv")
        if g is not None:
            row["median_gain_entropy"] = _median(_first(g, "gain_entropy"))
            if "is_monotonic" in g.columns:
                row["frac_monotonic"] = float(g["is_monotonic"].astype(bool).mean())
            if math.isnan(row["median_causal_gain"]):
                row["median_causal_gain"] = _median(_first(g, "analytic_gain"))
    return row


def _json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def comparison_figure(cells: dict[tuple[str, str], Path], table: pd.DataFrame) -> go.Figure:
    """Per cell: observational slope dH/d ln ||q|| (x) vs causal gain (y) of every head, with
    y = x (agreement) and y = 0; cells without agreement.csv show r(ln ||q||, H) by layer."""
    keys = list(cells)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    titles = []
    for m, c in keys:
        t = table[(table["model"] == m) & (table["corpus"] == c)]
        rho = float(t["spearman_slope_gain"].iloc[0]) if len(t) else math.nan
        titles.append(f"{m} · {c}" + (f" (Spearman {rho:+.2f})" if np.isfinite(rho) else ""))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=0.14)
    for i, key in enumerate(keys):
        r, c = i // cols + 1, i % cols + 1
        agreement = _read(cells[key] / "agreement.csv")
        x, y = _first(agreement, "obs_slope"), _first(agreement, "gain_analytic", "analytic_gain")
        if x is not None and y is not None:
            fig.add_trace(go.Scatter(x=x, y=y, mode="markers", marker=dict(size=5, opacity=0.6),
                                     text=[str(HeadRef(int(a), int(b))) for a, b in zip(agreement["layer"], agreement["head"])],
                                     name=f"{key[0]} · {key[1]}", showlegend=False), row=r, col=c)
            lim = float(np.nanmax(np.abs(np.concatenate([x.to_numpy(), y.to_numpy()])))) or 1.0
            fig.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", showlegend=i == 0,
                                     name="observational = causal", line=dict(dash="dot", color="grey")),
                          row=r, col=c)
            fig.update_xaxes(title_text="observational dH/d ln ||q||", row=r, col=c)
            fig.update_yaxes(title_text="causal gain -Var_p(s)", row=r, col=c)
        else:
            s = _read(cells[key] / "head_summary.csv")
            rr = _first(s, "r_logq_entropy", "r_entropy", "correlation")
            fig.add_trace(go.Box(x=s["layer"], y=rr, showlegend=False, name=f"{key[0]} · {key[1]}"),
                          row=r, col=c)
            fig.update_xaxes(title_text="layer", row=r, col=c)
            fig.update_yaxes(title_text="r(ln ||q||, H)", row=r, col=c)
    fig.update_layout(title="Observational slope vs causal gain per head, by model and corpus",
                      template="plotly_white", height=420 * rows)
    return fig


def run(cfg: StudyConfig = StudyConfig(), *, models: dict | None = None,
        progress: bool = True) -> StudyResult:
    """Every cell's runs, then study_table.csv, figures/study_comparison.html, manifest.json.

    `models` maps specs of `cfg.models` to bridges already loaded (the others are loaded)."""
    from spectra_lens.config import GainConfig, ObservationalConfig
    from spectra_lens.data.genres import GENRES
    from spectra_lens.models import load_model, resolve_device

    from . import gain as gain_exp
    from . import observational

    cfg.validate()
    rd = RunDir(cfg.out, EXPERIMENT)
    rd.start(cfg, overwrite=cfg.overwrite, resumable_keys=("overwrite",))
    rows, cells = [], {}
    model_specs, corpus_specs = cfg.cells()
    for spec in model_specs:
        t0 = time.time()
        model = (models or {}).get(spec) or load_model(
            None if spec == "default" else spec, dtype=cfg.dtype, device=resolve_device(cfg.device),
            device_map=cfg.device_map)
        rd.timed(f"load_{_slug(spec)}_s", time.time() - t0)
        for corpus in corpus_specs:
            base = rd.path / _slug(spec) / _slug(corpus)
            t0 = time.time()
            obs_cfg = ObservationalConfig(model=None if spec == "default" else spec,
                                          corpus=None if corpus == "default" else corpus,
                                          out=str(base / "observational"), n_sequences=cfg.n_sequences,
                                          seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                          seed=cfg.seed, dtype=cfg.dtype, device=cfg.device,
                                          device_map=cfg.device_map, overwrite=cfg.overwrite,
                                          images=cfg.images)
            obs = observational.run(obs_cfg, model=model, progress=progress)
            rd.timed(f"observational_{_slug(spec)}_{_slug(corpus)}_s", time.time() - t0)
            gain_dir = None
            if cfg.run_gain:
                t0 = time.time()
                g_cfg = GainConfig(model=None if spec == "default" else spec,
                                   corpus=None if corpus == "default" else corpus,
                                   out=str(base / "gain"), n_sequences=cfg.gain_sequences,
                                   seq_len=cfg.seq_len, seed=cfg.seed, dtype=cfg.dtype,
                                   device=cfg.device, device_map=cfg.device_map,
                                   overwrite=cfg.overwrite, images=cfg.images)
                gain_dir = gain_exp.run(g_cfg, model=model, progress=progress).out
                rd.timed(f"gain_{_slug(spec)}_{_slug(corpus)}_s", time.time() - t0)
            cells[(spec, corpus)] = Path(obs.out)
            rows.append({"model": spec, "corpus": corpus, "genre": GENRES.get(corpus, "user corpus"),
                         **summarize_cell(Path(obs.out), Path(gain_dir) if gain_dir else None)})
        del model
    table = pd.DataFrame(rows)[list(STUDY_COLUMNS)]
    rd.write_csv("study_table.csv", table)
    O.write_figure(rd, comparison_figure(cells, table), "study_comparison")
    rd.finish(models=list(model_specs), corpora=list(corpus_specs), files=["study_table.csv"],
              cells={f"{m} | {c}": str(p) for (m, c), p in cells.items()}, definitions=DEFINITIONS)
    return StudyResult(table=table, cells={k: {"observational": v} for k, v in cells.items()}, out=rd.path)


def command(cfg: StudyConfig, *, progress: bool = True) -> int:
    """`spectra-lens study`: run `cfg`, print the table; SpectraError for bad input."""
    t0 = time.perf_counter()
    result = run(cfg, progress=progress)
    shown = [c for c in STUDY_COLUMNS if c not in ("observational_dir", "gain_dir")]
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(result.table[shown].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {result.out} in {time.perf_counter() - t0:.0f} s")
    return 0

