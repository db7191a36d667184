"""The causal map: what scaling each head's query does downstream, against the head's own gain.

    spectra-lens causal-map [--alphas 0.5 2] [--heads L15H8 ...] [--norm-ablation norm_ablation.csv]
        [--n-sequences 16] [--seq-len 128] [--model M] [--corpus C] [--out DIR] [--overwrite]

For every head (by default) and every α of the grid, the head's effective query is scaled by α
(`QueryScale`) in the real forward pass, several heads per pass on copies of the batch. Per head
and α: KL(p ‖ p_α) of the next-token distribution and Δloss with document intervals, the head's
own entropy change (an identity check: softmax(α·s) where the logits are bilinear) and the mean
|ΔH| of later heads; beside them the head's analytic gain −Var_p(s) (dH/d ln α at α = 1) on the
same tokens, and, with --norm-ablation, its norm-ablation effect. Across heads:
Spearman(gain, KL) per α with a percentile interval that resamples heads.

The measured sequences are chosen as ablate-norm chooses them (`ablate_norm.disjoint_tokens`:
the first n_select sequences are set aside), so at the same sizes both runs measure the same
sequences and their tables join on (layer, head).

Outputs (in --out): `causal_map.csv` (one row per head and α), `causal_map_summary.csv`, figures
under `figures/` (layer × head maps of the KL per α, gain against KL), `manifest.json`.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from scipy import stats

from spectra_lens.causal import document_bootstrap
from spectra_lens.config import CausalMapConfig
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import QueryScale
from spectra_lens.layout import attention_layout
from spectra_lens.norm_ablation import OUTCOMES, Copy, CopyEffects, copy_effects, effect_frame
from spectra_lens.present.figures import causal_map as F
from spectra_lens.runs import outputs as O
from spectra_lens.runs import pipeline as P
from spectra_lens.sweep import analytic_gain
from spectra_lens.validate import HeadRef, check_alphas

from .ablate_norm import begin, n_documents, selected_heads, token_record

__all__ = ["CausalMapResult", "command", "compute", "run", "spearman_over_heads"]

log = logging.getLogger(__name__)
EXPERIMENT = "causal_map"
NORM_COLUMNS = ("norm_kl", "norm_kl_ci_low", "norm_kl_ci_high", "norm_delta_loss", "norm_delta_loss_ci_low",
                "norm_delta_loss_ci_high")
SPEARMAN_RULE = ("Spearman rank correlation across heads; interval: percentile bootstrap that resamples "
                 "heads with replacement (heads treated as exchangeable units; the per-head values are "
                 "estimates, whose own noise the interval does not add)")


@dataclass(frozen=True, repr=False)
class CausalMapResult:
    table: pd.DataFrame  # causal_map.csv
    summary: pd.DataFrame  # causal_map_summary.csv
    effects: CopyEffects
    out: Path | None = None

    def __repr__(self) -> str:
        return f"CausalMapResult(rows={len(self.table)}, out={self.out})"


def spearman_over_heads(x, y, *, ci: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float, int]:
    """(rho, low, high, n): Spearman(x, y) over the heads where both are finite, with a
    percentile interval from resampling heads (`SPEARMAN_RULE`)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(ok.sum())
    if n < 3:
        return float("nan"), float("nan"), float("nan"), n
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    rx = stats.rankdata(x[idx], axis=1)
    ry = stats.rankdata(y[idx], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    tail = (1 - ci) / 2 * 100
    low, high = np.nanpercentile(boot, [tail, 100 - tail])
    return rho, float(low), float(high), n


def read_norm_ablation(path) -> pd.DataFrame:
    """The (layer, head) and norm columns of a norm_ablation.csv (SpectraError naming what lacks)."""
    p = Path(path)
    if not p.is_file():
        raise SpectraError(f"--norm-ablation {p}: no such file; expected norm_ablation.csv of `spectra-lens ablate-norm`")
    try:
        frame = pd.read_csv(p)
    except Exception as e:  # pandas raises many types for a malformed file
        raise SpectraError(f"--norm-ablation {p} is unreadable: {e}") from e
    missing = [c for c in ("layer", "head", *NORM_COLUMNS) if c not in frame.columns]
    if missing:
        raise SpectraError(f"--norm-ablation {p} lacks columns {missing}; expected norm_ablation.csv of ablate-norm")
    return frame[["layer", "head", *NORM_COLUMNS]]


def compute(cfg: CausalMapConfig, model, tokens: P.RunTokens, heads=None, *, progress: bool = False,
            rd=None) -> CausalMapResult:
    """The map of `heads` (default: `selected_heads`) on a loaded model (no files written)."""
    layout = attention_layout(model)
    heads = selected_heads(cfg, layout) if heads is None else heads
    alphas = check_alphas(cfg.alphas)
    norm = read_norm_ablation(cfg.norm_ablation) if cfg.norm_ablation else None
    docs = tokens.measure_documents
    n_seq = int(tokens.measure.shape[0])
    with P.timed(rd, "gain_s"):
        g = analytic_gain(model, tokens.measure, min_position=cfg.min_position, batch_size=cfg.max_rows)
        g_mean, g_low, g_high = document_bootstrap(g, docs, ci=cfg.ci, n_boot=cfg.n_boot, seed=cfg.seed)
    copies = [Copy((a, l, h), l, h, QueryScale(l, h, a)) for a in alphas for l, h in heads]
    with P.timed(rd, "interventions_s"):
        effects = copy_effects(model, tokens.measure, copies, min_position=cfg.min_position,
                               max_rows=cfg.max_rows, progress=progress)
    frame = effect_frame(effects, docs, ci=cfg.ci, n_boot=cfg.n_boot, seed=cfg.seed)
    keys = pd.DataFrame(list(effects.keys), columns=["alpha", "layer", "head"])
    table = pd.concat([keys, frame], axis=1)
    table.insert(3, "head_label", [str(HeadRef(l, h)) for l, h in zip(table["layer"], table["head"])])
    li, hi_ = table["layer"].to_numpy(), table["head"].to_numpy()
    table["gain_analytic"] = g_mean[li, hi_]
    table["gain_ci_low"] = g_low[li, hi_]
    table["gain_ci_high"] = g_high[li, hi_]
    table["own_effect"] = ["identity check (softmax(alpha*s))" if layout.q_bilinear[l] else "outcome (not bilinear)"
                           for l in table["layer"]]
    if norm is not None:
        table = table.merge(norm, on=["layer", "head"], how="left")
        lost = int(table["norm_kl"].isna().sum())
        if lost:
            log.warning("%d rows of the map have no head in %s", lost, cfg.norm_ablation)
    table["n_sequences"] = n_seq
    table["n_documents"] = n_documents(docs, n_seq)
    table = table.sort_values(["layer", "head", "alpha"], ignore_index=True)
    return CausalMapResult(table, summarize(table, cfg), effects)


def summarize(table: pd.DataFrame, cfg) -> pd.DataFrame:
    """Per α: Spearman across heads of (gain, KL), (gain, Δloss) and, with norm-ablation
    columns, (norm-ablation KL, KL), each with its head-bootstrap interval; medians."""
    rows = []
    for a, sub in table.groupby("alpha", sort=True):
        pairs = [("gain_analytic", "kl"), ("gain_analytic", "delta_loss"), ("gain_analytic", "later_abs_delta_entropy")]
        if "norm_kl" in sub.columns:
            pairs.append(("norm_kl", "kl"))
        for x, y in pairs:
            rho, lo, hi, n = spearman_over_heads(sub[x], sub[y], ci=cfg.ci, n_boot=cfg.n_boot, seed=cfg.seed)
            rows.append({"alpha": a, "x": x, "y": y, "spearman": rho, "spearman_ci_low": lo,
                         "spearman_ci_high": hi, "n_heads": n, "median_x": float(sub[x].median()),
                         "median_y": float(sub[y].median()),
                         "heads_y_interval_excludes_0": int(((sub[f"{y}_ci_low"] > 0) | (sub[f"{y}_ci_high"] < 0)).sum())})
    return pd.DataFrame(rows)


OUTPUTS = O.Outputs(
    "MAP", "causal map: each head's query scaled, downstream effects against its gain", "spectra-lens causal-map",
    (
        O.Table("causal_map_summary.csv", "Spearman across heads (head-bootstrap intervals)", (),
                ("alpha", "x", "y", "spearman", "spearman_ci_low", "spearman_ci_high", "n_heads"), rows=20),
        O.Table("causal_map.csv", "per head and alpha: downstream effects and gain", ("kl",),
                ("alpha", "head_label", "kl", "kl_ci_low", "kl_ci_high", "delta_loss", "delta_loss_ci_low",
                 "delta_loss_ci_high", "gain_analytic", "norm_kl"), rows=20),
    ),
)


def tables(result: CausalMapResult) -> dict[str, pd.DataFrame]:
    return {"causal_map": result.table, "causal_map_summary": result.summary}


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    out: dict[str, go.Figure] = {}
    t = tables.get("causal_map")
    if t is None or t.empty:
        return out
    for a, sub in t.groupby("alpha", sort=True):
        out[f"causal_map_kl_alpha_{a:g}"] = F.effect_heatmap(
            sub, "kl", title=f"causal map: KL(p_1 || p_alpha) when the head's query is scaled by {a:g}")
    out["causal_map_gain_vs_kl"] = F.gain_vs_effect(t, "kl", title="analytic gain against downstream KL, per head")
    return out


def run(cfg: CausalMapConfig = CausalMapConfig(), *, model=None, tokens: P.RunTokens | None = None,
        progress: bool = True) -> CausalMapResult:
    """The map into `cfg.out`: CSVs, figures and manifest.json."""
    if cfg.norm_ablation:  # a missing or malformed table: before anything is written
        read_norm_ablation(cfg.norm_ablation)
    with begin(cfg, EXPERIMENT, model=model, tokens=tokens, progress=progress) as (rd, model, name, layout, heads, toks):
        result = compute(cfg, model, toks, heads, progress=progress, rd=rd)
        with P.timed(rd, "write_s"):
            t = tables(result)
            files = O.write_outputs(rd, t, figures(t), images=cfg.images, progress=progress)
        e = result.effects
        rd.finish(model=P.model_info(name, layout, model), tokens=token_record(toks), seed=cfg.seed,
                  heads=[str(h) for h in heads], alphas=list(check_alphas(cfg.alphas)), files=files,
                  norm_ablation=cfg.norm_ablation,
                  passes={"n_passes": e.n_passes, "early_layers_skipped": e.skipped, "reason": e.reason,
                          "max_rows": cfg.max_rows},
                  definitions={**OUTCOMES, "spearman": SPEARMAN_RULE,
                               "gain_analytic": "mean over sequences of the per-sequence mean of -Var_p(s) "
                                                "(dH/d ln alpha at alpha = 1) on the measured tokens; "
                                                "document-bootstrap interval",
                               "intervals": f"{cfg.ci:g} percentile bootstrap over documents ({cfg.n_boot} "
                                            f"resamples) of the mean over sequences"})
    return dataclasses.replace(result, out=rd.path)


def command(cfg: CausalMapConfig, *, progress: bool = True) -> int:
    """`spectra-lens causal-map`: run `cfg`, print a summary."""
    t0 = time.perf_counter()
    result = run(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    s = result.summary
    for _, row in s[s["y"] == "kl"].iterrows():
        print(f"alpha={row['alpha']:g}: Spearman({row['x']}, KL) = {row['spearman']:+.3f} "
              f"[{row['spearman_ci_low']:+.3f}, {row['spearman_ci_high']:+.3f}] over {row['n_heads']} heads; "
              f"median KL {row['median_y']:.3g}")
    print(f"wrote {result.out} in {seconds:.0f} s")
    return 0
