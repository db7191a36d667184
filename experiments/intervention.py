"""EXP1, intervention: scale one head's effective query by α on the real forward pass.

    python -m experiments.intervention [--target-layer L --target-head H]
        [--control-layer L --control-head H] [--alphas 0.25 0.5 1 2 4] [--n-sequences 8]
        [--seq-len 128] [--model M] [--corpus C] [--out DIR] [--overwrite]
    spectra-lens intervene ...

For a target head and a control head (defaults: see experiments/_common.py — the middle layer's
head with the most negative analytic gain −Var_p(s), and the head of the same layer whose gain
is nearest 0, both chosen on held-out sequences), each α of the grid is applied with
`hooks.QueryScale` in real forward passes (α batched). Measured per α, with t-intervals over
sequences: the head's mean entropy, max attention, k_eff (exp(H); also participation ratio and
top-90% count), the paired entropy change, the next-token loss change and KL(p_α ‖ p_1) of the
output; and the entropy change of every head in the same and later layers.

Outputs (in --out): `q_scale_intervention_L{l}_H{h}_{target|control}.csv` (one row per α),
`downstream_heads_L{l}_H{h}_{target|control}.csv` (one row per α × later head), figures under
`figures/` (entropy / max attention / k_eff vs α per head, a three-panel figure per head, output
effects, later-head heatmaps; HTML, and PNG where kaleido works) and `manifest.json`.
"""

import dataclasses
import logging
import re
import sys
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from spectra_lens import figures as figs
from spectra_lens.config import InterventionConfig
from spectra_lens.hooks import QueryScale
from spectra_lens.layout import attention_layout
from spectra_lens.metrics import alpha_metrics
from spectra_lens.sweep import ExactSweep, intervention_effects

from . import _common as C

__all__ = ["InterventionResult", "compute", "command", "main", "run"]

log = logging.getLogger(__name__)
EXPERIMENT = "intervention"
ROLES = ("target", "control")


@dataclass(frozen=True, repr=False)
class InterventionResult:
    """Per-head tables of one EXP1 run, keyed by role ("target", "control")."""

    heads: dict  # role -> (layer, head)
    tables: dict  # role -> DataFrame, one row per α (the q_scale_intervention CSV)
    downstream: dict  # role -> DataFrame, one row per α × measured head (layers >= the head's)
    sweeps: dict  # role -> ExactSweep (tensors per sequence)
    choice: C.HeadChoice
    out: Path | None = None

    def csv_name(self, role: str) -> str:
        l, h = self.heads[role]
        return f"q_scale_intervention_L{l}_H{h}_{role}.csv"

    def __repr__(self) -> str:
        parts = ", ".join(f"{r}=L{l}H{h}" for r, (l, h) in self.heads.items())
        return f"InterventionResult({parts}, alphas={len(next(iter(self.tables.values())))}, out={self.out})"

    def _repr_html_(self) -> str:
        cols = ["scale", "mean_entropy", "mean_max_attn", "mean_k_eff", "delta_loss",
                "kl_from_unscaled", "method"]
        parts = [f"<b>{escape(repr(self))}</b>"]
        for role, table in self.tables.items():
            l, h = self.heads[role]
            shown = table[[c for c in cols if c in table.columns]]
            parts.append(f"<p>{role}: L{l} H{h}</p>" + shown.to_html(index=False, float_format="%.4g"))
        return "".join(parts)


def head_table(sweep: ExactSweep, layer: int, head: int, role: str, layout, *, ci: float) -> pd.DataFrame:
    """The q_scale_intervention table: `ExactSweep.head_frame` plus role, method and the fast
    path's prediction softmax(α·s) from the unscaled pattern (`mean_entropy_fast`, ...)."""
    frame = sweep.head_frame(layer, head, ci=ci)
    frame.insert(3, "head_type", role)
    pattern = sweep.base_patterns[(layer, head)][:, sweep.min_position:]
    predicted = alpha_metrics(torch.log(pattern), pattern > 0, sweep.alphas)
    frame["mean_entropy_fast"] = predicted["entropy"].double().mean(1).numpy()
    frame["mean_max_attn_fast"] = predicted["max_attn"].double().mean(1).numpy()
    frame["mean_k_eff_fast"] = predicted["k_eff_exp"].double().mean(1).numpy()
    frame["analytic_gain"] = float(sweep.local_gain[:, sweep.scaled.index(layer), head].double().mean())
    frame["method"] = "exact"
    frame["fast_path_valid"] = bool(layout.q_bilinear[layer])
    frame["reason"] = layout.q_reason[layer] or ""
    return frame


def compute(cfg: InterventionConfig, model, tokens: C.RunTokens, *, progress: bool = False,
            rd=None) -> InterventionResult:
    """The EXP1 measurements on a loaded model and tokens (no files written)."""
    alphas = C.checked_alphas(cfg)
    layout = attention_layout(model)
    with C.timed(rd, "choose_heads_s"):
        choice = C.choose_heads(cfg, model, layout, tokens.select, control=True)
    heads = {"target": choice.target, "control": choice.control}
    tables, downstream, sweeps = {}, {}, {}
    for role in ROLES:
        l, h = heads[role]
        with C.timed(rd, f"{role}_sweep_s"):
            sweep = intervention_effects(
                model, tokens.measure, alphas, QueryScale(l, h, 1.0),
                layers=range(l, layout.n_layers), patterns_for=[(l, h)],
                min_position=cfg.min_position, max_rows=cfg.max_rows, progress=progress,
            )
        sweeps[role] = sweep
        tables[role] = head_table(sweep, l, h, role, layout, ci=cfg.ci)
        d = sweep.downstream_frame(ci=cfg.ci, min_layer=l)
        d.insert(0, "head_type", role)
        d.insert(1, "scaled_layer", l)
        d.insert(2, "scaled_head", h)
        d["is_scaled_head"] = (d["layer"] == l) & (d["head"] == h)
        downstream[role] = d
    return InterventionResult(heads=heads, tables=tables, downstream=downstream, sweeps=sweeps,
                              choice=choice)


OUTPUTS = C.Outputs(
    "EXP1", "intervention: scaling one head's queries in the forward pass", "spectra-lens intervene",
    (
        C.Table("q_scale_intervention_L*_H*_*.csv", "query scaling", (),
                ("scale", "layer", "head", "head_type", "mean_entropy", "mean_entropy_ci_low",
                 "mean_entropy_ci_high", "mean_entropy_fast", "mean_max_attn", "mean_k_eff",
                 "delta_entropy", "delta_loss", "kl_from_unscaled", "analytic_gain", "method",
                 "n_sequences"), rows=40),
        C.Table("downstream_heads_L*_H*_*.csv", "heads of later layers, largest entropy change",
                ("delta_entropy",),
                ("head_type", "scaled_layer", "scaled_head", "scale", "layer", "head",
                 "is_scaled_head", "entropy", "delta_entropy", "delta_entropy_ci_low",
                 "delta_entropy_ci_high", "delta_max_attn"), rows=12),
    ),
)

_ROLE_FILE = re.compile(r"(?P<kind>q_scale_intervention|downstream_heads)_L(?P<l>\d+)_H(?P<h>\d+)_(?P<role>\w+)")


def tables(result: InterventionResult) -> dict[str, pd.DataFrame]:
    """The run's tables by file stem: one per role for the head, one for the later heads."""
    out = {}
    for role in ROLES:
        l, h = result.heads[role]
        out[result.csv_name(role).removesuffix(".csv")] = result.tables[role]
        out[f"downstream_heads_L{l}_H{h}_{role}"] = result.downstream[role]
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
        frames = {f"{role} L{l} H{h}": frame}
        name = f"L{l}_H{h}"
        for column, stem, pred in (("mean_entropy", "entropy_vs_scale", "mean_entropy_fast"),
                                   ("mean_max_attn", "max_attn_vs_scale", "mean_max_attn_fast"),
                                   ("mean_k_eff", "keff_vs_scale", "mean_k_eff_fast")):
            out[f"{stem}_{name}"] = figs.metric_vs_scale(
                frames, column, prediction=pred if pred in frame.columns else None,
                title=f"{column} of L{l} H{h} ({role}) under query scaling")
        out[f"intervention_combined_{name}"] = figs.intervention_panels(
            frames, title=f"L{l} H{h} ({role}): query scaling")
    for (role, l, h), d in later.items():
        alphas = sorted(d["scale"].unique())
        show = [a for a in (alphas[0], alphas[-1]) if a != 1.0] or alphas[:1]
        out[f"later_heads_delta_entropy_L{l}_H{h}_{role}"] = figs.later_heads_heatmap(
            d, show, title=f"entropy change of heads in layers ≥ {l} when L{l} H{h} ({role}) is scaled")
    if heads:
        both = {f"{role} L{l} H{h}": f for (role, l, h), f in
                sorted(heads.items(), key=lambda kv: ROLES.index(kv[0][0]) if kv[0][0] in ROLES else 9)}
        out["intervention_combined_target_vs_control"] = figs.intervention_panels(
            both, title="target vs control under query scaling")
        out["intervention_output_effects"] = figs.output_effects(both, title="output effects of query scaling")
    return out


def run(cfg: InterventionConfig = InterventionConfig(), *, model=None, tokens: torch.Tensor | None = None,
        progress: bool = True) -> InterventionResult:
    """EXP1 into `cfg.out`: CSVs, figures and manifest.json. `model` (a loaded bridge) and
    `tokens` ([batch, pos]; then default heads are chosen on them too) skip loading."""
    with C.begin_run(cfg, EXPERIMENT, model=model, tokens=tokens, progress=progress) as setup:
        rd = setup.rd
        result = compute(cfg, setup.model, setup.tokens, progress=progress, rd=rd)
        with C.timed(rd, "write_s"):
            t = tables(result)
            files = C.write_outputs(rd, t, figures(t), images=cfg.images)
        rd.finish(
            **C.provenance(setup, result.choice, cfg.seed),
            alphas=list(result.sweeps["target"].alphas), files=files,
            definitions={**C.k_eff_definitions(),
                         "intervals": f"t-interval ({cfg.ci:g}) over per-sequence means",
                         "delta_loss": "mean next-token NLL at α minus unscaled, per sequence",
                         "kl_from_unscaled": "mean over positions of KL(p_α || p_1) of the next-token distribution",
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
        print(f"{role:7s} L{l} H{h}: entropy {lo['mean_entropy']:.3f} (α={lo['scale']:g}) -> "
              f"{hi['mean_entropy']:.3f} (α={hi['scale']:g}); max attn {lo['mean_max_attn']:.3f} -> "
              f"{hi['mean_max_attn']:.3f}; Δloss at α={hi['scale']:g}: {hi['delta_loss']:+.4f}, "
              f"KL {hi['kl_from_unscaled']:.4f}; fast-path max |ΔH| "
              f"{np.nanmax(np.abs(t['mean_entropy'] - t['mean_entropy_fast'])):.1e}")
    print(f"wrote {result.out} in {seconds:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.intervention`: the same as `spectra-lens intervene`."""
    from spectra_lens.cli import main as cli_main

    return cli_main(["intervene", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
