"""EXP3, Q vs K control: scale the key of the target's kv head instead of its query.

    spectra-lens qk-control [--target-layer L --target-head H] [--alphas ...]
        [--n-sequences 8] [--seq-len 128] [--model M] [--corpus C] [--out DIR] [--overwrite]

Where the logits are bilinear in q and k, scaling the target head's query by α and scaling the
key it reads by α give the same logits α·s for that head, so the same pattern. Two things break
the symmetry, and this experiment measures both:

* grouped-query attention: a key is shared by every query head of its group
  (`layout.heads_of_kv(layout.kv_head(h))`, h // (n_heads // n_kv_heads)), so key scaling
  changes all of them while query scaling changes only the target;
* non-bilinear logits (soft-capping, ALiBi): query and key scaling still agree with each other
  for the target (both scale q·k), but neither gives softmax(α·s).

Both scalings run as real forward passes (`sweep.intervention_effects` of
`QueryScale.scan` / `KeyScale.scan` with `on_patterns`, α batched). For every query head of the group and every
α: mean entropy, max attention, k_eff with t-intervals over sequences, the paired entropy
change, the largest absolute difference between the query-scaled and key-scaled patterns, each
pattern's largest deviation from its prediction (softmax(α·s) where the head is scaled, the
unscaled pattern where it is not), and the output effects (Δ loss, KL(p_α ‖ p_1)) of each
scaling. The two sweeps run pass by pass in step (same block of sequences, same α values) and
the pattern comparisons are running maxima (`PatternMaxima`): memory holds the group's patterns
of one forward pass of each sweep (`--max-rows` sequence copies) and of the current block's
unscaled passes, not `[α, batch, T, T]` per head.

What this checks, and what it does not: where the logits are bilinear the target's Q/K
sensitivity ratio is 1 and its query- and key-scaled patterns are equal *by the algebra*
(both give softmax(α·s)); a ratio of 1 there confirms the hooks act where they should, it is
not evidence about the model (`ratio_is` says so per row). What can come out either way is
the effect on the *other* heads of the kv group under key scaling (GQA) and the output
effects (Δ loss, KL(p_1 ‖ p_α)) of the two scalings.

Outputs (in --out): `qk_comparison_results.csv` (one row per scaling × α × group head),
`sensitivity_summary.csv` (one row per group head: entropy slope vs ln α under Q and under K
scaling and their ratio), figures under `figures/` and `manifest.json`.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from spectra_lens.config import QKConfig
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import KeyScale, QueryScale
from spectra_lens.layout import attention_layout
from spectra_lens.metrics import rescale_pattern
from spectra_lens.present import figures as figs
from spectra_lens.runs import outputs as O
from spectra_lens.runs import pipeline as P
from spectra_lens.stats.fits import fit_log_slopes
from spectra_lens.sweep import ExactSweep, intervention_effects
from spectra_lens.validate import HeadRef, check_alphas

from . import _common as C

__all__ = ["PatternMaxima", "QKResult", "compare", "compute", "command", "run", "sensitivity"]

log = logging.getLogger(__name__)
EXPERIMENT = "qk_control"
SCALINGS = ("query", "key")
# A pattern "changed" when some entry moved by more than this (float32 rounding stays below).
CHANGE_TOL = 1e-4


@dataclass(frozen=True, repr=False)
class QKResult:
    """The tables of one EXP3 run."""

    target: tuple[int, int]
    kv_head: int
    group: tuple[int, ...]  # query heads that read kv_head
    comparison: pd.DataFrame  # qk_comparison_results.csv
    sensitivity: pd.DataFrame  # sensitivity_summary.csv
    sweeps: dict  # "query" / "key" -> ExactSweep
    choice: C.HeadChoice
    out: Path | None = None

    def __repr__(self) -> str:
        l, h = self.target
        return f"QKResult(target={HeadRef(l, h)}, kv_head={self.kv_head}, group={list(self.group)}, out={self.out})"

    def _repr_html_(self) -> str:
        return (f"<b>{escape(repr(self))}</b>"
                + self.sensitivity.to_html(index=False, float_format="%.4g"))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class PatternMaxima:
    """The pattern comparisons of `compare` as running maxima over sequences, fed one forward
    pass of the query-scaled and of the key-scaled sweep at a time (`update` is the
    `on_patterns` of `sweep.intervention_effects`), so no sweep's patterns are kept:
    the largest of per-block maxima is the maximum over all sequences, exactly.

    Per group head and α index: `diff_qk[h]` max |p_Q − p_K| (one value for both scalings);
    per (scaling, head): `dev` max |p − prediction| (softmax(α·s) of the unscaled pattern where
    the head is scaled, the unscaled pattern where it is not) and `moved` max |p − p_unscaled|.
    """

    def __init__(self, alphas: tuple[float, ...], layer: int, target: int, group: tuple[int, ...]):
        self.alphas, self.layer, self.target, self.group = tuple(alphas), layer, target, tuple(group)
        empty = lambda: np.full(len(self.alphas), -np.inf)
        self.diff_qk = {h: empty() for h in self.group}
        self.dev = {(sc, h): empty() for sc in SCALINGS for h in self.group}
        self.moved = {(sc, h): empty() for sc in SCALINGS for h in self.group}
        self.seen = np.zeros(len(self.alphas), dtype=np.int64)  # sequences compared per α

    def head_is_scaled(self, scaled: str, head: int) -> bool:
        """Key scaling scales every head of the group, query scaling only the target."""
        return scaled == "key" or head == self.target

    def update(self, passes: dict) -> None:
        """Fold in one pass of each sweep: `{"query": PassPatterns, "key": PassPatterns}` of the
        same block of sequences and the same α values."""
        q, k = passes["query"], passes["key"]
        for i in q.scaled:
            for h in self.group:
                key = (self.layer, h)
                pats = {"query": q.scaled[i][key], "key": k.scaled[i][key]}
                bases = {"query": q.base[key], "key": k.base[key]}
                self.diff_qk[h][i] = np.maximum(self.diff_qk[h][i], _max_abs(pats["query"], pats["key"]))
                for sc in SCALINGS:
                    pat, base = pats[sc], bases[sc]
                    predicted = rescale_pattern(base, self.alphas[i]) if self.head_is_scaled(sc, h) else base
                    self.dev[(sc, h)][i] = np.maximum(self.dev[(sc, h)][i], _max_abs(pat, predicted))
                    self.moved[(sc, h)][i] = np.maximum(self.moved[(sc, h)][i], _max_abs(pat, base))
            self.seen[i] += q.scaled[i][(self.layer, self.group[0])].shape[0]


def compare(sweeps: dict, maxima: PatternMaxima, kv_head: int, layout, *, ci: float) -> pd.DataFrame:
    """One row per (scaled ∈ query/key, α, head of the group); see the module docs."""
    n = sweeps["query"].loss.shape[1]
    if tuple(sweeps["query"].alphas) != maxima.alphas or not (maxima.seen == n).all():
        raise SpectraError(f"the pattern maxima cover {maxima.seen.tolist()} sequences per α of "
                           f"{list(maxima.alphas)}; the sweeps ran {n} at {list(sweeps['query'].alphas)}")
    layer, target, group = maxima.layer, maxima.target, maxima.group
    frames = []
    for scaled in SCALINGS:
        sw: ExactSweep = sweeps[scaled]
        for head in group:
            f = sw.head_frame(layer, head, ci=ci)
            f.insert(0, "scaled", scaled)
            f.insert(3, "kv_head", kv_head)
            f.insert(4, "is_target", head == target)
            f["max_abs_pattern_diff_qk"] = maxima.diff_qk[head]
            f["max_abs_dev_from_prediction"] = maxima.dev[(scaled, head)]
            f["prediction"] = "softmax(alpha*s)" if maxima.head_is_scaled(scaled, head) else "unchanged"
            f["pattern_changed"] = maxima.moved[(scaled, head)] > CHANGE_TOL
            frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    out["group_size"] = len(group)
    out["method"] = "exact"
    out["bilinear"] = bool(layout.q_bilinear[layer] and layout.k_bilinear[layer])
    out["reason"] = layout.q_reason[layer] or layout.k_reason[layer] or ""
    return out


def sensitivity(comparison: pd.DataFrame) -> pd.DataFrame:
    """One row per group head: slopes of mean entropy (and max attention, k_eff) against ln α
    under query and under key scaling; `sensitivity_ratio` = entropy slope Q / entropy slope K
    (NaN where the K slope is 0); the largest |Δ loss| and KL of each scaling."""
    rows = []
    for (layer, head), g in comparison.groupby(["layer", "head"]):
        row = {"layer": int(layer), "head": int(head), "kv_head": int(g["kv_head"].iloc[0]),
               "is_target": bool(g["is_target"].iloc[0]), "group_size": int(g["group_size"].iloc[0])}
        for scaled, tag in (("query", "q"), ("key", "k")):
            part = g[g["scaled"] == scaled].sort_values("scale")
            alphas = part["scale"].to_numpy()
            for column, name in (("mean_entropy", "entropy"), ("mean_max_attn", "max_attn"),
                                 ("mean_k_eff", "k_eff")):
                if len(alphas) >= 2:
                    fit = fit_log_slopes(alphas, part[column].to_numpy()[None, :]).iloc[0]
                    slope, se, r2 = float(fit["slope"]), float(fit["std_error"]), float(fit["r_squared"])
                else:
                    slope = se = r2 = np.nan
                row[f"{name}_slope_{tag}"] = slope
                if name == "entropy":
                    row[f"entropy_slope_{tag}_std_error"] = se
                    row[f"entropy_slope_{tag}_r_squared"] = r2
            row[f"max_abs_delta_loss_{tag}"] = float(part["delta_loss"].abs().max())
            row[f"max_kl_{tag}"] = float(part["kl_from_unscaled"].max())
            row[f"pattern_changed_{tag}"] = bool(part["pattern_changed"].any())
        k = row["entropy_slope_k"]
        # + 0.0 turns the -0.0 of an unchanged head (slope 0 / negative slope) into 0.0
        row["sensitivity_ratio"] = row["entropy_slope_q"] / k + 0.0 if np.isfinite(k) and abs(k) > 1e-12 else np.nan
        row["max_abs_pattern_diff_qk"] = float(g["max_abs_pattern_diff_qk"].max())
        row["bilinear"] = bool(g["bilinear"].iloc[0])
        row["ratio_is"] = (
            ("check: 1 by bilinearity (q·k scales the same either way)" if row["bilinear"]
             else "measured: logits not bilinear, Q and K scaling may differ")
            if row["is_target"] else
            "measured: another head of the kv group (unchanged by Q scaling of the target)")
        row["reason"] = g["reason"].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def compute(cfg: QKConfig, model, tokens: P.RunTokens, *, progress: bool = False, rd=None) -> QKResult:
    """The EXP3 measurements on a loaded model and tokens (no files written)."""
    alphas = check_alphas(cfg.alphas)
    layout = attention_layout(model)
    with P.timed(rd, "choose_heads_s"):
        choice, _ = C.choose_heads(cfg, model, layout, tokens, control=False, progress=progress)
    layer, head = choice.target
    kv = layout.kv_head(head)
    group = layout.heads_of_kv(kv)
    maxima = PatternMaxima(alphas, layer, head, group)
    with P.timed(rd, "query_and_key_sweeps_s"):
        # the two sweeps run pass by pass in step: one pass's patterns of each are held at a time
        sweeps = intervention_effects(
            model, tokens.measure, alphas,
            {"query": QueryScale.scan(layer, head), "key": KeyScale.scan(layer, kv)}, on_patterns=maxima.update,
            layers=[layer], patterns_for=[(layer, h) for h in group], min_position=cfg.min_position,
            max_rows=cfg.max_rows, progress=progress)
    comparison = compare(sweeps, maxima, kv, layout, ci=cfg.ci)
    return QKResult(target=(layer, head), kv_head=kv, group=group, comparison=comparison,
                    sensitivity=sensitivity(comparison), sweeps=sweeps, choice=choice)


OUTPUTS = O.Outputs(
    "EXP3", "Q vs K control: scaling keys instead of queries", "spectra-lens qk-control",
    (
        O.Table("sensitivity_summary.csv", "sensitivity of each head of the kv group", (),
                ("layer", "head", "kv_head", "is_target", "group_size", "entropy_slope_q",
                 "entropy_slope_k", "sensitivity_ratio", "max_abs_pattern_diff_qk",
                 "pattern_changed_q", "pattern_changed_k", "max_abs_delta_loss_q",
                 "max_abs_delta_loss_k", "max_kl_q", "max_kl_k", "bilinear", "reason"), rows=64),
        O.Table("qk_comparison_results.csv", "query vs key scaling, per α and head", (),
                ("scaled", "scale", "layer", "head", "kv_head", "is_target", "mean_entropy",
                 "delta_entropy", "mean_max_attn", "max_abs_pattern_diff_qk",
                 "max_abs_dev_from_prediction", "pattern_changed", "delta_loss",
                 "kl_from_unscaled"), rows=60),
    ),
)


def tables(result: QKResult) -> dict[str, pd.DataFrame]:
    """The run's tables by file stem."""
    return {"qk_comparison_results": result.comparison, "sensitivity_summary": result.sensitivity}


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """Every EXP3 figure, from the tables alone (`tables(result)` or the run's CSVs)."""
    c = tables.get("qk_comparison_results")
    if c is None or not len(c):
        return {}
    target = c[c["is_target"].astype(bool)]
    l, h = (int(target["layer"].iloc[0]), int(target["head"].iloc[0])) if len(target) else (0, 0)
    kv = int(target["kv_head"].iloc[0]) if len(target) else 0
    name = HeadRef(l, h).file_tag
    return {
        f"qk_entropy_comparison_{name}": figs.qk_metric(
            c, "mean_entropy", title=f"entropy: query vs key scaling (target {HeadRef(l, h)}, kv head {kv})"),
        f"qk_delta_entropy_{name}": figs.qk_metric(
            c, "delta_entropy", title=f"entropy change vs unscaled: query vs key scaling (target {HeadRef(l, h)})"),
        f"qk_max_attn_comparison_{name}": figs.qk_metric(
            c, "mean_max_attn", title=f"max attention: query vs key scaling (target {HeadRef(l, h)})"),
        f"qk_keff_comparison_{name}": figs.qk_metric(
            c, "mean_k_eff", title=f"k_eff = exp(H): query vs key scaling (target {HeadRef(l, h)})"),
        f"qk_output_effects_{name}": figs.qk_output_effects(
            c, title=f"output effects: query vs key scaling (target {HeadRef(l, h)})"),
    }


def run(cfg: QKConfig = QKConfig(), *, model=None, tokens: torch.Tensor | None = None,
        progress: bool = True) -> QKResult:
    """EXP3 into `cfg.out`: qk_comparison_results.csv, sensitivity_summary.csv, figures, manifest."""
    with P.begin_run(cfg, EXPERIMENT, model=model, tokens=tokens, progress=progress) as setup:
        rd = setup.rd
        result = compute(cfg, setup.model, setup.tokens, progress=progress, rd=rd)
        with P.timed(rd, "write_s"):
            t = tables(result)
            files = O.write_outputs(rd, t, figures(t), images=cfg.images, progress=progress)
        rd.finish(
            **P.provenance(setup, result.choice, cfg.seed),
            kv_head=result.kv_head, group=list(result.group),
            interventions={s: sw.intervention for s, sw in result.sweeps.items()},
            alphas=list(result.sweeps["query"].alphas),
            files=files,
            definitions={**C.k_eff_definitions(),
                         "kv group": "query heads h with h // (n_heads // n_kv_heads) == kv_head",
                         "max_abs_pattern_diff_qk": "max over sequences, queries, keys of |p_Q - p_K|",
                         "max_abs_dev_from_prediction": "max |p - prediction|; prediction = softmax(alpha*s) "
                                                        "where the head is scaled, else the unscaled pattern",
                         "sensitivity_ratio": "entropy slope vs ln alpha under Q scaling / under K scaling; "
                                              "for the target of a bilinear layer it is 1 by algebra "
                                              "(a check of the hooks, not a finding)",
                         "ratio_is": "whether sensitivity_ratio is a check (fixed by bilinearity) or a measurement",
                         "pattern_changed": f"some pattern entry moved by more than {CHANGE_TOL:g}"},
        )
    return dataclasses.replace(result, out=rd.path)




def command(cfg: QKConfig, *, progress: bool = True) -> int:
    """`spectra-lens qk-control`: run `cfg`, print a summary; SpectraError for bad input."""
    t0 = time.perf_counter()
    result = run(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    l, h = result.target
    s = result.sensitivity
    t = s[s["is_target"]].iloc[0]
    print(f"target {HeadRef(l, h)}, kv head {result.kv_head}, group {list(result.group)}: entropy slope "
          f"Q {t['entropy_slope_q']:+.3f}, K {t['entropy_slope_k']:+.3f} (ratio {t['sensitivity_ratio']:.3f}: "
          f"{t['ratio_is']}); "
          f"max |p_Q - p_K| on the target {t['max_abs_pattern_diff_qk']:.1e}")
    others = s[~s["is_target"]]
    if len(others):
        print(f"other heads of the group: changed under K {int(others['pattern_changed_k'].sum())}/{len(others)}, "
              f"under Q {int(others['pattern_changed_q'].sum())}/{len(others)}")
    print(f"max |Δloss|: Q {t['max_abs_delta_loss_q']:.4f}, K {t['max_abs_delta_loss_k']:.4f}; "
          f"max KL: Q {t['max_kl_q']:.4f}, K {t['max_kl_k']:.4f}")
    print(f"wrote {result.out} in {seconds:.0f} s")
    return 0

