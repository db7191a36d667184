"""EXP2, gain: how strongly every head's attention sharpness responds to its query scale.

    spectra-lens gain [--alphas ...] [--n-sequences 16] [--seq-len 128] [--model M]
        [--corpus C] [--out DIR] [--target-layer L --target-head H ...] [--overwrite]

For every head, the metrics at each α of the grid (default 21 log-spaced values 1/4..4) come
from `sweep.head_curves`: the fast path softmax(α·s) from one unscaled pass where the layer's
logits are bilinear in q, real forward passes with QueryScale elsewhere (`method`, `reason`).
Each metric's per-α mean over sequences is fitted against ln α by least squares
(`stats.fit_log_slopes`): the slope is the head's gain over the grid, with its standard error,
R² and a monotonicity flag; the slope's interval is a t-interval over per-sequence slopes. The
analytic local gain dH/d ln α at α = 1 = −Var_p(s) (free from the unscaled pass) is reported
with a t-interval over sequences, and `fd_gain_entropy` is the central difference of the
measured entropy around α = 1 on the grid, which it should match.

Outputs (in --out): `gain_summary.csv` (one row per head), `gain_curves.csv` (one row per head
× α), figures under `figures/` (layer × head heatmaps of the gains, fit plots of the target and
control heads, their bar comparison, fitted vs analytic gain) and `manifest.json`. The target /
control heads only choose which fits are drawn (rule: experiments/_common.py); `parts/` holds
the per-sequence α-curves of every part (below).

Parts, resuming, several processes. The measured sequences are cut into parts of
`--batch-size` consecutive sequences (`part_ranges`); each part's α-curves of every head
(`sweep_part`, a `HeadSweep` of those sequences) are written to `parts/part_XXXXX.npz`
(atomic, listed in the manifest before they are written, with the sha256 of the part's token
ids and the settings they depend on), and the tables are computed from all parts joined
(`HeadSweep.concat`). A rerun of an unfinished run with the same settings skips every part
already written. Under `torchrun` rank r computes parts r, r + W, ...; rank 0 starts the run,
chooses the target / control heads, and after a barrier joins the parts and writes the tables.
A detached share (SPECTRA_SHARD_RANK / SPECTRA_SHARD_WORLD) writes its parts into its own run
directory, and `spectra-lens merge` joins the shares.

Why a part is a block of sequences, not a group of heads or layers: every number in the tables
is built from per-sequence means (curves, per-sequence slopes, t-intervals over sequences), so
joining parts along the sequence axis is exact, and each part is one forward batch of the fast
path, so every rank runs exactly the forward passes one process would run: 1 and N processes
give the same numbers bit for bit. The fast path measures all heads of all layers from one
unscaled pass, so splitting by heads or layers would repeat that forward pass on every rank;
splitting by sequences divides it. Parts cost the same (the same number of sequences, all
layers each), so round robin balances them; exact-mode layers (one forward per layer and α
chunk) are split the same way. Use at least as many parts as processes (n_sequences /
batch_size >= W; a warning says when ranks are idle). The selection of the target / control
heads (one pass over the held-out sequences) runs on rank 0 while the other ranks compute.
"""

import dataclasses
import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from html import escape
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from spectra_lens.config import GainConfig
from spectra_lens.errors import SpectraError
from spectra_lens.layout import attention_layout
from spectra_lens.present import figures as figs
from spectra_lens.present.display import progress_bar
from spectra_lens.runs import outputs as O
from spectra_lens.runs import pipeline as P
from spectra_lens.runs.distributed import SHARD_RANK, SHARD_WORLD, Group, Steps
from spectra_lens.stats.fits import fit_log_slopes
from spectra_lens.stats.inference import t_interval
from spectra_lens.sweep import HeadSweep, head_curves
from spectra_lens.validate import HeadRef, check_alphas

from . import _common as C

__all__ = ["GainResult", "compute", "gain_table", "command", "merge", "part_ranges", "read_parts",
           "run", "sweep_part", "write_parts"]

log = logging.getLogger(__name__)
EXPERIMENT = "gain"
PARTS_DIR = "parts"  # one file per part: parts/part_XXXXX.npz (HeadSweep.save)

# metric of the sweep -> gain column; the first is the primary fit (r_squared, std_error, ...)
_GAINS = {"entropy": "gain_entropy", "max_attn": "gain_max_attn", "k_eff_exp": "gain_k_eff",
          "k_eff_pr": "gain_k_eff_pr", "k_eff_top90": "gain_k_eff_top90"}


@dataclass(frozen=True, repr=False)
class GainResult:
    """The tables of one EXP2 run."""

    summary: pd.DataFrame  # gain_summary.csv: one row per head
    curves: pd.DataFrame  # gain_curves.csv: one row per head × α
    sweep: HeadSweep
    choice: C.HeadChoice
    out: Path | None = None

    def __repr__(self) -> str:
        s = self.summary
        return (f"GainResult(heads={len(s)}, alphas={len(self.sweep.alphas)}, "
                f"fast/exact layers={self.sweep.method.count('fast')}/{self.sweep.method.count('exact')}, "
                f"out={self.out})")

    def _repr_html_(self) -> str:
        cols = ["layer", "head", "gain_entropy", "analytic_gain", "r_squared", "is_monotonic", "method"]
        top = self.summary.reindex(self.summary["gain_entropy"].abs().sort_values(ascending=False).index)
        shown = top[[c for c in cols if c in top.columns]].head(10)
        return (f"<b>{escape(repr(self))}</b><p>most sensitive heads (|dH/d ln α|):</p>"
                + shown.to_html(index=False, float_format="%.4g"))


def _central_difference(alphas: tuple[float, ...], values: np.ndarray) -> np.ndarray:
    """(v(α₊) − v(α₋)) / (ln α₊ − ln α₋) around α = 1 on the grid (NaN without 1 and neighbours)."""
    if 1.0 not in alphas:
        return np.full(values.shape[1:], np.nan)
    i = alphas.index(1.0)
    if i == 0 or i == len(alphas) - 1:
        return np.full(values.shape[1:], np.nan)
    return (values[i + 1] - values[i - 1]) / (np.log(alphas[i + 1]) - np.log(alphas[i - 1]))


def gain_table(sweep: HeadSweep, layout, *, ci: float = 0.95) -> pd.DataFrame:
    """One row per head: fitted gains of every metric against ln α, the analytic gain and the
    central difference at α = 1, with `method` / `reason` from the sweep.

    Columns: `layer`, `head`, `gain_entropy`, `gain_max_attn`, `gain_k_eff` (k_eff = exp(H)),
    `gain_k_eff_pr`, `gain_k_eff_top90` with `_ci_low/_ci_high` (t-interval of per-sequence
    slopes); `r_squared`, `std_error`, `is_monotonic`, `intercept` of the entropy fit and
    `r_squared_{m}`, `std_error_{m}`, `is_monotonic_{m}` for m in max_attn, k_eff;
    `analytic_gain` with `_ci_low/_ci_high`; `analytic_gain_applies` (the layer is bilinear in
    q); `fd_gain_entropy`; `mean_entropy_unscaled`; `n_sequences`, `method`, `reason`.
    """
    alphas = sweep.alphas
    m = sweep.metrics
    n_alpha, n_batch, n_layer, n_head = m.entropy.shape
    cols: dict[str, object] = {
        "layer": np.repeat(np.asarray(sweep.layers), n_head),
        "head": np.tile(np.arange(n_head), n_layer),
    }
    for metric, name in _GAINS.items():
        values = m.metric(metric).double()  # [alpha, batch, layer, head]
        mean_curve = values.mean(1).reshape(n_alpha, -1).T.numpy()  # [layer·head, alpha]
        fit = fit_log_slopes(alphas, mean_curve)
        per_seq = values.permute(2, 3, 1, 0).reshape(-1, n_alpha).numpy()  # [layer·head·batch, alpha]
        slopes = fit_log_slopes(alphas, per_seq)["slope"].to_numpy().reshape(-1, n_batch)
        _, low, high = t_interval(slopes, ci=ci, axis=1)
        cols[name] = fit["slope"].to_numpy()
        cols[f"{name}_ci_low"], cols[f"{name}_ci_high"] = low, high
        suffix = {"entropy": "", "max_attn": "_max_attn", "k_eff_exp": "_k_eff"}.get(metric)
        if suffix is not None:
            cols[f"r_squared{suffix}"] = fit["r_squared"].to_numpy()
            cols[f"std_error{suffix}"] = fit["std_error"].to_numpy()
            cols[f"is_monotonic{suffix}"] = fit["is_monotonic"].to_numpy()
            if metric == "entropy":
                cols["intercept"] = fit["intercept"].to_numpy()
    mean, low, high = t_interval(sweep.local_gain, ci=ci, axis=0)
    cols["analytic_gain"] = mean.reshape(-1)
    cols["analytic_gain_ci_low"], cols["analytic_gain_ci_high"] = low.reshape(-1), high.reshape(-1)
    cols["analytic_gain_applies"] = np.repeat([bool(layout.q_bilinear[l]) for l in sweep.layers], n_head)
    entropy_curve = m.entropy.double().mean(1).numpy()  # [alpha, layer, head]
    cols["fd_gain_entropy"] = _central_difference(alphas, entropy_curve).reshape(-1)
    cols["mean_entropy_unscaled"] = (entropy_curve[alphas.index(1.0)].reshape(-1) if 1.0 in alphas
                                     else np.full(n_layer * n_head, np.nan))
    cols["n_sequences"] = n_batch
    cols["method"] = np.repeat(np.asarray(sweep.method, dtype=object), n_head)
    cols["reason"] = np.repeat(np.asarray([r or "" for r in sweep.reason], dtype=object), n_head)
    return pd.DataFrame(cols)


def part_ranges(n_sequences: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of every part: consecutive blocks of `batch_size` measured sequences, one
    fast-path forward batch each (the last may be shorter)."""
    return [(a, min(a + batch_size, n_sequences)) for a in range(0, n_sequences, batch_size)]


def part_name(i: int) -> str:
    """The file of part `i` in a run directory."""
    return f"{PARTS_DIR}/part_{i:05d}.npz"


def _digest(tokens: torch.Tensor) -> str:
    t = tokens.detach().cpu().to(torch.int64).contiguous()
    return hashlib.sha256(repr(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def part_digests(cfg: GainConfig, measure: torch.Tensor) -> list[str]:
    """sha256 of the token ids of every part (recorded in each part file and share manifest)."""
    return [_digest(measure[a:b]) for a, b in part_ranges(len(measure), cfg.batch_size)]


def _part_metas(cfg: GainConfig, n_sequences: int, digests: list[str]) -> list[dict]:
    """What each part file must record to be reused: its sequences (range and sha256 of their
    ids) and every setting its numbers depend on."""
    alphas = list(check_alphas(cfg.alphas))
    return [{"part": i, "start": a, "stop": b, "tokens_sha256": digests[i], "corpus": cfg.corpus,
             "alphas": alphas,
             "min_position": cfg.min_position, "batch_size": cfg.batch_size, "max_rows": cfg.max_rows}
            for i, (a, b) in enumerate(part_ranges(n_sequences, cfg.batch_size))]


def _part_done(path: Path, meta: dict) -> bool:
    """The part file exists and was computed for exactly `meta` (else it is redone)."""
    if not path.exists():
        return False
    try:
        return HeadSweep.read_meta(path) == meta
    except SpectraError:
        return False


def sweep_part(cfg: GainConfig, model, measure: torch.Tensor, i: int) -> HeadSweep:
    """The α-curves of every head on part `i` of the measured sequences (`part_ranges`)."""
    a, b = part_ranges(len(measure), cfg.batch_size)[i]
    return head_curves(model, measure[a:b], check_alphas(cfg.alphas), min_position=cfg.min_position,
                       batch_size=cfg.batch_size, max_rows=cfg.max_rows)


def write_parts(cfg: GainConfig, model, measure: torch.Tensor, directory, parts, *,
                progress: bool = False) -> None:
    """Compute parts `parts` and write each into `directory` (atomic file `part_name(i)`); a
    part whose file already holds exactly that part is skipped, so a rerun redoes only the rest."""
    parts = list(parts)
    metas = _part_metas(cfg, len(measure), part_digests(cfg, measure))
    bar = progress_bar(total=len(parts), desc="α-curves", unit="part", enabled=progress)
    for i in parts:
        path = Path(directory) / part_name(i)
        if not _part_done(path, metas[i]):
            sweep_part(cfg, model, measure, i).save(path, meta=metas[i])
        bar.update(1)
    bar.close()


def read_parts(cfg: GainConfig, n_sequences: int, digests: list[str], directories) -> HeadSweep:
    """Every part of a run, each from the first of `directories` that holds it, joined in order
    (`HeadSweep.concat`). SpectraError naming the parts that are missing or were computed for
    other sequences or settings."""
    metas = _part_metas(cfg, n_sequences, digests)
    found, missing = [], []
    for i, meta in enumerate(metas):
        path = next((p for p in (Path(d) / part_name(i) for d in directories) if _part_done(p, meta)), None)
        if path is None:
            missing.append(i)
        else:
            found.append(path)
    if missing:
        raise SpectraError(f"parts {missing} of {len(metas)} are missing (or were computed for other "
                           f"sequences or settings); rerun the same command to redo them")
    return HeadSweep.concat([HeadSweep.load(p) for p in found])


def _result(cfg: GainConfig, sweep: HeadSweep, choice: C.HeadChoice, layout) -> GainResult:
    """The tables of a finished sweep: gain_summary (with the target / control rows marked) and
    gain_curves. `layout`: anything with the model's per-layer `q_bilinear`."""
    summary = gain_table(sweep, layout, ci=cfg.ci)
    role = {choice.target: "target", choice.control: "control"}
    summary.insert(2, "head_type", [role.get((int(l), int(h)), "")
                                    for l, h in zip(summary["layer"], summary["head"])])
    return GainResult(summary=summary, curves=sweep.summary(ci=cfg.ci), sweep=sweep, choice=choice)


def compute(cfg: GainConfig, model, tokens: P.RunTokens, *, progress: bool = False, rd=None) -> GainResult:
    """The EXP2 measurements on a loaded model and tokens (no files written), part by part in
    this process: the same numbers as `run` with any number of processes."""
    check_alphas(cfg.alphas, at_least=3)  # a slope fit with a residual
    layout = attention_layout(model)
    with P.timed(rd, "choose_heads_s"):
        choice, _ = C.choose_heads(cfg, model, layout, tokens, control=True, progress=progress)
    with P.timed(rd, "sweep_s"):
        n = len(part_ranges(len(tokens.measure), cfg.batch_size))
        bar = progress_bar(total=n, desc="α-curves", unit="part", enabled=progress)
        parts = []
        for i in range(n):
            parts.append(sweep_part(cfg, model, tokens.measure, i))
            bar.update(1)
        bar.close()
        sweep = HeadSweep.concat(parts)
    with P.timed(rd, "fits_s"):
        return _result(cfg, sweep, choice, layout)


OUTPUTS = O.Outputs(
    "EXP2", "gain: entropy sensitivity to query scale, every head", "spectra-lens gain",
    (
        O.Table("gain_summary.csv", "heads with the largest entropy gain", ("gain_entropy",),
                ("layer", "head", "head_type", "gain_entropy", "gain_entropy_ci_low",
                 "gain_entropy_ci_high", "analytic_gain", "fd_gain_entropy", "gain_max_attn",
                 "gain_k_eff", "r_squared", "std_error", "is_monotonic", "mean_entropy_unscaled",
                 "method")),
        O.Table("gain_curves.csv", "per-α curves of every head", (), (), rows=0),
    ),
)


def tables(result: GainResult) -> dict[str, pd.DataFrame]:
    """The run's tables by file stem."""
    return {"gain_summary": result.summary, "gain_curves": result.curves}


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """Every EXP2 figure, from the tables alone (`tables(result)` or the run's CSVs)."""
    out: dict[str, go.Figure] = {}
    s = tables.get("gain_summary")
    if s is None:
        return out
    for column, title in (("gain_entropy", "fitted entropy gain dH/d ln α over the grid"),
                          ("analytic_gain", "analytic local gain −Var_p(s) at α = 1"),
                          ("gain_max_attn", "fitted max-attention gain"),
                          ("gain_k_eff", "fitted k_eff = exp(H) gain")):
        if column in s.columns:
            out[f"gain_heatmap_{column.removeprefix('gain_')}"] = figs.head_heatmap(s, column, title=title)
    roles = s["head_type"].fillna("").astype(str) if "head_type" in s.columns else pd.Series("", index=s.index)
    curves = tables.get("gain_curves")
    if curves is not None:
        for role in ("target", "control"):
            for _, row in s[roles == role].iterrows():
                l, h = int(row["layer"]), int(row["head"])
                curve = curves[(curves["layer"] == l) & (curves["head"] == h)]
                out[f"gain_fit_{HeadRef(l, h).file_tag}_{role}"] = figs.gain_fit(
                    curve, "mean_entropy", slope=float(row["gain_entropy"]),
                    intercept=float(row["intercept"]), analytic_gain=float(row["analytic_gain"]),
                    title=f"{HeadRef(l, h)} ({role}): entropy vs ln α, R² = {row['r_squared']:.3f} ({row['method']})")
    chosen = s[roles != ""].sort_values("head_type", ascending=False)
    if len(chosen):
        out["gain_comparison"] = figs.gain_comparison(
            chosen, columns=("gain_entropy", "analytic_gain", "gain_max_attn"),
            title="target vs control: entropy gain (fitted, analytic) and max-attention gain")
    out["gain_vs_analytic"] = figs.gain_vs_analytic(s, title="fitted entropy gain vs analytic gain, every head")
    return out


def run(cfg: GainConfig = GainConfig(), *, model=None, tokens: torch.Tensor | None = None,
        progress: bool = True) -> GainResult | None:
    """EXP2 into `cfg.out`: gain_summary.csv, gain_curves.csv, figures, parts/, manifest.json.

    Rerunning an unfinished run with the same settings reuses every part already written.
    Under `torchrun` every rank computes its share of the parts and rank 0 returns the result
    (the other ranks None); a detached share (SPECTRA_SHARD_RANK / SPECTRA_SHARD_WORLD) writes
    its parts into its own run directory and returns None (`spectra-lens merge` joins them).
    """
    group = Group.from_env(device=cfg.device)
    if group.distributed:
        cfg = dataclasses.replace(cfg, device=group.device(cfg.device))
    try:
        if group.detached:
            _run_share(cfg, group, model, tokens, progress=progress)
            return None
        if not group.is_main:
            _compute_share(cfg, group, model, tokens)
            return None
        return _run_main(cfg, group, model, tokens, progress=progress)
    finally:
        group.close()


def _finish(cfg: GainConfig, rd, result: GainResult, info: dict, *, progress: bool = False) -> None:
    with P.timed(rd, "write_s"):
        t = tables(result)
        files = O.write_outputs(rd, t, figures(t), images=cfg.images, progress=progress)
    rd.finish(
        **info,
        alphas=list(result.sweep.alphas),
        files=files,
        methods={str(l): m for l, m in zip(result.sweep.layers, result.sweep.method)},
        definitions={**C.k_eff_definitions(),
                     "gain_*": "least-squares slope of the per-α mean over sequences against ln α",
                     "gain_*_ci": f"t-interval ({cfg.ci:g}) of per-sequence slopes",
                     "r_squared/std_error/is_monotonic": "of the entropy fit (suffixed columns: other metrics)",
                     "analytic_gain": "-Var_p(s) at alpha = 1, mean over sequences of per-sequence token means",
                     "fd_gain_entropy": "central difference of mean entropy around alpha = 1 on the grid"},
    )


def _parts_info(cfg: GainConfig, n_parts: int, world: int) -> dict:
    return {"parts": {"n_parts": n_parts, "sequences_per_part": cfg.batch_size, "processes": world,
                      "unit": "one fast-path batch of measured sequences (experiments/gain.py)"}}


def _run_main(cfg: GainConfig, group: Group, model, tokens, *, progress: bool) -> GainResult:
    """Rank 0 (or the only process): the run directory, its share of the parts, the tables."""
    steps = Steps(group, 2)
    try:
        with P.begin_run(cfg, EXPERIMENT, model=model, tokens=tokens, progress=progress) as setup:
            rd, measure = setup.rd, setup.tokens.measure
            n = len(part_ranges(len(measure), cfg.batch_size))
            for i in range(n):  # every rank's parts are listed in the manifest before any is written
                rd.output(part_name(i))
            if group.world > n:
                log.warning("%d processes for %d parts (of --batch-size %d sequences): ranks %d.. have "
                            "nothing to do; a smaller --batch-size makes more parts",
                            group.world, n, cfg.batch_size, n)
            if not steps.step():  # the others start once the run has started
                raise SpectraError("another rank could not start (see its message); nothing was computed")
            with P.timed(rd, "choose_heads_s"):
                choice, _ = C.choose_heads(cfg, setup.model, setup.layout, setup.tokens, control=True, progress=progress)
            with P.timed(rd, "sweep_s"):
                write_parts(cfg, setup.model, measure, rd.path, group.shards(n), progress=progress)
            if not steps.step():  # every rank has written its parts
                raise SpectraError("another rank failed before writing its parts (see its message); "
                                   "rerun the same command to redo only the missing parts")
            with P.timed(rd, "fits_s"):
                sweep = read_parts(cfg, len(measure), part_digests(cfg, measure), [rd.path])
                result = _result(cfg, sweep, choice, setup.layout)
            _finish(cfg, rd, result, {**P.provenance(setup, choice, cfg.seed),
                                      **_parts_info(cfg, n, group.world)}, progress=progress)
    except Exception:
        steps.abort()
        raise
    return dataclasses.replace(result, out=rd.path)


def _compute_share(cfg: GainConfig, group: Group, model, tokens) -> None:
    """A rank other than 0: wait for rank 0 to start the run, write this rank's parts into it."""
    steps = Steps(group, 2)
    try:
        cfg.validate()
        model, _ = P.load_run_model(cfg, model)
        measure = P.load_run_tokens(cfg, model, tokens).measure
        if not steps.step():  # rank 0 could not start the run; it says why
            steps.abort()
            return
        n = len(part_ranges(len(measure), cfg.batch_size))
        write_parts(cfg, model, measure, Path(cfg.out), group.shards(n))
        steps.step()
    except Exception:
        steps.abort()
        raise


def _run_share(cfg: GainConfig, group: Group, model, tokens, *, progress: bool) -> None:
    """A detached share: parts rank, rank + world, ... into its own run directory `cfg.out`
    (share 0 also chooses the target / control heads); `merge` makes the tables."""
    with P.begin_run(cfg, EXPERIMENT, model=model, tokens=tokens, progress=progress) as setup:
        rd, measure = setup.rd, setup.tokens.measure
        n = len(part_ranges(len(measure), cfg.batch_size))
        mine = group.shards(n)
        for i in mine:  # listed before they exist, so that --overwrite removes them
            rd.output(part_name(i))
        if group.rank == 0:
            with P.timed(rd, "choose_heads_s"):
                choice, _ = C.choose_heads(cfg, setup.model, setup.layout, setup.tokens, control=True, progress=progress)
            info = P.provenance(setup, choice, cfg.seed)
        else:  # the other shares record what share 0 records, less the head selection
            t = setup.tokens
            info = dict(model=P.model_info(setup.model_name, setup.layout, setup.model), corpus=t.corpus,
                        n_sequences=int(t.measure.shape[0]), seq_len=int(t.measure.shape[1]), seed=cfg.seed)
        with P.timed(rd, "sweep_s"):
            write_parts(cfg, setup.model, measure, rd.path, mine, progress=progress)
        rd.finish(**info, share={"rank": group.rank, "world": group.world, "parts": mine, "n_parts": n},
                  part_digests=part_digests(cfg, measure),
                  q_bilinear=[bool(b) for b in setup.layout.q_bilinear])


def merge(cfg, *, progress: bool = True) -> GainResult:
    """The tables of a gain run computed in detached shares (`config.MergeConfig`): every share's
    run directory must hold a finished share of the same configuration over the same sequences
    (their sha256 agree), share 0 (which chose the heads) among them, and together they must
    hold every part (a part in several shares is read once)."""
    shares = P.read_shares(cfg, EXPERIMENT)
    for d, m in shares[1:]:
        if m.get("part_digests") != shares[0][1].get("part_digests"):
            raise SpectraError(f"{d} measured other sequences than {shares[0][0]} (their sha256 "
                               "differ): shares must read the same corpus")
    zero = [(d, m) for d, m in shares if m["share"]["rank"] == 0]
    if not zero:
        raise SpectraError("share 0 (SPECTRA_SHARD_RANK=0) is not among the run directories given; it "
                           "records the heads the figures show: pass its run directory")
    m0 = zero[0][1]
    run_cfg = P.merged_config(cfg, GainConfig, m0)
    n_sequences, digests = int(m0["n_sequences"]), list(m0["part_digests"])
    sweep = read_parts(run_cfg, n_sequences, digests, [d for d, _ in shares])
    sel = m0["selection"]
    choice = C.HeadChoice(tuple(sel["target"]), tuple(sel["control"]) if sel.get("control") else None,
                          tuple(sel.get("chosen_by_rule", ())),
                          {int(k): v for k, v in sel.get("selection_gains", {}).items()},
                          control_r=sel.get("control_r"))
    inputs = [d for d, _ in shares]
    with P.run_directory(run_cfg, EXPERIMENT, inputs=inputs) as rd:
        rd.start(run_cfg, overwrite=run_cfg.overwrite)
        result = _result(run_cfg, sweep, choice, SimpleNamespace(q_bilinear=tuple(m0["q_bilinear"])))
        info = {k: m0[k] for k in ("model", "corpus", "n_sequences", "seq_len", "selection", "seed") if k in m0}
        _finish(run_cfg, rd, result, {**info, **_parts_info(run_cfg, len(digests), m0["share"]["world"]),
                                      "merged_from": [str(d) for d, _ in shares]}, progress=progress)
    return dataclasses.replace(result, out=rd.path)


def command(cfg: GainConfig, *, progress: bool = True) -> int:
    """`spectra-lens gain`: run `cfg`, print a summary; SpectraError for bad input."""
    t0 = time.perf_counter()
    result = run(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    if result is None:  # a rank other than 0, or a detached share: its parts are written
        share = os.environ.get(SHARD_WORLD)
        if share is not None and int(share) > 1:
            print(f"wrote share {os.environ.get(SHARD_RANK)} of {share} of the parts into {cfg.out} in "
                  f"{seconds:.0f} s; `spectra-lens merge` joins the shares")
        return 0
    s = result.summary
    strongest = s.loc[s["gain_entropy"].idxmin()]
    print(f"{len(s)} heads, {len(result.sweep.alphas)} alphas, methods: "
          f"{dict(Counter(result.sweep.method))} layers")
    print(f"median entropy gain {s['gain_entropy'].median():+.3f} per ln α; strongest "
          f"{HeadRef(int(strongest['layer']), int(strongest['head']))} {strongest['gain_entropy']:+.3f} "
          f"(analytic at α=1 {strongest['analytic_gain']:+.3f})")
    print(f"identity checks (properties of softmax(α·s), not findings): entropy monotonic in "
          f"{int(s['is_monotonic'].sum())}/{len(s)} heads; corr(central difference, analytic) = "
          f"{s['fd_gain_entropy'].corr(s['analytic_gain']):.3f}")
    print(f"wrote {result.out} in {seconds:.0f} s")
    return 0

