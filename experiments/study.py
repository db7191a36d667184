"""Study: EXP0 + observational-vs-causal agreement + norm counterfactual (+ EXP2 gain, norm
ablation, causal map) over several models and corpora.

    spectra-lens study [--models default Qwen2.5-Coder-0.5B-Instruct gemma-3-270m]
        [--corpora default kjv chatterbot] [--n-sequences 64] [--seq-len 128] [--fd-sequences N]
        [--gain-sequences 16] [--no-run-gain] [--no-run-causal] [--causal-sequences 8]
        [--causal-seq-len 64] [--causal-select 8] [--causal-heads 0] [--causal-alphas 0.5 2]
        [--no-ablation-baselines] [--out results/study] [--overwrite]

For every model (loaded once) and every corpus, the observational experiment runs into
`OUT/<model>/<corpus>/observational` (its own run directory: shards, records, head tables,
`agreement.csv` with the norm counterfactual's share, figures, manifest), with gain the gain
experiment into `OUT/<model>/<corpus>/gain`, and with the causal steps the norm ablation
(`ablate-norm`) into `.../ablate_norm` and the causal map (joined on that norm ablation) into
`.../causal_map`, both on the same `--causal-sequences` sequences of `--causal-seq-len` tokens
and the same heads (every head, or `--causal-heads` of them spread evenly over the model).
Each cell of the study is then summarized in one row of `study_table.csv` (columns:
`study_columns(alphas)`, `STUDY_COLUMNS` at the default alphas; what each means:
`DEFINITIONS`, also in the manifest), and `figures/study_comparison.html` shows, for every
cell, the observational slope dH/d ln ‖q‖ of each head against its causal gain (analytic
−Var_p(s)) with the line of agreement, so the cells can be compared at a glance.

A cell's run that is complete with the same config is read back, not run again, when the
study is run again (`RunDir.finished`); `--overwrite` redoes every cell.
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
           "spread_heads", "study_columns", "summarize_causal", "summarize_cell"]

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
    "median_norm_share": "norm counterfactual: median over heads of (Var H - Var H_cf) / Var H, H_cf "
                         "the entropy with the query at the head's reference norm (direction kept), "
                         "over the documents outside the reference selection (agreement.csv)",
    "median_norm_share_given_position": "the same within log-position bins (position's share removed)",
    "frac_norm_share_above_0": "share of heads whose norm_share document interval lies above 0",
    "ablation_n_heads": "ablate-norm: heads ablated (every head, or --causal-heads spread evenly)",
    "ablation_n_sequences / ablation_n_documents": "ablate-norm and causal-map: measured sequences "
                                                   "and their documents (disjoint from the selection's)",
    "median_norm_ablation_kl": "ablate-norm: median over heads of KL(p || p_ablated) of the next-token "
                               "distribution when the head's query norm is replaced by its reference norm",
    "max_norm_ablation_kl": "ablate-norm: the largest KL over the heads (a KL is >= 0, so its interval "
                            "never says whether it matters; the strongest head and the loss do)",
    "median_norm_ablation_delta_loss": "ablate-norm: median over heads of the next-token loss change",
    "frac_norm_ablation_loss_excludes_0": "ablate-norm: share of heads whose delta-loss interval excludes 0",
    "median_norm_minus_rotation_kl": "ablate-norm: median over heads of KL(norm ablation) - KL(rotation "
                                     "by the head's natural angular spread, norm kept), paired per sequence",
    "frac_norm_above_rotation": "ablate-norm: share of heads whose paired norm-minus-rotation KL "
                                "interval lies above 0",
    "map_spearman_gain_kl_a{alpha}": "causal map at query scale alpha: Spearman across heads of the "
                                     "analytic gain -Var_p(s) and the downstream KL, with its "
                                     "head-bootstrap interval (_ci_low, _ci_high)",
    "map_spearman_norm_kl_a{alpha}": "causal map at alpha: Spearman across heads of the norm-ablation "
                                     "KL and the map's KL",
    "map_median_kl_a{alpha}": "causal map at alpha: median over heads of the downstream KL",
}
DEFAULT_ALPHAS = (0.5, 2.0)
_BASE_COLUMNS = ("model", "corpus", "genre", "n_heads", "n_sequences", "n_documents",
                 "median_r_logq_entropy", "frac_r_positive", "frac_significant",
                 "median_partial_r_controlled", "median_obs_slope", "median_causal_gain",
                 "frac_slope_positive", "spearman_slope_gain", "median_temperature_share",
                 "frac_agree", "median_gain_entropy", "frac_monotonic", "median_norm_share",
                 "median_norm_share_given_position", "frac_norm_share_above_0")
_ABLATION_COLUMNS = ("ablation_n_heads", "ablation_n_sequences", "ablation_n_documents",
                     "median_norm_ablation_kl", "max_norm_ablation_kl",
                     "median_norm_ablation_delta_loss", "frac_norm_ablation_loss_excludes_0",
                     "median_norm_minus_rotation_kl", "frac_norm_above_rotation")
_DIR_COLUMNS = ("observational_dir", "gain_dir", "ablate_dir", "map_dir")


def _map_columns(alpha: float) -> tuple[str, ...]:
    a = f"a{alpha:g}"
    return (f"map_spearman_gain_kl_{a}", f"map_spearman_gain_kl_{a}_ci_low",
            f"map_spearman_gain_kl_{a}_ci_high", f"map_spearman_norm_kl_{a}", f"map_median_kl_{a}")


def study_columns(alphas=DEFAULT_ALPHAS) -> tuple[str, ...]:
    """The columns of study_table.csv for the causal map's `alphas`."""
    return (_BASE_COLUMNS + _ABLATION_COLUMNS + tuple(c for a in sorted(alphas) for c in _map_columns(a))
            + _DIR_COLUMNS)


STUDY_COLUMNS = study_columns()


@dataclass(frozen=True, repr=False)
class StudyResult:
    table: pd.DataFrame  # study_table.csv
    cells: dict  # (model, corpus) -> {"observational": dir, "gain": dir | None}
    out: Path | None = None

    def __repr__(self) -> str:
        return f"StudyResult(cells={len(self.cells)}, out={self.out})"

    def _repr_html_(self) -> str:
        return f"<b>{repr(self)}</b>" + self.table.drop(columns=list(_DIR_COLUMNS), errors="ignore") \
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
    partial = _first(summary, "r_logq_entropy_mediator_adjusted", "r_logq_entropy_given_pos_sink",
                     "partial_r_entropy_sink",
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
        "frac_agree": (_share(verdict.str.startswith(("agree", "equivalent"))) if verdict is not None else math.nan),
        "median_gain_entropy": math.nan,
        "frac_monotonic": math.nan,
        "median_norm_share": _median(_first(agreement, "norm_share")),
        "median_norm_share_given_position": _median(_first(agreement, "norm_share_given_position")),
        "frac_norm_share_above_0": _above_0(agreement, "norm_share"),
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


def _above_0(frame: pd.DataFrame | None, name: str) -> float:
    """Share of rows whose `name` interval (`name`_ci_low) lies above 0; NaN where not computed."""
    low = _first(frame, f"{name}_ci_low")
    return _share(low[low.notna()] > 0) if low is not None and low.notna().any() else math.nan


def summarize_causal(ablate_dir: Path | None, map_dir: Path | None, alphas=DEFAULT_ALPHAS) -> dict:
    """The ablation and map columns of a cell's row from finished ablate-norm and causal-map run
    directories (NaN for a step that was not run)."""
    row: dict = {c: math.nan for c in _ABLATION_COLUMNS}
    for a in alphas:
        row.update({c: math.nan for c in _map_columns(a)})
    row["ablate_dir"] = str(ablate_dir) if ablate_dir else ""
    row["map_dir"] = str(map_dir) if map_dir else ""
    t = _read(ablate_dir / "norm_ablation.csv") if ablate_dir else None
    if t is not None:
        excl = t["norm_delta_loss_excludes_0"].astype(bool) if "norm_delta_loss_excludes_0" in t else None
        row.update({
            "ablation_n_heads": len(t),
            "ablation_n_sequences": int(t["n_sequences"].iloc[0]) if len(t) else math.nan,
            "ablation_n_documents": int(t["n_documents"].iloc[0]) if len(t) else math.nan,
            "median_norm_ablation_kl": _median(_first(t, "norm_kl")),
            "max_norm_ablation_kl": float(t["norm_kl"].max()) if len(t) else math.nan,
            "median_norm_ablation_delta_loss": _median(_first(t, "norm_delta_loss")),
            "frac_norm_ablation_loss_excludes_0": _share(excl),
            "median_norm_minus_rotation_kl": _median(_first(t, "norm_minus_rotation_kl")),
            "frac_norm_above_rotation": _above_0(t, "norm_minus_rotation_kl"),
        })
    summary = _read(map_dir / "causal_map_summary.csv") if map_dir else None
    if summary is not None:
        for a in alphas:
            at = summary[np.isclose(summary["alpha"].astype(float), float(a)) & (summary["y"] == "kl")]
            gain = at[at["x"] == "gain_analytic"]
            norm = at[at["x"] == "norm_kl"]
            name = f"a{a:g}"
            if len(gain):
                g = gain.iloc[0]
                row[f"map_spearman_gain_kl_{name}"] = float(g["spearman"])
                row[f"map_spearman_gain_kl_{name}_ci_low"] = float(g["spearman_ci_low"])
                row[f"map_spearman_gain_kl_{name}_ci_high"] = float(g["spearman_ci_high"])
                row[f"map_median_kl_{name}"] = float(g["median_y"])
            if len(norm):
                row[f"map_spearman_norm_kl_{name}"] = float(norm.iloc[0]["spearman"])
    return row


def spread_heads(n_layers: int, n_heads: int, k: int) -> tuple[str, ...]:
    """`k` heads spread evenly over the model's heads in (layer, head) order, as labels 'LxHy';
    () (every head) where k is 0 or at least the model's number of heads."""
    total = n_layers * n_heads
    if k <= 0 or k >= total:
        return ()
    flat = np.unique(np.round(np.linspace(0, total - 1, k)).astype(int))
    return tuple(str(HeadRef(int(i) // n_heads, int(i) % n_heads)) for i in flat)


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


def _done(out: Path, experiment: str, sub_cfg) -> bool:
    """The cell's run in `out` is complete with `sub_cfg` (read it back) and not to be redone."""
    return not sub_cfg.overwrite and RunDir(out, experiment).finished(sub_cfg)


def _causal_cell(cfg: StudyConfig, spec: str, corpus: str, base: Path, model, rd,
                 progress: bool) -> tuple[Path, Path]:
    """ablate-norm, then causal-map joined on its norm_ablation.csv, on the same tokens and heads."""
    from spectra_lens.config import AblateNormConfig, CausalMapConfig
    from spectra_lens.layout import attention_layout

    from . import ablate_norm, causal_map

    layout = attention_layout(model)
    common = dict(model=None if spec == "default" else spec, corpus=None if corpus == "default" else corpus,
                  heads=spread_heads(layout.n_layers, layout.n_heads, cfg.causal_heads),
                  n_sequences=cfg.causal_sequences, seq_len=cfg.causal_seq_len, n_select=cfg.causal_select,
                  seed=cfg.seed, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                  overwrite=cfg.overwrite, images=cfg.images)
    a_cfg = AblateNormConfig(out=str(base / "ablate_norm"), baselines=cfg.ablation_baselines, **common)
    m_cfg = CausalMapConfig(out=str(base / "causal_map"), alphas=tuple(cfg.causal_alphas),
                            norm_ablation=str(base / "ablate_norm" / "norm_ablation.csv"), **common)
    tokens = None
    slug = f"{_slug(spec)}_{_slug(corpus)}"
    for exp, module, sub in ((ablate_norm.EXPERIMENT, ablate_norm, a_cfg), (causal_map.EXPERIMENT, causal_map, m_cfg)):
        if _done(Path(sub.out), exp, sub):
            log.info("%s of %s | %s is complete: read back", exp, spec, corpus)
            continue
        t0 = time.time()
        if tokens is None:  # the same measured and selection sequences for both runs
            tokens = ablate_norm.disjoint_tokens(a_cfg, model)
        module.run(sub, model=model, tokens=tokens, progress=progress)
        rd.timed(f"{exp}_{slug}_s", time.time() - t0)
    return Path(a_cfg.out), Path(m_cfg.out)


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
    alphas = tuple(sorted(float(a) for a in cfg.causal_alphas))
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
                                          fd_sequences=cfg.fd_sequences, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device,
                                          device_map=cfg.device_map, overwrite=cfg.overwrite,
                                          images=cfg.images)
            if _done(base / "observational", observational.EXPERIMENT, obs_cfg):
                obs_dir = base / "observational"
            else:
                obs_dir = Path(observational.run(obs_cfg, model=model, progress=progress).out)
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
                if _done(base / "gain", gain_exp.EXPERIMENT, g_cfg):
                    gain_dir = base / "gain"
                else:
                    gain_dir = gain_exp.run(g_cfg, model=model, progress=progress).out
                    rd.timed(f"gain_{_slug(spec)}_{_slug(corpus)}_s", time.time() - t0)
            ablate_dir = map_dir = None
            if cfg.run_causal:
                ablate_dir, map_dir = _causal_cell(cfg, spec, corpus, base, model, rd, progress)
            cells[(spec, corpus)] = obs_dir
            rows.append({"model": spec, "corpus": corpus, "genre": GENRES.get(corpus, "user corpus"),
                         **summarize_cell(obs_dir, Path(gain_dir) if gain_dir else None),
                         **summarize_causal(ablate_dir, map_dir, alphas)})
        del model
    table = pd.DataFrame(rows)[list(study_columns(alphas))]
    rd.write_csv("study_table.csv", table)
    O.write_figure(rd, comparison_figure(cells, table), "study_comparison")
    rd.finish(models=list(model_specs), corpora=list(corpus_specs), files=["study_table.csv"],
              cells={f"{m} | {c}": str(p) for (m, c), p in cells.items()}, definitions=DEFINITIONS)
    return StudyResult(table=table, cells={k: {"observational": v} for k, v in cells.items()}, out=rd.path)


def command(cfg: StudyConfig, *, progress: bool = True) -> int:
    """`spectra-lens study`: run `cfg`, print the table; SpectraError for bad input."""
    t0 = time.perf_counter()
    result = run(cfg, progress=progress)
    shown = [c for c in result.table.columns if c not in _DIR_COLUMNS]
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(result.table[shown].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {result.out} in {time.perf_counter() - t0:.0f} s")
    return 0

