"""EXP1, intervention: scale one head's effective query by α on the real forward pass.

    spectra-lens intervene [--target-layer L --target-head H]
        [--control-layer L --control-head H] [--alphas 0.25 0.5 1 2 4] [--n-sequences 8]
        [--seq-len 128] [--model M] [--corpus C] [--out DIR] [--overwrite]

For a target head and a control head (defaults: see experiments/_common.py — the middle layer's
head with the most negative analytic gain −Var_p(s), and the head whose observational
r(log ‖q‖, entropy) is nearest 0 with a tight document-jackknife interval, both chosen on held-out
documents disjoint from the measured ones), each
α of the grid is applied with `interventions.QueryScale` in real forward passes (α batched). Measured per
α, with document-bootstrap intervals: the head's mean entropy, max attention, k_eff (exp(H); also
participation ratio and top-90% count) as the identity check they are, and the outcomes: the
next-token loss change, KL(p_1 ‖ p_α) of the output distribution and the entropy change of every
head in the same and later layers.

Memory: every table column is a per-sequence metric of a forward pass. The only one that reads
an attention pattern, the fast path's prediction softmax(α·s) (`*_fast`), is computed from each
block's unscaled pattern of the head as the sweep runs (`FastPrediction`), so a sweep holds the
head's patterns of one forward pass (`--max-rows` sequence copies) and of the current block's
unscaled pass, never `[α, batch, T, T]`.

Outputs (in --out): `q_scale_intervention_L{l}_H{h}_{target|control}.csv` (one row per α),
`downstream_heads_L{l}_H{h}_{target|control}.csv` (one row per α × later head), figures under
`figures/` (entropy / max attention / k_eff vs α per head, a three-panel figure per head, output
effects, later-head heatmaps; HTML, and PNG where kaleido works) and `manifest.json`.
"""

import dataclasses
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from spectra_lens.causal import (
    CONTROL_RULE,
    EFFECT_DEFINITIONS,
    ROTATION_RULE,
    effect_row,
    query_direction_spread,
    sham_check,
    sweep_effects,
)
from spectra_lens.config import InterventionConfig
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import QueryRotate, QueryScale
from spectra_lens.kernels.alpha import alpha_metrics
from spectra_lens.layout import attention_layout
from spectra_lens.metrics import SWEEP_METRICS
from spectra_lens.present import display
from spectra_lens.present import figures as figs
from spectra_lens.runs import outputs as O
from spectra_lens.runs import pipeline as P
from spectra_lens.sweep import ExactSweep, intervention_effects
from spectra_lens.validate import HeadRef, check_alphas

from . import _common as C

__all__ = ["FastPrediction", "InterventionResult", "compute", "command", "run"]

log = logging.getLogger(__name__)
EXPERIMENT = "intervention"
ROLES = ("target", "control")


@dataclass(frozen=True, repr=False)
class InterventionResult:
    """Per-head tables of one EXP1 run, keyed by role ("target", "control")."""

    heads: dict  # role -> (layer, head)
    tables: dict  # role -> DataFrame, one row per α (the q_scale_intervention CSV)
    downstream: dict  # role -> DataFrame, one row per α × measured head (layers >= the head's)
    sweeps: dict  # role -> ExactSweep (tensors per sequence, no patterns); also "rotation"
    choice: C.HeadChoice
    effects: pd.DataFrame | None = None  # intervention_effects.csv: one row per condition × grid value
    control_selection: pd.DataFrame | None = None  # control_selection.csv: the rule's top candidates
    controls: dict | None = None  # sham summary, direction spread, rotation angles (manifest)
    out: Path | None = None

    def csv_name(self, role: str) -> str:
        l, h = self.heads[role]
        return f"q_scale_intervention_{HeadRef(l, h).file_tag}_{role}.csv"

    def __repr__(self) -> str:
        parts = ", ".join(f"{r}={HeadRef(l, h)}" for r, (l, h) in self.heads.items())
        return f"InterventionResult({parts}, alphas={len(next(iter(self.tables.values())))}, out={self.out})"

    def _repr_html_(self) -> str:
        cols = ["scale", "mean_entropy", "mean_max_attn", "mean_k_eff", "delta_loss",
                "kl_from_unscaled", "method"]
        parts = [f"<b>{escape(repr(self))}</b>"]
        for role, table in self.tables.items():
            l, h = self.heads[role]
            shown = table[[c for c in cols if c in table.columns]]
            parts.append(f"<p>{role}: {HeadRef(l, h)}</p>" + shown.to_html(index=False, float_format="%.4g"))
        return "".join(parts)


OWN_CURVE = "identity check: softmax(alpha*s) of the unscaled scores, not a finding"


class FastPrediction:
    """The fast path's prediction for one head, softmax(α·s) of its unscaled pattern, computed
    block by block while the sweep runs: `update` is the `on_patterns` of
    `sweep.intervention_effects`, and reads the unscaled pattern of the head from the
    first pass of each block of sequences, so the sweep keeps no patterns.

    Per block: `kernels.alpha.alpha_metrics(log p, p > 0, alphas)` over the query rows ≥
    `min_position`, one value per α and sequence. Each sequence's rows are reduced on their own,
    so `metrics` (the blocks joined in sequence order) equals the same call on every unscaled
    pattern at once.
    """

    def __init__(self, name: str, alphas, layer: int, head: int, *, min_position: int):
        self.name, self.alphas, self.key = name, tuple(alphas), (int(layer), int(head))
        self.min_position = min_position
        self._blocks: dict[int, dict[str, torch.Tensor]] = {}  # block start -> {metric: [α, b]}

    def update(self, passes: dict) -> None:
        """Fold in one forward pass: `{name: sweep.PassPatterns}`. Every pass of a block carries
        the same unscaled patterns; the first one is used."""
        got = passes[self.name]
        if got.start not in self._blocks:
            pattern = got.base[self.key][:, self.min_position:]
            self._blocks[got.start] = alpha_metrics(torch.log(pattern), pattern > 0, self.alphas)

    def metrics(self, sweep: ExactSweep) -> dict[str, torch.Tensor]:
        """{metric: [α, batch]} for the sequences of `sweep` (SpectraError when this prediction
        was fed a different grid or other sequences than the sweep ran)."""
        n = sweep.loss.shape[1]
        starts = sorted(self._blocks)
        seen = sum(self._blocks[s]["entropy"].shape[1] for s in starts)
        if tuple(sweep.alphas) != self.alphas or seen != n or sweep.min_position != self.min_position:
            raise SpectraError(
                f"the fast-path prediction of {HeadRef(self.key[0], self.key[1])} covers {seen} sequences at "
                f"{list(self.alphas)} (min_position {self.min_position}); the sweep ran {n} at "
                f"{list(sweep.alphas)} (min_position {sweep.min_position})")
        return {m: torch.cat([self._blocks[s][m] for s in starts], dim=1) for m in SWEEP_METRICS}


def head_table(sweep: ExactSweep, layer: int, head: int, role: str, layout, prediction: FastPrediction,
               *, ci: float, documents=None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The q_scale_intervention table: `ExactSweep.head_frame` (document-bootstrap intervals)
    plus role, method and the fast path's prediction softmax(α·s) from the unscaled pattern
    (`mean_entropy_fast`, ...: `prediction`, fed by the same sweep). The head's own curve is an
    identity check (`own_curve`)."""
    frame = sweep.head_frame(layer, head, ci=ci, documents=documents, n_boot=n_boot, seed=seed)
    frame.insert(3, "head_type", role)
    predicted = prediction.metrics(sweep)
    frame["mean_entropy_fast"] = predicted["entropy"].double().mean(1).numpy()
    frame["mean_max_attn_fast"] = predicted["max_attn"].double().mean(1).numpy()
    frame["mean_k_eff_fast"] = predicted["k_eff_exp"].double().mean(1).numpy()
    frame["analytic_gain"] = float(sweep.local_gain[:, sweep.scaled.index(layer), head].double().mean())
    frame["method"] = "exact"
    frame["fast_path_valid"] = bool(layout.q_bilinear[layer])
    frame["reason"] = layout.q_reason[layer] or ""
    frame["own_curve"] = OWN_CURVE if layout.q_bilinear[layer] else \
        "the head's own response to its query scale (not softmax(alpha*s): logits not bilinear)"
    return frame


def _rows(effects_list, documents, cfg, **fixed) -> list[dict]:
    values = fixed.pop("values")
    extra = fixed.pop("extra", [{}] * len(values))
    return [{**fixed, "value": v, **x, **effect_row(e, documents, ci=cfg.ci, n_boot=cfg.n_boot, seed=cfg.seed)}
            for v, x, e in zip(values, extra, effects_list)]


def compute(cfg: InterventionConfig, model, tokens: P.RunTokens, *, progress: bool = False,
            rd=None) -> InterventionResult:
    """The EXP1 measurements on a loaded model and tokens (no files written).

    Target and control: `_common.choose_heads` (control: `causal.CONTROL_RULE` unless given). Outcomes per
    condition (target scaling, control scaling, sham, rotation of the target's query):
    `causal.effect_row` with document-bootstrap intervals.
    """
    alphas = check_alphas(cfg.alphas)
    layout = attention_layout(model)
    docs = tokens.measure_documents
    with P.timed(rd, "choose_heads_s"):
        choice, r_table = C.choose_heads(cfg, model, layout, tokens, control=True, progress=progress)
    heads = {"target": choice.target, "control": choice.control}
    tables, downstream, sweeps, rows = {}, {}, {}, []
    for role in ROLES:
        l, h = heads[role]
        prediction = FastPrediction(role, alphas, l, h, min_position=cfg.min_position)
        with P.timed(rd, f"{role}_sweep_s"):
            # the head's patterns reach `prediction` one forward pass at a time and are not kept
            sweep = intervention_effects(
                model, tokens.measure, alphas, {role: QueryScale.scan(l, h)}, on_patterns=prediction.update,
                layers=range(l, layout.n_layers), patterns_for=[(l, h)],
                min_position=cfg.min_position, max_rows=cfg.max_rows, progress=progress,
            )[role]
        sweeps[role] = sweep
        tables[role] = head_table(sweep, l, h, role, layout, prediction, ci=cfg.ci, documents=docs,
                                  n_boot=cfg.n_boot, seed=cfg.seed)
        d = sweep.downstream_frame(ci=cfg.ci, min_layer=l, documents=docs, n_boot=cfg.n_boot, seed=cfg.seed)
        d.insert(0, "head_type", role)
        d.insert(1, "scaled_layer", l)
        d.insert(2, "scaled_head", h)
        d["is_scaled_head"] = (d["layer"] == l) & (d["head"] == h)
        downstream[role] = d
        rows += _rows(sweep_effects(sweep, l, h), docs, cfg, condition=f"{role}_scale",
                      intervention="QueryScale", layer=l, head=h, grid="alpha", values=sweep.alphas,
                      own_effect="identity check" if layout.q_bilinear[l] else "outcome (not bilinear)")
    l, h = choice.target
    with display.stages("controls", ["sham (hook at α=1)", "direction spread of the query"],
                        enabled=progress) as step:
        step("sham (hook at α=1)")
        with P.timed(rd, "sham_s"):
            sham, sham_effects = sham_check(model, tokens.measure, l, h,
                                            min_position=cfg.min_position, batch_size=cfg.max_rows)
        step("direction spread of the query")
        with P.timed(rd, "rotation_s"):  # the rotation's angles, then (below) its sweep
            spread = query_direction_spread(model, tokens.select, l, h,
                                            min_position=cfg.min_position, batch_size=cfg.max_rows)
    rows += _rows([sham_effects], docs, cfg, condition="sham", intervention="QueryScale at alpha=1 (hook attached)",
                  layer=l, head=h, grid="alpha", values=[1.0], own_effect="outcome (must be 0)",
                  extra=[{"bitwise_equal": sham["bitwise_equal"]}])
    with P.timed(rd, "rotation_s"):
        multiples = {min(m * spread.median_angle, math.pi): m for m in sorted(cfg.rotation_multiples)}
        angles = tuple(sorted(multiples))
        rotation = intervention_effects(model, tokens.measure, angles, QueryRotate.scan(l, h, seed=cfg.seed),
                               layers=range(l, layout.n_layers), min_position=cfg.min_position,
                               max_rows=cfg.max_rows, progress=progress)
    sweeps["rotation"] = rotation
    rows += _rows(sweep_effects(rotation, l, h), docs, cfg, condition="rotation",
                  intervention="QueryRotate (norm kept)", layer=l, head=h, grid="angle_rad",
                  values=angles, own_effect="outcome",
                  extra=[{"angle_multiple": multiples[a]} for a in angles])
    effects = pd.DataFrame(rows)
    controls = {"sham": sham, "direction_spread": spread.as_dict(), "rotation_angles_rad": list(angles),
                "rotation_multiples": [multiples[a] for a in angles], "rotation_seed": cfg.seed,
                "control_rule": CONTROL_RULE,
                "control_chosen_by": "rule" if "control_head" in choice.chosen else "given",
                "control_r": choice.control_r,
                "control_candidates": json.loads(r_table[[
                    "rank", "layer", "head", "r_log_q_entropy", "r_ci_low", "r_ci_high", "p_doc",
                    "control_score", "eligible", "chosen"]].to_json(orient="records"))}
    return InterventionResult(heads=heads, tables=tables, downstream=downstream, sweeps=sweeps,
                              choice=choice, effects=effects, control_selection=r_table,
                              controls=controls)


OUTPUTS = O.Outputs(
    "EXP1", "intervention: scaling one head's queries in the forward pass", "spectra-lens intervene",
    (
        O.Table("q_scale_intervention_L*_H*_*.csv", "query scaling", (),
                ("scale", "layer", "head", "head_type", "mean_entropy", "mean_entropy_ci_low",
                 "mean_entropy_ci_high", "mean_entropy_fast", "mean_max_attn", "mean_k_eff",
                 "delta_entropy", "delta_loss", "kl_from_unscaled", "analytic_gain", "method",
                 "n_sequences"), rows=40),
        O.Table("downstream_heads_L*_H*_*.csv", "heads of later layers, largest entropy change",
                ("delta_entropy",),
                ("head_type", "scaled_layer", "scaled_head", "scale", "layer", "head",
                 "is_scaled_head", "entropy", "delta_entropy", "delta_entropy_ci_low",
                 "delta_entropy_ci_high", "delta_max_attn"), rows=12),
        O.Table("intervention_effects.csv", "outcomes that can come out either way (document intervals)",
                (), ("condition", "layer", "head", "grid", "value", "delta_loss", "delta_loss_ci_low",
                     "delta_loss_ci_high", "kl_unscaled_scaled", "kl_unscaled_scaled_ci_low",
                     "kl_unscaled_scaled_ci_high", "later_mean_abs_delta_entropy",
                     "later_heads_changed", "own_delta_entropy", "own_effect", "n_documents"), rows=30),
        O.Table("control_selection.csv", "control head choice: the rule's top candidates on held-out documents",
                (), ("rank", "layer", "head", "role", "chosen", "r_log_q_entropy", "r_ci_low", "r_ci_high",
                     "p_doc", "control_score", "eligible"), rows=12),
    ),
)

_ROLE_FILE = re.compile(r"(?P<kind>q_scale_intervention|downstream_heads)_L(?P<l>\d+)_H(?P<h>\d+)_(?P<role>\w+)")


def tables(result: InterventionResult) -> dict[str, pd.DataFrame]:
    """The run's tables by file stem: one per role for the head, one for the later heads."""
    out = {}
    for role in ROLES:
        l, h = result.heads[role]
        out[result.csv_name(role).removesuffix(".csv")] = result.tables[role]
        out[f"downstream_heads_{HeadRef(l, h).file_tag}_{role}"] = result.downstream[role]
    if result.effects is not None:
        out["intervention_effects"] = result.effects
    if result.control_selection is not None:
        out["control_selection"] = result.control_selection
    return out


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """Every EXP1 figure, from the tables alone (`tables(result)` or the run's CSVs)."""
    out: dict[str, go.Figure] = {}
    heads, later = {}, {}
    for stem, frame in tables.items():
        m = _ROLE_FILE.fullmatch(stem)
        if m:
            key = (m["role"], int(m["l"]), int(m["h"]))
            (heads if m["kind"] == "q_scale_intervention" else later)[key] = frame
    for (role, l, h), frame in heads.items():
        frames = {f"{role} {HeadRef(l, h)}": frame}
        name = HeadRef(l, h).file_tag
        for column, stem, pred in (("mean_entropy", "entropy_vs_scale", "mean_entropy_fast"),
                                   ("mean_max_attn", "max_attn_vs_scale", "mean_max_attn_fast"),
                                   ("mean_k_eff", "keff_vs_scale", "mean_k_eff_fast")):
            out[f"{stem}_{name}"] = figs.metric_vs_scale(
                frames, column, prediction=pred if pred in frame.columns else None,
                title=f"{column} of {HeadRef(l, h)} ({role}) under query scaling")
        out[f"intervention_combined_{name}"] = figs.intervention_panels(
            frames, title=f"{HeadRef(l, h)} ({role}): query scaling")
    for (role, l, h), d in later.items():
        alphas = sorted(d["scale"].unique())
        show = [a for a in (alphas[0], alphas[-1]) if a != 1.0] or alphas[:1]
        out[f"later_heads_delta_entropy_{HeadRef(l, h).file_tag}_{role}"] = figs.later_heads_heatmap(
            d, show, title=f"entropy change of heads in layers ≥ {l} when {HeadRef(l, h)} ({role}) is scaled")
    if heads:
        both = {f"{role} {HeadRef(l, h)}": f for (role, l, h), f in
                sorted(heads.items(), key=lambda kv: ROLES.index(kv[0][0]) if kv[0][0] in ROLES else 9)}
        out["intervention_combined_target_vs_control"] = figs.intervention_panels(
            both, title="target vs control under query scaling")
        out["intervention_output_effects"] = figs.output_effects(both, title="output effects of query scaling")
    if "intervention_effects" in tables:
        out["intervention_effects"] = figs.effects_panels(
            tables["intervention_effects"], title="outcomes that can come out either way: target vs "
                                                   "control scaling, rotation of the target's query, sham")
    return out


def run(cfg: InterventionConfig = InterventionConfig(), *, model=None, tokens: torch.Tensor | None = None,
        progress: bool = True) -> InterventionResult:
    """EXP1 into `cfg.out`: CSVs, figures and manifest.json. `model` (a loaded bridge) and
    `tokens` ([batch, pos]; then default heads are chosen on them too) skip loading."""
    with P.begin_run(cfg, EXPERIMENT, model=model, tokens=tokens, progress=progress) as setup:
        rd = setup.rd
        result = compute(cfg, setup.model, setup.tokens, progress=progress, rd=rd)
        with P.timed(rd, "write_s"):
            t = tables(result)
            files = O.write_outputs(rd, t, figures(t), images=cfg.images, progress=progress)
        rd.finish(
            **P.provenance(setup, result.choice, cfg.seed),
            alphas=list(result.sweeps["target"].alphas), files=files, controls=result.controls,
            rotation_rule=ROTATION_RULE,
            definitions={**C.k_eff_definitions(),
                         **EFFECT_DEFINITIONS,
                         "intervals": f"{cfg.ci:g} percentile bootstrap over documents ({cfg.n_boot} "
                                      f"resamples) of the mean over sequences",
                         "delta_loss": "mean next-token NLL at α minus unscaled, per sequence",
                         "kl_from_unscaled": "mean over positions of KL(p_1 || p_α) of the next-token "
                                             "distribution (unscaled || scaled)",
                         "own_curve": OWN_CURVE,
                         "method": "exact: real forward passes with QueryScale; *_fast: softmax(α·s) prediction"},
        )
    return dataclasses.replace(result, out=rd.path)




def command(cfg: InterventionConfig, *, progress: bool = True) -> int:
    """`spectra-lens intervene`: run `cfg`, print a summary; SpectraError for bad input."""
    t0 = time.perf_counter()
    result = run(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    for role in ROLES:
        l, h = result.heads[role]
        t = result.tables[role].sort_values("scale")
        lo, hi = t.iloc[0], t.iloc[-1]
        print(f"{role:7s} {HeadRef(l, h)}: entropy {lo['mean_entropy']:.3f} (α={lo['scale']:g}) -> "
              f"{hi['mean_entropy']:.3f} (α={hi['scale']:g}); max attn {lo['mean_max_attn']:.3f} -> "
              f"{hi['mean_max_attn']:.3f}; Δloss at α={hi['scale']:g}: {hi['delta_loss']:+.4f}, "
              f"KL {hi['kl_from_unscaled']:.4f}; fast-path max |ΔH| "
              f"{np.nanmax(np.abs(t['mean_entropy'] - t['mean_entropy_fast'])):.1e}")
    e = result.effects
    for cond in ("target_scale", "control_scale", "rotation"):
        part = e[e["condition"] == cond]
        row = part.loc[part["value"].idxmax()]
        grid = f"α={row['value']:g}" if row["grid"] == "alpha" else f"angle={np.degrees(row['value']):.0f}°"
        print(f"{cond:13s} {HeadRef(row['layer'], row['head'])} at {grid}: Δloss {row['delta_loss']:+.4f} "
              f"[{row['delta_loss_ci_low']:+.4f}, {row['delta_loss_ci_high']:+.4f}], KL "
              f"{row['kl_unscaled_scaled']:.4f} [{row['kl_unscaled_scaled_ci_low']:.4f}, "
              f"{row['kl_unscaled_scaled_ci_high']:.4f}], later heads |ΔH| "
              f"{row['later_mean_abs_delta_entropy']:.4f} ({row['later_heads_changed']}/"
              f"{row['n_later_heads']} changed), {row['n_documents']} documents")
    sham = result.controls["sham"]
    print(f"sham (hook at α=1): bit-identical {sham['bitwise_equal']}, max |Δlogit| {sham['max_abs_logit_diff']:g}")
    print("the scaled head's own entropy curve is an identity check (softmax(α·s)), not a finding")
    print(f"wrote {result.out} in {seconds:.0f} s")
    return 0

