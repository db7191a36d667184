"""Norm ablation of every head: does the model use its query-norm variation?

    spectra-lens ablate-norm [--heads L15H8 ...] [--n-sequences 16] [--seq-len 128]
        [--n-select 16] [--no-baselines] [--model M] [--corpus C] [--out DIR] [--overwrite]

For each head (every head by default) the effective query's norm is replaced at every position
by the head's reference norm r (its geometric-mean ‖q‖ in the same log-position bin, on the
selection sequences; `norm_ablation.REFERENCE_RULE`), its direction kept, in the real forward
pass. Beside it, on the same head and tokens: mean ablation of the head's output (hook_z ← its
selection mean in the bin) and a rotation of its query by its natural angular spread (norm
kept; `causal.ROTATION_RULE`). Several heads run per forward pass, one per copy of the batch.

Selection and measured sequences come from disjoint documents (`disjoint_tokens`; both document
sets in the manifest). Every interval resamples documents.

Outputs (in --out): `norm_ablation.csv` (one row per head), `reference_norms.csv` (r per head
and position bin, with the rotation angle), figures under `figures/`, `manifest.json`.
"""

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from spectra_lens.causal import document_bootstrap
from spectra_lens.config import AblateNormConfig
from spectra_lens.data.corpus import tokenize_documents
from spectra_lens.data.prepare import corpus_from_spec
from spectra_lens.data.shards import ShardManifest, load_tokens
from spectra_lens.errors import SpectraError
from spectra_lens.interventions import QueryRotate
from spectra_lens.layout import attention_layout
from spectra_lens.norm_ablation import (
    OUTCOMES,
    Copy,
    CopyEffects,
    NormReplace,
    ReferenceNorms,
    ZReplace,
    copy_effects,
    effect_frame,
    estimate_reference_norms,
)
from spectra_lens.present.figures import causal_map as F
from spectra_lens.runs import outputs as O
from spectra_lens.runs import pipeline as P
from spectra_lens.validate import HeadRef, check_context

__all__ = ["CONDITIONS", "NormAblationResult", "command", "compute", "disjoint_tokens", "run",
           "selected_heads"]

log = logging.getLogger(__name__)
EXPERIMENT = "ablate_norm"
CONDITIONS = {
    "norm": "the query's norm replaced by the reference norm r(layer, head, bin), direction kept",
    "mean_ablation": "the head's hook_z replaced by its selection mean in the position bin",
    "rotation": "the query rotated by the head's natural angular spread, norm kept",
}


# --------------------------------------------------------------------------- tokens and heads


def disjoint_tokens(cfg, model) -> P.RunTokens:
    """`cfg.n_select` selection sequences, then `cfg.n_sequences` measured sequences from
    documents none of which gave a selection sequence (SpectraError when the corpus has too few).

    The corpus is tokenized as the other experiments do (`tokenize_documents`, round-robin over
    documents, ordered by document; prepared shards: their recorded document ids). The first
    `n_select` sequences select; the measured ones are the next sequences whose document is not
    a selection document. More of the corpus is read until enough are found or it is exhausted.
    """
    n, n_sel = cfg.n_sequences, cfg.n_select
    source = corpus_from_spec(cfg.corpus)
    want = n_sel + n
    vocab = int(model.cfg.d_vocab)
    while True:
        if isinstance(source, ShardManifest):
            if source.seq_len != cfg.seq_len:
                raise SpectraError(f"shards in {source.directory} have seq_len {source.seq_len}; expected "
                                   f"--seq-len {cfg.seq_len} (pass --seq-len {source.seq_len})")
            stop = min(source.n_sequences, want)
            tokens = load_tokens(source, stop=stop)
            docs = source.documents_of(0, stop)
            if docs is None:
                raise SpectraError(f"shards in {source.directory} record no document ids; selection and "
                                   f"measured documents cannot be kept apart (prepare them again)")
            exhausted = stop == source.n_sequences
            description = source.corpus or str(source.directory)
        else:
            if model.tokenizer is None:
                raise SpectraError("the model has no tokenizer; pass --corpus as a prepared shard directory")
            got = tokenize_documents(source, model.tokenizer, seq_len=cfg.seq_len, max_sequences=want,
                                     prepend_bos=getattr(model.cfg, "default_prepend_bos", None))
            tokens, docs = got.tokens, got.documents.tolist()
            exhausted = len(tokens) < want
            description = source.description
        docs = np.asarray(docs, dtype=np.int64)
        if len(tokens) <= n_sel:
            raise SpectraError(f"corpus {description!r} gives {len(tokens)} sequences of {cfg.seq_len} tokens; "
                               f"expected more than n_select={n_sel}")
        select_docs = set(docs[:n_sel].tolist())
        rest = [i for i in range(n_sel, len(tokens)) if int(docs[i]) not in select_docs]
        if len(rest) >= n:
            break
        if exhausted:
            raise SpectraError(
                f"corpus {description!r} gives {len(rest)} sequences of {cfg.seq_len} tokens from documents "
                f"not used for selection; expected n_sequences={n} (ask for fewer, or a larger corpus)")
        want *= 2
    measure = rest[:n]
    tokens = torch.as_tensor(tokens).long()
    if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise SpectraError(f"{description} holds token ids outside [0, {vocab}) for this model's vocabulary: "
                           f"tokenizer mismatch?")
    return P.RunTokens(tokens[measure], tokens[:n_sel], True, description, docs[measure], docs[:n_sel])


def selected_heads(cfg, layout) -> list[HeadRef]:
    """The heads of `cfg.heads` (checked against the model), or every head."""
    if not cfg.heads:
        return [HeadRef(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    out = []
    for text in cfg.heads:
        ref = HeadRef.parse(text)
        try:
            layout.check_head(ref.layer, ref.head)
        except SpectraError as e:
            raise SpectraError(f"head {ref}: {e} (the model has {layout.n_layers} layers of "
                               f"{layout.n_heads} heads)") from None
        out.append(ref)
    return sorted(out)


@contextlib.contextmanager
def begin(cfg, experiment: str, *, model=None, tokens: P.RunTokens | None = None, progress: bool = False):
    """(run directory, model, model name, layout, tokens): the frame of a per-head run. Checks
    what needs no model first, then locks `--out`, loads the model and the tokens, and writes
    the "running" manifest; a failure after that marks the run failed."""
    cfg.validate()
    source = corpus_from_spec(cfg.corpus) if tokens is None else None
    inputs = [source.directory] if isinstance(source, ShardManifest) else []
    with P.run_directory(cfg, experiment, inputs=inputs) as rd:
        with P.timed(rd, "load_model_s"):
            model, name = P.load_run_model(cfg, model, progress=progress)
            layout = attention_layout(model)
        check_context(model, cfg.seq_len)
        heads = selected_heads(cfg, layout)
        with P.timed(rd, "tokens_s"):
            tokens = disjoint_tokens(cfg, model) if tokens is None else tokens
        if tokens.measure.shape[1] != cfg.seq_len or tokens.select.shape[1] != cfg.seq_len:
            raise SpectraError(f"tokens have {tokens.measure.shape[1]} positions; expected seq_len={cfg.seq_len}")
        rd.start(cfg, overwrite=cfg.overwrite)
        torch.manual_seed(cfg.seed)
        yield rd, model, name, layout, heads, tokens


def token_record(tokens: P.RunTokens) -> dict:
    """The manifest's record of the measured and selection sequences and their documents."""
    md, sd = tokens.measure_documents, tokens.select_documents
    disjoint = None if md is None or sd is None else not (set(np.asarray(md).tolist()) & set(np.asarray(sd).tolist()))
    return {"corpus": tokens.corpus, "n_sequences": int(tokens.measure.shape[0]),
            "seq_len": int(tokens.measure.shape[1]), "n_select": int(tokens.select.shape[0]),
            "measured_documents": None if md is None else sorted({int(d) for d in np.asarray(md)}),
            "selection_documents": None if sd is None else sorted({int(d) for d in np.asarray(sd)}),
            "documents_disjoint": disjoint}


def n_documents(documents, n: int) -> int:
    return n if documents is None else len(np.unique(np.asarray(documents)))


# --------------------------------------------------------------------------- compute


@dataclass(frozen=True, repr=False)
class NormAblationResult:
    """`table`: norm_ablation.csv (one row per head); `reference`: the selection measurements;
    `effects`: per copy and sequence (`CopyEffects`); `out`: the run directory."""

    table: pd.DataFrame
    reference: ReferenceNorms
    effects: CopyEffects
    out: Path | None = None

    def __repr__(self) -> str:
        return f"NormAblationResult(heads={len(self.table)}, out={self.out})"


def copy_frame(effects: CopyEffects, documents, cfg) -> pd.DataFrame:
    """`effect_frame` of every copy with its key's (condition, layer, head) as columns."""
    frame = effect_frame(effects, documents, ci=cfg.ci, n_boot=cfg.n_boot, seed=cfg.seed)
    keys = pd.DataFrame(list(effects.keys), columns=["condition", "layer", "head"])
    return pd.concat([keys, frame], axis=1)


def wide(frame: pd.DataFrame, conditions) -> pd.DataFrame:
    """One row per (layer, head) with the columns of each condition prefixed by its name."""
    out = None
    for cond in conditions:
        part = frame[frame["condition"] == cond].drop(columns="condition")
        part = part.rename(columns={c: f"{cond}_{c}" for c in part.columns if c not in ("layer", "head")})
        out = part if out is None else out.merge(part, on=["layer", "head"], how="outer")
    return out.sort_values(["layer", "head"], ignore_index=True)


def paired(effects: CopyEffects, a: str, b: str, outcome: str, documents, cfg) -> pd.DataFrame:
    """Per head, the per-sequence difference of `outcome` between conditions a and b with its
    document-bootstrap interval (`{a}_minus_{b}_{outcome}`)."""
    index = {k: i for i, k in enumerate(effects.keys)}
    heads = sorted({(l, h) for c, l, h in effects.keys if c == a and (b, l, h) in index})
    values = getattr(effects, outcome)
    diff = torch.stack([values[index[(a, l, h)]] - values[index[(b, l, h)]] for l, h in heads], 1).numpy()
    name = f"{a}_minus_{b}_{outcome}"
    ok = np.isfinite(diff).all(0)
    mean, low, high = (np.full(len(heads), np.nan) for _ in range(3))
    if ok.any():
        m, lo, hi = document_bootstrap(diff[:, ok], documents, ci=cfg.ci, n_boot=cfg.n_boot, seed=cfg.seed)
        mean[ok], low[ok], high[ok] = m, lo, hi
    return pd.DataFrame({"layer": [l for l, _ in heads], "head": [h for _, h in heads], name: mean,
                         f"{name}_ci_low": low, f"{name}_ci_high": high})


def compute(cfg: AblateNormConfig, model, tokens: P.RunTokens, heads=None, *, progress: bool = False,
            rd=None) -> NormAblationResult:
    """The norm ablation of `heads` (default: `selected_heads`) on a loaded model (no files)."""
    layout = attention_layout(model)
    heads = selected_heads(cfg, layout) if heads is None else heads
    T = tokens.measure.shape[1]
    with P.timed(rd, "reference_s"):
        ref = estimate_reference_norms(model, tokens.select, tokens.select_documents,
                                       min_position=cfg.min_position, batch_size=cfg.max_rows,
                                       spreads=cfg.baselines)
    copies = []
    for l, h in heads:
        copies.append(Copy(("norm", l, h), l, h, NormReplace(l, h, ref.norms(l, h, T))))
        if cfg.baselines:
            copies.append(Copy(("mean_ablation", l, h), l, h, ZReplace(l, h, ref.z(l, h, T))))
            angle = min(ref.spreads[(l, h)].median_angle, math.pi)
            copies.append(Copy(("rotation", l, h), l, h, QueryRotate(l, h, angle, seed=cfg.seed)))
    with P.timed(rd, "interventions_s"):
        effects = copy_effects(model, tokens.measure, copies, min_position=cfg.min_position,
                               max_rows=cfg.max_rows, progress=progress)
    docs = tokens.measure_documents
    conditions = [c for c in CONDITIONS if cfg.baselines or c == "norm"]
    table = wide(copy_frame(effects, docs, cfg), conditions)
    if cfg.baselines:
        for other in ("rotation", "mean_ablation"):
            for outcome in ("kl", "delta_loss"):
                table = table.merge(paired(effects, "norm", other, outcome, docs, cfg), on=["layer", "head"])
        table["rotation_angle_rad"] = [ref.spreads[(l, h)].median_angle for l, h in zip(table["layer"], table["head"])]
        table["sd_log_q_norm"] = [ref.spreads[(l, h)].sd_log_norm for l, h in zip(table["layer"], table["head"])]
    table["norm_delta_loss_excludes_0"] = (table["norm_delta_loss_ci_low"] > 0) | (table["norm_delta_loss_ci_high"] < 0)
    table.insert(2, "head_label", [str(HeadRef(l, h)) for l, h in zip(table["layer"], table["head"])])
    table["n_sequences"] = int(tokens.measure.shape[0])
    table["n_documents"] = n_documents(docs, int(tokens.measure.shape[0]))
    return NormAblationResult(table, ref, effects)


# --------------------------------------------------------------------------- outputs

OUTPUTS = O.Outputs(
    "ABLATE", "norm ablation: each head's query norm replaced by its reference norm", "spectra-lens ablate-norm",
    (
        O.Table("norm_ablation.csv", "norm ablation per head, beside mean ablation and rotation", ("norm_kl",),
                ("head_label", "norm_kl", "norm_kl_ci_low", "norm_kl_ci_high", "norm_delta_loss",
                 "norm_delta_loss_ci_low", "norm_delta_loss_ci_high", "mean_ablation_kl", "rotation_kl",
                 "norm_later_abs_delta_entropy", "norm_minus_rotation_kl"), rows=20),
        O.Table("reference_norms.csv", "reference norm per head and position bin", (),
                ("layer", "head", "bin", "position_low", "position_high", "reference_norm", "n_tokens"), rows=10),
    ),
)


def tables(result: NormAblationResult) -> dict[str, pd.DataFrame]:
    return {"norm_ablation": result.table, "reference_norms": result.reference.frame()}


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """The run's figures from its tables alone."""
    out: dict[str, go.Figure] = {}
    t = tables.get("norm_ablation")
    if t is None or t.empty:
        return out
    out["norm_ablation_kl_map"] = F.effect_heatmap(
        t, "norm_kl", title="norm ablation: KL(p || p_ablated) of the next-token distribution per head")
    ys = {c: n for c, n in (("mean_ablation_kl", "mean ablation of the output"),
                            ("rotation_kl", "rotation of the query (norm kept)")) if c in t.columns}
    if ys:
        out["norm_ablation_vs_baselines"] = F.effect_scatter(
            t, "norm_kl", ys, title="norm ablation against the baselines, per head (KL, nats)",
            x_label="KL, norm replaced by the reference norm", y_label="KL, baseline")
    return out


def run(cfg: AblateNormConfig = AblateNormConfig(), *, model=None, tokens: P.RunTokens | None = None,
        progress: bool = True) -> NormAblationResult:
    """The norm ablation into `cfg.out`: CSVs, figures and manifest.json. `model` (a loaded
    bridge) and `tokens` (`runs.pipeline.RunTokens` with disjoint selection documents) skip loading."""
    with begin(cfg, EXPERIMENT, model=model, tokens=tokens, progress=progress) as (rd, model, name, layout, heads, toks):
        result = compute(cfg, model, toks, heads, progress=progress, rd=rd)
        with P.timed(rd, "write_s"):
            t = tables(result)
            files = O.write_outputs(rd, t, figures(t), images=cfg.images, progress=progress)
        e = result.effects
        rd.finish(model=P.model_info(name, layout, model), tokens=token_record(toks), seed=cfg.seed,
                  heads=[str(h) for h in heads], conditions={c: CONDITIONS[c] for c in CONDITIONS
                                                              if cfg.baselines or c == "norm"},
                  reference=result.reference.as_dict(), files=files,
                  passes={"n_passes": e.n_passes, "early_layers_skipped": e.skipped, "reason": e.reason,
                          "max_rows": cfg.max_rows},
                  definitions={**OUTCOMES, "intervals": f"{cfg.ci:g} percentile bootstrap over documents "
                               f"({cfg.n_boot} resamples) of the mean over sequences",
                               "norm_minus_rotation_kl": "per-sequence KL of norm ablation minus KL of "
                               "rotation, mean and document interval (paired: same tokens)"})
    return dataclasses.replace(result, out=rd.path)


def command(cfg: AblateNormConfig, *, progress: bool = True) -> int:
    """`spectra-lens ablate-norm`: run `cfg`, print a summary."""
    t0 = time.perf_counter()
    result = run(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    t = result.table
    print(f"norm ablation of {len(t)} heads on {t['n_sequences'].iloc[0]} sequences "
          f"({t['n_documents'].iloc[0]} documents): median KL {t['norm_kl'].median():.3g} nats")
    print(f"  heads whose KL interval excludes 0: {(t['norm_kl_ci_low'] > 0).sum()}; whose Δloss interval "
          f"excludes 0: {int(t['norm_delta_loss_excludes_0'].sum())}")
    if "rotation_kl" in t.columns:
        print(f"  median KL of mean ablation {t['mean_ablation_kl'].median():.3g}, of rotation "
              f"{t['rotation_kl'].median():.3g}; heads with norm KL > rotation KL (paired interval > 0): "
              f"{int((t['norm_minus_rotation_kl_ci_low'] > 0).sum())}")
    print(f"wrote {result.out} in {seconds:.0f} s")
    return 0
