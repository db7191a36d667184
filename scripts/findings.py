"""Regenerate docs/FINDINGS.md: every number the README quotes, each beside the command that
produced it, read from the runs themselves.

    python scripts/findings.py            # run what is missing, then write docs/FINDINGS.md
    python scripts/findings.py --no-run   # only read the runs that exist (missing ones listed)

Each step is one `spectra-lens` command with a fixed `--out` under `results/findings/`
(`FINDINGS_RESULTS` overrides the root). A step whose run directory is complete (its
manifest says "complete") is read, not rerun, so the file can be regenerated in seconds; delete
a run directory (or pass `--rerun NAME`) to recompute it. Numbers are written with the
formatting the README uses, so `tests/test_findings.py` can check that every number in the
README's findings section appears here.
"""

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from spectra_lens.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("FINDINGS_RESULTS", ROOT / "results" / "findings"))
OUT = ROOT / "docs" / "FINDINGS.md"


def num(x: float, digits: int = 2, sign: bool = False) -> str:
    """A number as the README writes it: fixed digits, a real minus sign (U+2212)."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    s = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return s.replace("-", "−")


def interval(lo: float, hi: float, digits: int = 2, sign: bool = False) -> str:
    return f"[{num(lo, digits, sign)}, {num(hi, digits, sign)}]"


def pct(x: float, digits: int = 1) -> str:
    return f"{num(100 * x, digits)}%"


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


# --------------------------------------------------------------------------- per-step summaries


def observe_lines(run: Path) -> list[str]:
    m = _manifest(run)
    a = pd.read_csv(run / "agreement.csv")
    s = pd.read_csv(run / "head_summary.csv")
    summ = pd.read_csv(run / "agreement_summary.csv")
    allrow = summ[summ["layer"].astype(str) == "all"].iloc[0]
    counts = a["verdict"].value_counts()
    direction = a.loc[a["verdict"] == "differs", "direction"].value_counts()
    out = [
        f"- model {m['model']['spec']} ({m['model']['n_layers']} layers × {m['model']['n_heads']} "
        f"query heads, {m['model']['n_kv_heads']} kv heads); corpus: {m['corpus']}",
        f"- {m['n_sequences']} sequences × {m['seq_len']} tokens from {m['n_documents']} documents "
        f"(largest document share {pct(m['max_document_share'])}); "
        f"{m['n_tokens_per_head']} tokens per head; run time {m['timings']['total_s']:.0f} s",
        f"- heads: {len(a)}; equivalence margin ±{pct(m['equivalence_margin'], 0)} of the gain",
    ]
    for v in ("equivalent to a temperature", "differs", "undetermined"):
        out.append(f"- verdict '{v}': {int(counts.get(v, 0))} heads")
    for d in ("weaker", "stronger", "opposite sign"):
        out.append(f"- 'differs', direction '{d}': {int(direction.get(d, 0))} heads")
    gain = a["gain_analytic"]
    out += [
        f"- analytic gain −Var_p(s) negative in {int((gain < 0).sum())}/{len(a)} heads; "
        f"median {num(gain.median())} nats per unit ln α",
        f"- observational slope given log position: median {num(a['obs_slope'].median())}; "
        f"interval below 0 in {int((a['obs_slope_ci_high'] < 0).sum())} heads, above 0 in "
        f"{int((a['obs_slope_ci_low'] > 0).sum())}",
        f"- median ratio slope / gain {num(allrow['median_ratio'])}; Spearman(slope, gain) across "
        f"heads {num(allrow['spearman_obs_slope_gain'], sign=True)} "
        f"(p = {num(allrow['p_spearman_heads_independent'])})",
        f"- temperature_share (linear approximation): median "
        f"{pct(allrow['median_temperature_share'])}",
    ]
    if "norm_share" in a:
        ns = a["norm_share"]
        out.append(f"- norm_share (exact counterfactual): median {pct(ns.median())}, 10–90% "
                   f"{pct(ns.quantile(0.1))}–{pct(ns.quantile(0.9))}; interval above 0 in "
                   f"{int((a['norm_share_ci_low'] > 0).sum())} heads, below 0 in "
                   f"{int((a['norm_share_ci_high'] < 0).sum())}; given position: median "
                   f"{pct(a['norm_share_given_position'].median())}; mean |H − H_cf| median "
                   f"{num(a['mean_abs_delta_h_cf'].median())} nats")
    out += [
        f"- median r(ln ‖q‖, H): raw {num(s['r_logq_entropy'].median(), sign=True)}, given log "
        f"position {num(s['r_logq_entropy_given_pos'].median(), sign=True)}, mediator-adjusted "
        f"(position and sink) {num(s['r_logq_entropy_mediator_adjusted'].median(), sign=True)}",
        f"- heads with r ≠ 0 at BH q < 0.05 (document-clustered CR2): raw "
        f"{int(s['significant'].sum())}, given log position "
        f"{int(s['significant_given_pos'].sum())}",
        f"- consistent across document folds (slope given position): "
        f"{int(s['consistent'].sum())}; replicated on held-out documents: "
        f"{int(s['replicated'].sum())}",
    ]
    return out


def ablate_lines(run: Path) -> list[str]:
    t = pd.read_csv(run / "norm_ablation.csv")
    seq_len = json.loads((run / "manifest.json").read_text())["config"]["seq_len"]
    out = [f"- heads: {len(t)}; documents measured: {int(t['n_documents'].iloc[0])}, "
           f"{seq_len} tokens each"]
    for cond in ("norm", "rotation", "mean_ablation"):
        if f"{cond}_kl" in t:
            out.append(f"- {cond.replace('_', ' ')}: median KL(p ‖ p_ablated) "
                       f"{t[f'{cond}_kl'].median():.2e} nats; Δloss interval excluding 0 in "
                       f"{int(((t[f'{cond}_delta_loss_ci_low'] > 0) | (t[f'{cond}_delta_loss_ci_high'] < 0)).sum())} heads")
    for other in ("rotation", "mean_ablation"):
        col = f"norm_minus_{other}_kl"
        if f"{col}_ci_high" in t:
            out.append(f"- norm ablation's KL below {other.replace('_', ' ')}'s (paired document "
                       f"interval below 0) in {int((t[f'{col}_ci_high'] < 0).sum())} heads, above in "
                       f"{int((t[f'{col}_ci_low'] > 0).sum())}")
    return out


def map_lines(run: Path) -> list[str]:
    t = pd.read_csv(run / "causal_map.csv")
    s = pd.read_csv(run / "causal_map_summary.csv")
    out = [f"- heads: {t[['layer', 'head']].drop_duplicates().shape[0]}; α: "
           f"{', '.join(f'{a:g}' for a in sorted(t['alpha'].unique()))}"]
    for _, r in s.iterrows():
        out.append(f"- α = {r['alpha']:g}: Spearman({r['x']}, {r['y']}) across heads "
                   f"{num(r['spearman'], sign=True)} {interval(r['spearman_ci_low'], r['spearman_ci_high'], sign=True)} "
                   f"(head bootstrap, {int(r['n_heads'])} heads)")
    for a, sub in t.groupby("alpha"):
        out.append(f"- α = {a:g}: median downstream KL {sub['kl'].median():.2e} nats; Δloss "
                   f"interval excluding 0 in {int(((sub['delta_loss_ci_low'] > 0) | (sub['delta_loss_ci_high'] < 0)).sum())} heads")
    return out


def length_lines(run: Path) -> list[str]:
    m = _manifest(run)
    s = pd.read_csv(run / "length_summary.csv")
    ref = float(s["slope_logn_reference"].iloc[0])
    sig = s["q_logq_logt"] < 0.05
    vs = s["logq_vs_logn"].value_counts()
    slope, gap, ent = s["slope_logq_logt"], s["slope_gap_logt"], s["slope_entropy_logt"]
    names = ", ".join(str(d["name"]) for d in m["documents"])
    return [
        f"- model {m['model']['spec']} ({m['model']['n_layers']} layers × {m['model']['n_heads']} "
        f"query heads); corpus: {m['corpus']}",
        f"- {len(m['documents'])} documents × {m['seq_len']} tokens ({names}); attention "
        f"{m['attention']}; run time {m['timings']['total_s']:.0f} s",
        f"- heads: {len(s)}; slope of ln‖q‖ on ln t: median {num(slope.median(), 4, sign=True)}, "
        f"10–90% of heads {num(slope.quantile(0.1), 4, sign=True)} to {num(slope.quantile(0.9), 4, sign=True)}, "
        f"largest {num(slope.max(), 3, sign=True)}",
        f"- BH q < 0.05 over heads: {int((sig & (slope > 0)).sum())} heads rise, "
        f"{int((sig & (slope < 0)).sum())} fall",
        f"- log-n scaling (‖q‖ ∝ log(t+1)) would give a slope of {num(ref, 3)}: the interval lies "
        f"below it in {int(vs.get('below', 0))} heads, includes it in {int(vs.get('includes', 0))}, "
        f"lies above it in {int(vs.get('above', 0))}",
        f"- entropy H on ln t: median slope {num(ent.median(), 2, sign=True)}; H − log(t+1) on ln t: "
        f"median {num(gap.median(), 2, sign=True)}, interval below 0 in "
        f"{int((s['slope_gap_logt_ci_high'] < 0).sum())}/{len(s)} heads, above 0 in "
        f"{int((s['slope_gap_logt_ci_low'] > 0).sum())}",
        f"- Spearman across heads of the ln‖q‖ slope and the H slope: "
        f"{num(slope.rank().corr(ent.rank()), 2, sign=True)}",
    ] + _profile_lines(pd.read_csv(run / "length_profile.csv"))


def _profile_lines(p: pd.DataFrame, early: int = 64) -> list[str]:
    """Medians over heads of the bin holding position `early` and of the last bin."""
    cols = ["mean_ln_q_norm", "mean_entropy_ratio", "mean_gain", "mean_sink_mass"]
    med = p.groupby(["pos_low", "pos_high"])[cols].median().reset_index()
    a = med[(med["pos_low"] <= early) & (med["pos_high"] > early)].iloc[0]
    b = med.iloc[-1]
    span = lambda r: f"t in [{int(r['pos_low'])}, {int(r['pos_high'])})"  # noqa: E731
    return [
        f"- medians over heads, {span(a)} → {span(b)}: ln‖q‖ {num(a['mean_ln_q_norm'], 2)} → "
        f"{num(b['mean_ln_q_norm'], 2)}; H / log(t+1) {num(a['mean_entropy_ratio'], 2)} → "
        f"{num(b['mean_entropy_ratio'], 2)}; local gain −Var_p(s) {num(a['mean_gain'], 2)} → "
        f"{num(b['mean_gain'], 2)}; sink mass {num(a['mean_sink_mass'], 2)} → {num(b['mean_sink_mass'], 2)}",
    ]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]
    summarize: Callable[[Path], list[str]]
    title: str

    @property
    def out(self) -> Path:
        return RESULTS / self.name

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "spectra_lens.experiments.cli", *self.args, "--out", str(self.out),
                "--no-images"]

    def shown(self) -> str:
        out = os.path.relpath(self.out, ROOT)
        return shlex.join(["spectra-lens", *self.args, "--out", out, "--no-images"])

    def complete(self) -> bool:
        try:
            return _manifest(self.out).get("status") == "complete"
        except (OSError, ValueError):
            return False


# The causal steps run every head of the default model; at their budget size (16 × 128 tokens)
# that is hours on a 2-core CPU (BENCHMARKS.md), so the findings use a small token budget.
_SMALL = ("--n-sequences", "4", "--n-select", "4", "--seq-len", "32")
STEPS = (
    Step("observe", ("observe",), observe_lines,
         "EXP0 on the embedded default (observational slope, the tested verdict)"),
    Step("ablate_norm", ("ablate-norm", *_SMALL), ablate_lines,
         "Norm ablation of every head (direction kept, norm set to the reference)"),
    Step("causal_map", ("causal-map", *_SMALL), map_lines,
         "Causal map of every head (query scaled by α, downstream effect)"),
    Step("length", ("length", "--n-documents", "16", "--seq-len", "8192"), length_lines,
         "Length study on the default model (ln‖q‖ and entropy against ln t, 8,192-token books)"),
    Step("length_gemma", ("length", "--model", "gemma-3-270m", "--n-documents", "8", "--seq-len", "4096"),
         length_lines, "Length study on Gemma 3 270M (the same, 8 books of 4,096 tokens)"),
)


def render(steps=STEPS) -> str:
    parts = [
        "# Findings",
        "",
        "Generated by `make findings` (`python scripts/findings.py`) from the runs under "
        "`results/findings/`; do not edit by hand. Every number the README quotes is here, "
        "under the command that produced it.",
        "",
    ]
    for step in steps:
        parts += [f"## {step.title}", "", f"`{step.shown()}`", ""]
        if step.complete():
            m = _manifest(step.out)
            v = m.get("versions", {})
            parts.append(f"- run finished {m.get('updated', '?')}; transformer-lens "
                         f"{v.get('transformer-lens', '?')}, torch {v.get('torch', '?')}")
            parts += step.summarize(step.out)
        else:
            parts.append("- not run yet: run the command above (or `make findings`).")
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-run", action="store_true", help="read existing runs only")
    ap.add_argument("--rerun", nargs="*", default=[], help="steps to recompute")
    args = ap.parse_args(argv)
    for step in STEPS:
        if args.no_run or (step.complete() and step.name not in args.rerun):
            continue
        print(f"findings: {step.shown()}", flush=True)
        extra = ["--overwrite"] if step.out.exists() else []
        subprocess.run([*step.argv, *extra], check=True)
    text = render()
    atomic_write_bytes(OUT, text.encode())
    print(f"wrote {os.path.relpath(OUT, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
