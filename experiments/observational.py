"""EXP0, observational: every head's query norm and attention entropy over a corpus.

    spectra-lens observe [--model M] [--corpus C] [--out DIR] ...

Stages, each stored so that a rerun resumes and analysis can be redone without the model:
corpus -> token shards with a document id per sequence (`shards/`) -> per shard, the
per-(document, head) moments of every per-token variable (`moments/*.npz`; per-token records
`records/*.parquet` too with --records) -> per-head statistics,
clustered by document (`head_summary.csv`, `significant_heads.csv`, `consistent_heads.csv`,
`layer_statistics.csv`) -> the observational slope against the causal gain (`agreement.csv`,
`agreement_summary.csv`; a finite difference from real forward passes on a few sequences) ->
figures (`figures/`) -> `manifest.json` (status "complete" last). Column meanings:
docs/DATA_DICTIONARY.md.
"""


import dataclasses
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from scipy import stats as sps

from spectra_lens.blocked_capture import BlockedCapture
from spectra_lens.capture import MetricCapture
from spectra_lens.config import ObservationalConfig, attention_path, fd_sequences_for
from spectra_lens.data.prepare import corpus_from_spec, prepare
from spectra_lens.data.shards import (
    MANIFEST_NAME,
    ShardManifest,
    load_shard,
    load_tokens,
    read_manifest,
)
from spectra_lens.errors import SpectraError
from spectra_lens.io import atomic_write
from spectra_lens.layout import attention_layout
from spectra_lens.models import DEFAULT_MODEL
from spectra_lens.present import display
from spectra_lens.present import figures as figs
from spectra_lens.reference import ReferenceNorm, estimate_reference_norm, selection_documents
from spectra_lens.runs import outputs as O
from spectra_lens.runs import pipeline as P
from spectra_lens.runs.distributed import Group
from spectra_lens.runs.rundir import RunDir
from spectra_lens.stats import decisions, inference
from spectra_lens.stats.counterfactual import NORM_SHARE_COLUMNS, norm_share
from spectra_lens.stats.moments import MOMENT_VARIABLES, DocumentMoments, counterfactual_variables
from spectra_lens.sweep import head_curves
from spectra_lens.validate import check_context

__all__ = ["ObservationalResult", "analyze", "collect", "command", "finite_difference_gain",
           "merge", "read_moments", "run"]

log = logging.getLogger(__name__)
EXPERIMENT = "observational"
# The original project's significant_heads.csv and layer_statistics.csv columns, in its order.
ORIGINAL_SIGNIFICANT = ("sample_id", "layer", "head", "mean_q_norm", "mean_entropy",
                        "mean_max_attn", "mean_k_eff", "r_q_entropy", "p_q_entropy",
                        "r_q_max_attn", "r_q_k_eff", "num_tokens")
ORIGINAL_LAYER = ("layer", "mean_abs_r", "std_abs_r", "frac_significant")
_FD_STEP = 0.05  # δ of the finite difference (H(e^δ) − H(e^−δ)) / 2δ, in ln α


@dataclasses.dataclass(frozen=True, repr=False)
class ObservationalResult:
    """The tables of one observational run (figures, moments and records stay under `out`)."""

    out: Path
    head_summary: pd.DataFrame
    significant_heads: pd.DataFrame
    consistent_heads: pd.DataFrame
    layer_statistics: pd.DataFrame
    agreement: pd.DataFrame
    agreement_summary: pd.DataFrame

    def __repr__(self) -> str:
        n = len(self.head_summary)
        verdicts = self.agreement["verdict"].value_counts().to_dict()
        return (f"ObservationalResult(out={str(self.out)!r}, heads={n}, "
                f"significant={len(self.significant_heads)}, consistent={len(self.consistent_heads)}, "
                f"verdicts={verdicts})")

    def _repr_html_(self) -> str:
        top = self.head_summary.reindex(
            self.head_summary["r_logq_entropy"].abs().sort_values(ascending=False).index
        ).head(10)
        cols = ["layer", "head", "r_logq_entropy", "r_logq_entropy_given_pos",
                "r_logq_entropy_mediator_adjusted", "q_doc_cr2_logq_entropy", "significant"]
        return (f"<b>{self!r}</b><br>strongest heads:"
                + top[cols].to_html(index=False, float_format="%.3g"))


def _shards(cfg: ObservationalConfig, run: RunDir, model, source, model_name: str,
            ) -> ShardManifest:
    """Token shards of the run: an existing prepared shard directory, or written under out/."""
    if isinstance(source, ShardManifest):
        vocab = model.cfg.d_vocab
        if source.meta.get("vocab_size") not in (None, vocab) or source.tokenizer != model_name:
            log.warning("shards in %s were tokenized by %r (vocab %s); the model is %r (vocab %s)",
                        source.directory, source.tokenizer, source.meta.get("vocab_size"),
                        model_name, vocab)
        if (cfg.seq_len, cfg.n_sequences) != (source.seq_len, source.n_sequences):
            log.warning("using the prepared shards as they are: seq_len=%d, n_sequences=%d "
                        "(--seq-len/--n-sequences apply only when tokenizing a corpus)",
                        source.seq_len, source.n_sequences)
        return source
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise SpectraError("the model has no tokenizer; pass --corpus as a prepared shard directory")
    # Listed in the run's manifest before they exist, so that --overwrite removes them.
    for i in range(-(-cfg.n_sequences // cfg.shard_size)):
        run.output(f"shards/shard_{i:05d}.safetensors")
    run.output(f"shards/{MANIFEST_NAME}")
    # overwrite: a run that replaces a finished one may tokenize differently (seq_len, corpus).
    return prepare(
        source, tokenizer, run.file("shards"), seq_len=cfg.seq_len, n_sequences=cfg.n_sequences,
        shard_size=cfg.shard_size, tokenizer_name=model_name, overwrite=cfg.overwrite,
    )


def _documents(manifest: ShardManifest) -> np.ndarray:
    """The document id of every sequence; each sequence its own document for old shards."""
    docs = manifest.documents_of(0, manifest.n_sequences)
    if docs is None:
        warnings.warn(
            f"the shards in {manifest.directory} record no document ids (written before "
            "documents were recorded); each sequence is treated as its own document, so the "
            "clustered tests ignore any dependence between sequences of one document. "
            "Re-prepare the shards to cluster by document.", RuntimeWarning, stacklevel=3)
        return np.arange(manifest.n_sequences)
    return np.asarray(docs, dtype=np.int64)


def _variables(top_mass: float | None) -> tuple[str, ...]:
    if top_mass is None:  # the top-mass metrics are NaN: leave them out of the moments
        return tuple(v for v in MOMENT_VARIABLES if not v.startswith("k_eff_top90"))
    return MOMENT_VARIABLES


REFERENCE_FILE = "reference_norm.npz"


def _counterfactual_path(path: Path) -> Path:
    """The counterfactual moments beside the moment file `path` (moments/shard_XXXXX.npz)."""
    return path.with_name(path.name.replace("shard_", "counterfactual_", 1))


def reference_norm(model, manifest: ShardManifest, run, *, seed: int, batch_size: int,
                   min_position: int = 1, attention: str = "eager",
                   progress: bool = False) -> ReferenceNorm | None:
    """The heads' reference query norms (`spectra_lens.reference`) from the selection documents
    (`selection_documents(documents, seed=seed)`: a seeded quarter of the run's documents, which
    the norm share leaves out), stored as `reference_norm.npz` and read back on a rerun; None
    where the run has fewer than 2 documents (no counterfactual). `progress`: a bar over the
    selection sequences (a forward pass each, up to the last layer's query)."""
    path = run.output(REFERENCE_FILE)
    source = _reference_provenance(manifest)
    if path.exists():
        ref = ReferenceNorm.load(path)
        recorded = {k: ref.meta.get(k) for k in source}
        if recorded != source:
            differ = next(k for k in source if recorded[k] != source[k])
            was, now = ((repr(v)[:16] + "...") if differ == "shards_sha256" else repr(v)
                        for v in (recorded[differ], source[differ]))
            raise SpectraError(
                f"{path} was computed from {differ} {was}, but the shards in {manifest.directory} "
                f"now have {now}: the shards changed since (re-prepared?); rerun with --overwrite "
                f"to start the run again")
        return ref
    documents = _documents(manifest)
    chosen = selection_documents(documents, seed=seed)
    if chosen.size == 0:
        return None
    t0 = time.time()
    rows = np.flatnonzero(np.isin(documents, chosen))
    tokens = torch.cat([load_tokens(manifest, start=int(i), stop=int(i) + 1) for i in rows])
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    n_bins = manifest.seq_len.bit_length()  # bins 0 … ⌊log2 seq_len⌋, the last position's
    ref = estimate_reference_norm(model, batches, chosen, n_bins=n_bins, min_position=min_position,
                                  attention=attention_path(attention, manifest.seq_len), progress=progress)
    ref = dataclasses.replace(ref, meta={**ref.meta, **source})
    ref.save(path)
    run.timed("reference_norm_s", time.time() - t0)
    return ref


def _reference_provenance(manifest: ShardManifest) -> dict:
    """What the reference norm records of the tokens it was estimated from (the selection rows
    may lie in any shard): the corpus, the tokenizer and one digest of every shard's sha256."""
    digest = hashlib.sha256("".join(s.sha256 for s in manifest.shards).encode()).hexdigest()
    return {"corpus": manifest.corpus, "tokenizer": manifest.tokenizer, "shards_sha256": digest}


def collect(model, manifest: ShardManifest, run: RunDir, *, batch_size: int,
            top_mass: float | None = 0.9, min_position: int = 1, records: bool = True,
            progress: bool = True, shards: Sequence[int] | None = None,
            reference: ReferenceNorm | None = None, attention: str = "eager") -> list[Path]:
    """Per-document moments of every shard (or of `shards`, this process's share under
    torchrun) into `moments/shard_XXXXX.npz`, and per-token records into
    `records/shard_XXXXX.parquet` when `records`; finished shards are skipped. With `reference`
    the capture also gives the exact norm counterfactual H_cf, whose moments
    (`counterfactual_variables`) go to `moments/counterfactual_XXXXX.npz`. `attention`: "eager"
    reads the model's `hook_pattern`, "blocked" recomputes attention in query blocks
    (`blocked_capture`, the same metrics and counterfactual), "auto" chooses by the shards' sequence
    length (`config.attention_path`). Returns the moment files of the shards it was given."""
    layout = attention_layout(model)
    device = next(model.parameters()).device
    if attention_path(attention, manifest.seq_len) == "blocked":
        cap = BlockedCapture(layout, top_mass=top_mass, reference=reference)
    else:
        cap = MetricCapture(layout, top_mass=top_mass, reference=reference)
    documents = _documents(manifest)
    variables = _variables(top_mass)
    paths = []
    mine = None if shards is None else set(shards)
    todo = [(i, s) for i, s in enumerate(manifest.shards) if mine is None or i in mine]
    bar = display.progress_bar(total=sum(s.n_sequences for _, s in todo), desc="capture", unit="seq",
                               enabled=progress)
    for i, info in todo:
        path = run.output(f"moments/shard_{i:05d}.npz")
        record_path = run.output(f"records/shard_{i:05d}.parquet") if records else None
        cf_path = run.output(_counterfactual_path(path).relative_to(run.path).as_posix()) \
            if reference is not None else None
        paths.append(path)
        if (path.exists() and all(p is None or p.exists() for p in (record_path, cf_path))
                and check_provenance(path, manifest, i)):
            bar.update(info.n_sequences)
            continue
        t0 = time.time()
        tokens = load_shard(manifest, i)
        if len(tokens) and int(tokens.max()) >= model.cfg.d_vocab:
            raise SpectraError(
                f"shard {manifest.shard_path(i)} holds token id {int(tokens.max())}, expected ids "
                f"below the model's vocabulary size {model.cfg.d_vocab}: tokenizer mismatch?"
            )
        parts, frames, cf_parts = [], [], []
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size].to(device)
            tm = cap.run(model, batch)  # ends at the last layer's attention: no logits
            first = info.offset + start
            docs = documents[first : first + len(batch)]
            parts.append(DocumentMoments.from_metrics(
                tm, docs, min_position=min_position, variables=variables))
            if reference is not None:
                cf_parts.append(DocumentMoments.from_metrics(
                    tm, docs, min_position=min_position,
                    variables=counterfactual_variables(batch.shape[1], min_position)))
            if records:
                frame = tm.to_frame(sequence_ids=list(range(first, first + len(batch))), shard=i)
                per_sequence = len(frame) // len(batch)  # rows ordered by sequence first
                frame.insert(1, "document", np.repeat(docs, per_sequence).astype("int64"))
                frames.append(frame)
            bar.update(len(batch))
        if records:
            run.write_parquet(record_path.relative_to(run.path).as_posix(),
                              pd.concat(frames, ignore_index=True))
        if reference is not None:
            cf = DocumentMoments.concat(cf_parts)
            cf.meta.update(selection_documents=[int(d) for d in reference.documents],
                           reference=reference.manifest())
            cf.save(cf_path)
        moments = DocumentMoments.concat(parts)
        moments = dataclasses.replace(moments, meta={**moments.meta, **provenance(manifest, i)})
        moments.save(path)
        run.timed("capture_s", time.time() - t0)
    bar.close()
    return paths


def provenance(manifest: ShardManifest, i: int) -> dict:
    """What a moment file records of the tokens it was computed from: the shard's index and
    sha256, the shard set's corpus and tokenizer."""
    return {"shard": i, "shard_sha256": manifest.shards[i].sha256, "corpus": manifest.corpus,
            "tokenizer": manifest.tokenizer}


def check_provenance(path: Path, manifest: ShardManifest, i: int) -> bool:
    """True when the moment file `path` was computed from shard `i` of `manifest` as it is now;
    False for a file that records no provenance (written by an older release: it is redone);
    SpectraError naming the first difference when it was computed from other tokens (the
    shards were re-prepared since), so that a resumed or merged run never mixes two corpora."""
    recorded = DocumentMoments.load(path).meta
    if "shard_sha256" not in recorded:
        log.info("%s records no shard sha256 (an older release); it is computed again", path)
        return False
    for key, now in provenance(manifest, i).items():
        if recorded.get(key) != now:
            was, now = (repr(v)[:16] + "..." if key == "shard_sha256" else repr(v)
                        for v in (recorded.get(key), now))
            raise SpectraError(
                f"{path} was computed from {key} {was}, but shard {i} of "
                f"{manifest.directory} now has {now}: the shards changed since (re-prepared?) "
                f"and the two cannot be mixed; pass --overwrite to compute every shard again, or "
                f"restore the shards it was computed from")
    return True


def read_moments(paths: list[Path]) -> DocumentMoments:
    """Merge per-shard moment files (concatenation; rows of one document merge exactly)."""
    return DocumentMoments.concat([DocumentMoments.load(p) for p in paths])


def finite_difference_gain(model, manifest: ShardManifest, *, n_sequences: int, step: float,
                           min_position: int = 1, ci: float = 0.95,
                           progress: bool = False) -> pd.DataFrame:
    """dH/d ln α of every head from real forward passes: (H(e^δ) − H(e^−δ)) / 2δ.

    The head's own query is scaled by α = e^±δ in the real forward pass
    (`sweep.head_curves(method="exact")`), on `n_sequences` sequences taken from as many
    different documents as possible (the first sequence of documents spread over the run).
    Columns: layer, head, gain_fd with a t interval over sequences (gain_fd_ci_low/high),
    gain_analytic_sample (−Var_p(s) on the same sequences: the two agree, the identity check),
    n_sequences_fd.
    """
    documents = _documents(manifest)
    firsts = np.flatnonzero(np.r_[True, documents[1:] != documents[:-1]])
    pick = firsts[np.linspace(0, firsts.size - 1, min(n_sequences, firsts.size)).round().astype(int)]
    if pick.size < n_sequences:  # fewer documents than sequences asked for: fill in order
        rest = np.setdiff1d(np.arange(manifest.n_sequences), pick)[: n_sequences - pick.size]
        pick = np.sort(np.r_[pick, rest])
    tokens = torch.cat([load_tokens(manifest, start=int(s), stop=int(s) + 1)
                        for s in np.unique(pick)])
    sweep = head_curves(model, tokens, (math.exp(-step), math.exp(step)), method="exact",
                        min_position=min_position, max_rows=2 * len(tokens), progress=progress)
    h = sweep.metrics.entropy.double()  # [alpha, batch, layer, head]
    fd = ((h[1] - h[0]) / (2 * step)).numpy()  # [batch, layer, head]
    n = fd.shape[0]
    mean = fd.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = (sps.t.ppf(0.5 + ci / 2, n - 1) * fd.std(axis=0, ddof=1) / math.sqrt(n)
                if n > 1 else np.nan)
    n_layers, n_heads = mean.shape
    layers = np.repeat(np.asarray(sweep.layers), n_heads)
    return pd.DataFrame({
        "layer": layers, "head": np.tile(np.arange(n_heads), n_layers),
        "gain_fd": mean.ravel(), "gain_fd_ci_low": (mean - half).ravel(),
        "gain_fd_ci_high": (mean + half).ravel(),
        "gain_analytic_sample": sweep.local_gain.double().mean(0).numpy().ravel(),
        "n_sequences_fd": n,
    })


def analyze(moments: DocumentMoments, cfg: ObservationalConfig, *,
            finite_difference: pd.DataFrame | None = None,
            counterfactual: DocumentMoments | None = None) -> dict[str, pd.DataFrame]:
    """Per-head, per-layer and agreement tables from the per-document moments (no model);
    `counterfactual` (the norm counterfactual's moments) gives agreement's norm-share columns."""
    alpha = cfg.fdr_alpha
    summary = decisions.head_statistics(moments, n_boot=cfg.n_boot, alpha=alpha, seed=cfg.seed)
    keys = ["layer", "head"]
    test = "doc_cr2"
    for c in ("", "_given_pos", "_mediator_adjusted"):  # BH family: every head, per column
        summary["significant" + c] = summary[f"q_{test}_logq_entropy{c}"] < alpha
    # The original project's columns, with its meaning: r of ‖q‖ (not its log), token-level p.
    original = {"sample_id": 0}
    original["r_q_entropy"], original["p_q_entropy"] = inference.pearson_from_moments(
        moments, "q_norm", "entropy")
    original["r_q_max_attn"], _ = inference.pearson_from_moments(moments, "q_norm", "max_attn")
    if "k_eff_top90" in moments.variables:
        original["r_q_k_eff"], _ = inference.pearson_from_moments(moments, "q_norm", "k_eff_top90")
        original["mean_k_eff"] = summary["mean_k_eff_top90"].to_numpy()
    else:  # --top-mass none: the original's k_eff was not captured
        original["r_q_k_eff"] = np.nan
        original["mean_k_eff"] = np.nan
    original["num_tokens"] = summary["n_tokens"].to_numpy()
    for name, values in original.items():
        summary[name] = values
    consistency = decisions.fold_consistency(moments, n_folds=cfg.n_folds, alpha=alpha,
                                         threshold=cfg.consistency_threshold, seed=cfg.seed)
    cons_cols = keys + ["n_folds", "frac_same_sign", "frac_significant_same_sign", "consistent"]
    summary = summary.merge(consistency[cons_cols], on=keys, how="left")
    if moments.n_documents >= 4:
        rep = decisions.document_replication(moments, alpha=alpha, seed=cfg.seed)
        summary = summary.merge(rep, on=keys, how="left")
    lead = list(ORIGINAL_SIGNIFICANT) + [
        "significant", "r_logq_entropy", "slope_logq_entropy", "slope_ci_low_logq_entropy",
        "slope_ci_high_logq_entropy", f"p_{test}_logq_entropy", f"q_{test}_logq_entropy",
        "significant_given_pos", "r_logq_entropy_given_pos", "significant_mediator_adjusted",
        "r_logq_entropy_mediator_adjusted", "n_documents"]
    summary = summary[lead + [c for c in summary.columns if c not in lead]]
    agreement = decisions.agreement(moments, margin=cfg.equivalence_margin, alpha=alpha,
                                    finite_difference=finite_difference)
    agreement = _with_norm_share(agreement, counterfactual, cfg)
    return {
        "head_summary": summary,
        "significant_heads": summary[summary["significant"]].reset_index(drop=True),
        "consistent_heads": consistency[consistency["consistent"]].reset_index(drop=True),
        "layer_statistics": _layer_statistics(summary),
        "agreement": agreement,
        "agreement_summary": decisions.agreement_summary(agreement),
    }


def _with_norm_share(agreement: pd.DataFrame, counterfactual: DocumentMoments | None,
                     cfg: ObservationalConfig) -> pd.DataFrame:
    """agreement with the norm-share columns (`stats.counterfactual.norm_share`, over the
    documents outside the selection) right after temperature_share; NaN without counterfactual
    moments."""
    if counterfactual is None:
        block = pd.DataFrame({c: np.nan for c in NORM_SHARE_COLUMNS}, index=agreement.index)
    else:
        ns = norm_share(counterfactual, n_boot=cfg.n_boot, seed=cfg.seed,
                        exclude_documents=counterfactual.meta.get("selection_documents", ()))
        block = agreement[["layer", "head"]].merge(ns, on=["layer", "head"], how="left")
        block = block[list(NORM_SHARE_COLUMNS)].set_axis(agreement.index)
    cols = list(agreement.columns)
    at = cols.index("temperature_share") + 1 if "temperature_share" in cols else len(cols)
    return pd.concat([agreement[cols[:at]], block, agreement[cols[at:]]], axis=1)


def _layer_statistics(summary: pd.DataFrame) -> pd.DataFrame:
    """The original's per-layer columns (over |r_q_entropy|, with our significance) and ours."""
    by = summary.groupby("layer", sort=True)
    out = pd.DataFrame({
        "mean_abs_r": by["r_q_entropy"].apply(lambda r: r.abs().mean()),
        "std_abs_r": by["r_q_entropy"].apply(lambda r: r.abs().std(ddof=1)),
        "frac_significant": by["significant"].mean(),
        "n_heads": by.size(),
        "mean_r_logq_entropy": by["r_logq_entropy"].mean(),
        "mean_abs_r_logq_entropy": by["r_logq_entropy"].apply(lambda r: r.abs().mean()),
        "mean_r_logq_entropy_given_pos": by["r_logq_entropy_given_pos"].mean(),
        "mean_r_logq_entropy_mediator_adjusted": by["r_logq_entropy_mediator_adjusted"].mean(),
        "frac_significant_mediator_adjusted": by["significant_mediator_adjusted"].mean(),
        "median_slope_logq_entropy_given_pos": by["slope_logq_entropy_given_pos"].median(),
    })
    return out.rename_axis("layer").reset_index()


OUTPUTS = O.Outputs(
    "EXP0", "observational: query norm vs attention entropy", "spectra-lens observe",
    (
        O.Table("agreement.csv", "observational slope (given log position) vs causal gain, per "
                "head: equivalence (TOST) and difference tests (verdict rule: "
                "stats.decisions.verdict_rule, margin in the manifest)", ("obs_slope",),
                ("layer", "head", "verdict", "direction", "obs_slope", "obs_slope_ci_low",
                 "obs_slope_ci_high", "gain_analytic", "gain_ci_low", "gain_ci_high",
                 "difference", "difference_se", "p_difference_doc_cr2", "q_difference_doc_cr2",
                 "p_equivalence", "equivalence_margin", "gain_fd", "ratio", "temperature_share",
                 "obs_slope_raw")),
        O.Table("agreement_summary.csv", "agreement across heads and by layer", (),
                ("layer", "n_heads", "n_equivalent_to_a_temperature", "n_differs",
                 "n_undetermined", "n_differs_weaker", "n_differs_stronger",
                 "n_differs_opposite_sign", "spearman_obs_slope_gain", "median_ratio"),
                rows=200),
        O.Table("head_summary.csv", "strongest heads", ("r_logq_entropy",),
                ("layer", "head", "mean_q_norm", "mean_entropy", "r_logq_entropy",
                 "r_ci_low_logq_entropy", "r_ci_high_logq_entropy", "q_doc_cr2_logq_entropy",
                 "r_logq_entropy_given_pos", "r_logq_entropy_mediator_adjusted",
                 "q_doc_cr2_logq_entropy_mediator_adjusted", "r_logq_entropy_nosink",
                 "r_logq_log_dir_spread", "significant", "significant_mediator_adjusted",
                 "consistent", "replicated", "n_documents")),
        O.Table("significant_heads.csv", "significant heads (document-clustered CR2 test, BH)",
                ("r_logq_entropy",), ORIGINAL_SIGNIFICANT + (
                    "r_logq_entropy", "q_doc_cr2_logq_entropy", "r_logq_entropy_mediator_adjusted")),
        O.Table("consistent_heads.csv", "heads consistent across document folds",
                ("frac_significant_same_sign",),
                ("layer", "head", "n_folds", "frac_same_sign", "frac_significant_same_sign",
                 "consistent")),
        O.Table("layer_statistics.csv", "layer statistics", (),
                ORIGINAL_LAYER + ("n_heads", "mean_r_logq_entropy",
                                  "mean_r_logq_entropy_mediator_adjusted",
                                  "frac_significant_mediator_adjusted"), rows=200),
        O.Table("strongest_heads_sample.csv", "sampled tokens of the strongest heads", (), (), rows=0),
    ),
)


def strongest_heads_sample(records: pd.DataFrame, summary: pd.DataFrame, *, top_heads: int,
                           min_position: int, max_points: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Up to `max_points` random tokens (position ≥ min_position) of each of the `top_heads` heads
    with the largest |r(ln ‖q‖, H)|, in that order: the data of the scatter figure."""
    strongest = summary.reindex(summary["r_logq_entropy"].abs().sort_values(ascending=False).index)
    rng = np.random.default_rng(seed)
    cols = ["layer", "head", "position", "q_norm", "entropy"]
    frames = []
    for l, h in strongest[["layer", "head"]].head(top_heads).to_numpy():
        sub = records[(records["layer"] == l) & (records["head"] == h)
                      & (records["position"] >= min_position)]
        if len(sub) > max_points:
            sub = sub.iloc[np.sort(rng.choice(len(sub), max_points, replace=False))]
        frames.append(sub[cols])
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    # float64, which a CSV holds exactly: the figure drawn from the file equals the run's own
    return out.astype({"layer": int, "head": int, "position": int, "q_norm": float, "entropy": float})


def figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """Every EXP0 figure, from the tables alone (the run's own or its CSVs)."""
    out: dict[str, go.Figure] = {}
    summary = tables.get("head_summary")
    if summary is not None:
        out["heatmap_r_logq_entropy"] = figs.head_heatmap(
            summary, "r_logq_entropy", mark="significant",
            title="r(ln‖q‖, entropy) per head (dots: significant, document-clustered test)")
        out["heatmap_r_logq_entropy_mediator_adjusted"] = figs.head_heatmap(
            summary, "r_logq_entropy_mediator_adjusted", mark="significant_mediator_adjusted",
            title="partial r(ln‖q‖, entropy | ln position, sink mass): mediator-adjusted")
        out["heatmap_r_logq_entropy_nosink"] = figs.head_heatmap(
            summary, "r_logq_entropy_nosink", title="r(ln‖q‖, entropy without the first key)")
        out["r_distribution"] = figs.r_distribution(
            summary, {"r_logq_entropy": "raw r", "r_logq_entropy_given_pos": "| ln position",
                      "r_logq_entropy_mediator_adjusted": "| ln position, sink mass "
                                                          "(mediator-adjusted)"},
            title="per-head r(ln‖q‖, entropy), raw and controlled")
    if tables.get("layer_statistics") is not None:
        out["layer_statistics"] = figs.layer_summary(
            tables["layer_statistics"], title="query norm vs entropy by layer")
    if tables.get("agreement") is not None:
        out["agreement"] = figs.agreement_scatter(tables["agreement"])
    sample = tables.get("strongest_heads_sample")
    if sample is not None and len(sample):
        heads = list(dict.fromkeys(zip(sample["layer"].astype(int), sample["head"].astype(int))))
        out["scatter_strongest_heads"] = figs.norm_entropy_scatter(sample, heads)
    return out


def read_records(paths: list[Path]) -> pd.DataFrame:
    """Concatenate per-shard record files (raises SpectraError naming an unreadable file)."""
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_parquet(p))
        except Exception as e:
            raise SpectraError(f"record file {p} is unreadable ({e}); delete it and rerun to redo it") from e
    return pd.concat(frames, ignore_index=True)


def run(cfg: ObservationalConfig = ObservationalConfig(), *, model=None,
        progress: bool = True) -> ObservationalResult | None:
    """The whole observational run into `cfg.out`; resumes an unfinished run of the same config.

    The config, the corpus and `--out` are checked before anything is written; the manifest is
    written once the model has loaded and fits the sequences; a later failure marks it "failed".
    Under `torchrun` each rank captures its share of the shards and rank 0 merges the
    per-document moments; the other ranks return None. A rank that dies leaves its unfinished
    shards missing; the same command (any number of processes) redoes only those.
    """
    cfg.validate()
    # Resolve the corpus first: a missing or empty file fails before any model is loaded.
    source = corpus_from_spec(cfg.corpus)
    inputs = []
    if isinstance(source, ShardManifest):
        inputs = [source.directory]
        if source.n_sequences < 2:
            raise SpectraError(
                f"the shards in {source.directory} hold {source.n_sequences} sequence; the "
                f"statistics (sequence bootstrap, replication split) need at least 2"
            )
    if model is None:
        model_name = cfg.model or DEFAULT_MODEL
    else:  # provenance: not the default model's name for a model the caller loaded
        model_name = cfg.model or f"pre-loaded model ({getattr(model.cfg, 'model_name', '?')})"
    # Under torchrun every rank runs this: rank 0 owns the run directory (lock, manifest) and
    # prepares the shards, each rank captures its share, rank 0 merges (spectra_lens.runs.distributed).
    group = Group.from_env(device=cfg.device)
    try:
        if group.detached:  # one share of the shards, into its own run directory; no tables
            _run_share(cfg, group, model, source, model_name, inputs, progress=progress)
            return None
        if not group.is_main:
            _capture_share(cfg, group, model, source, progress=progress)
            return None
        return _run_main(cfg, group, model, source, model_name, inputs, progress=progress)
    finally:
        group.close()


class _ShardWriter:
    """What `collect` needs of a run directory, for ranks other than 0: the shard files of the
    run rank 0 started (atomic writes; rank 0 lists them in the manifest before they exist)."""

    def __init__(self, path: Path):
        self.path = path

    def output(self, name: str) -> Path:
        return self.path / name

    def write_parquet(self, name: str, frame: pd.DataFrame) -> Path:
        return atomic_write(self.output(name), lambda tmp: frame.to_parquet(tmp, index=False))

    def timed(self, name: str, seconds: float) -> None:
        pass


def _load(cfg: ObservationalConfig, group: Group, model, *, progress: bool = False):
    return P.load_run_model(cfg, model, device=group.device(cfg.device), progress=progress)[0]


def _collect(cfg: ObservationalConfig, group: Group, model, manifest: ShardManifest, run, *,
             progress: bool, reference: ReferenceNorm | None = None) -> list[Path]:
    return collect(model, manifest, run, batch_size=cfg.batch_size, top_mass=cfg.top_mass,
                   min_position=cfg.min_position, records=cfg.records, progress=progress,
                   shards=group.shards(len(manifest.shards)), reference=reference,
                   attention=cfg.attention)


def _capture_share(cfg: ObservationalConfig, group: Group, model, source, *, progress: bool) -> None:
    """A rank other than 0: wait for the shards, capture this rank's share, wait for the rest."""
    model = _load(cfg, group, model)
    group.barrier()  # rank 0 has started the run and written the shards
    manifest = source if isinstance(source, ShardManifest) else read_manifest(Path(cfg.out) / "shards")
    ref_path = Path(cfg.out) / REFERENCE_FILE  # rank 0 wrote it before the barrier
    reference = ReferenceNorm.load(ref_path) if ref_path.exists() else None
    _collect(cfg, group, model, manifest, _ShardWriter(Path(cfg.out)), progress=False,
             reference=reference)
    group.barrier()  # every rank's shards are written


def _run_main(cfg, group: Group, model, source, model_name: str, inputs, *, progress: bool):
    with P.run_directory(cfg, EXPERIMENT, inputs=inputs) as rd:
        t0 = time.time()
        model = _load(cfg, group, model, progress=progress)
        rd.timed("load_model_s", time.time() - t0)
        check_context(model, source.seq_len if isinstance(source, ShardManifest) else cfg.seq_len)
        resuming = rd.start(cfg, overwrite=cfg.overwrite)
        t0 = time.time()
        manifest = _shards(cfg, rd, model, source, model_name)
        rd.timed("shards_s", time.time() - t0)
        reference = reference_norm(model, manifest, rd, seed=cfg.seed, batch_size=cfg.batch_size,
                                   min_position=cfg.min_position, attention=cfg.attention,
                                   progress=progress)
        # Every rank's shard outputs are listed in the run's manifest before any is written.
        n = len(manifest.shards)
        paths = [rd.output(f"moments/shard_{i:05d}.npz") for i in range(n)]
        record_paths = [rd.output(f"records/shard_{i:05d}.parquet") for i in range(n)] \
            if cfg.records else []
        paths_cf = [rd.output(f"moments/counterfactual_{i:05d}.npz") for i in range(n)] \
            if reference is not None else []
        group.barrier()  # the shards exist: every rank may start
        _collect(cfg, group, model, manifest, rd, progress=progress, reference=reference)
        group.barrier()  # every rank's shards are written
        missing = [p.name for p in paths + record_paths + paths_cf if not p.exists()]
        if missing:
            raise SpectraError(f"shards not captured: {', '.join(missing)}; rerun the same command "
                               f"to redo them")
        layout = attention_layout(model)
        tables = _tables(cfg, rd, manifest, paths, record_paths, model, progress=progress,
                         model_info=P.model_info(model_name, layout, model), resumed=resuming)
    return ObservationalResult(out=rd.path, **tables)


def _tables(cfg: ObservationalConfig, rd, manifest: ShardManifest, paths: list[Path],
            record_paths: list[Path], model, *, model_info: dict, progress: bool = False,
            **info) -> dict[str, pd.DataFrame]:
    """After capture: the finite-difference gain (needs `model`), the tables from the moment
    files `paths`, the records' sample, the figures, and the finished manifest."""
    fd = None
    n_fd = fd_sequences_for(cfg, manifest.seq_len)
    if n_fd:
        t0 = time.time()
        fd = finite_difference_gain(model, manifest, n_sequences=n_fd,
                                    step=_FD_STEP, min_position=cfg.min_position,
                                    progress=progress)
        rd.timed("finite_difference_s", time.time() - t0)
    t0 = time.time()
    with display.stages("statistics", ["moments", "per-head statistics"]
                        + (["records sample"] if cfg.records else []) + ["figures"],
                        enabled=progress) as stage:
        stage("moments")
        moments = read_moments(paths)
        cf_paths = [_counterfactual_path(p) for p in paths]
        counterfactual = read_moments(cf_paths) if all(p.exists() for p in cf_paths) else None
        stage("per-head statistics")
        tables = analyze(moments, cfg, finite_difference=fd, counterfactual=counterfactual)
        written = dict(tables)
        if cfg.records:
            stage("records sample")
            records = read_records(record_paths)
            written["strongest_heads_sample"] = strongest_heads_sample(
                records, tables["head_summary"], top_heads=cfg.top_heads,
                min_position=cfg.min_position, seed=cfg.seed)
            del records
        rd.timed("statistics_s", time.time() - t0)
        t0 = time.time()
        stage("figures")
        drawn = figures(written)
    O.write_outputs(rd, written, drawn, images=cfg.images, progress=progress)
    rd.timed("figures_s", time.time() - t0)
    rd.finish(
        model=model_info,
        corpus=manifest.corpus, n_sequences=manifest.n_sequences, seq_len=manifest.seq_len,
        n_documents=moments.n_documents,
        max_document_share=float(np.bincount(_documents(manifest)).max()
                                 / manifest.n_sequences),
        n_tokens_per_head=int(moments.n.sum() / max(1, len(moments.layers))),
        attention=attention_path(cfg.attention, manifest.seq_len),
        finite_difference_sequences=n_fd,
        test="document-clustered CR2 Wald test, Bell-McCaffrey df (stats.inference.cluster_wald)",
        verdict_rule=decisions.verdict_rule(cfg.equivalence_margin, cfg.fdr_alpha),
        equivalence_margin=cfg.equivalence_margin,
        headline="slope and partial r of entropy on ln ||q|| given ln(position + 1); "
                 "*_mediator_adjusted: given ln(position + 1) and the sink mass, a mediator of "
                 "the norm's effect (scaling q changes it), not a confounder",
        verdicts=tables["agreement"]["verdict"].value_counts().to_dict(),
        counterfactual=_counterfactual_manifest(counterfactual),
        seed=cfg.seed, **info,
    )
    return tables


def _counterfactual_manifest(counterfactual: DocumentMoments | None) -> dict:
    """The manifest's record of the norm counterfactual: the reference norm and the documents."""
    if counterfactual is None:
        return {"computed": False}
    selection = counterfactual.meta.get("selection_documents", [])
    return {"computed": True, "norm_share": "(Var H - Var H_cf) / Var H over the tokens of the "
            "documents outside the selection; intervals: percentile, documents resampled",
            "reference_norm": counterfactual.meta.get("reference", {}),
            "measured_documents": int(np.setdiff1d(counterfactual.documents, selection).size)}


def _run_share(cfg: ObservationalConfig, group: Group, model, source, model_name: str, inputs, *,
               progress: bool) -> None:
    """A detached share (SPECTRA_SHARD_RANK / SPECTRA_SHARD_WORLD): capture shards rank, rank +
    world, ... of prepared shards into the run directory `cfg.out`; `merge` makes the tables."""
    if not isinstance(source, ShardManifest):
        raise SpectraError(
            "a share of the shards (SPECTRA_SHARD_RANK/SPECTRA_SHARD_WORLD) needs prepared shards, "
            "so that every share reads the same sequences and document ids: run `spectra-lens "
            "prepare` once and pass its directory as --corpus")
    with P.run_directory(cfg, EXPERIMENT, inputs=inputs) as rd:
        t0 = time.time()
        model = _load(cfg, group, model, progress=progress)
        rd.timed("load_model_s", time.time() - t0)
        check_context(model, source.seq_len)
        resuming = rd.start(cfg, overwrite=cfg.overwrite)
        reference = reference_norm(model, source, rd, seed=cfg.seed, batch_size=cfg.batch_size,
                                   min_position=cfg.min_position, attention=cfg.attention,
                                   progress=progress)
        mine = group.shards(len(source.shards))
        for i in mine:  # listed before they exist, so that --overwrite removes them
            rd.output(f"moments/shard_{i:05d}.npz")
            if cfg.records:
                rd.output(f"records/shard_{i:05d}.parquet")
            if reference is not None:
                rd.output(f"moments/counterfactual_{i:05d}.npz")
        _collect(cfg, group, model, source, rd, progress=progress, reference=reference)
        layout = attention_layout(model)
        rd.finish(model=P.model_info(model_name, layout, model), shards_dir=str(source.directory),
                  share={"rank": group.rank, "world": group.world, "shards": mine,
                         "n_shards": len(source.shards),
                         "shard_sha256": [source.shards[i].sha256 for i in mine]},
                  corpus=source.corpus,
                  resumed=resuming)


# How far two shares' reference norms may differ, in ln r: rounding only. Every share estimates
# r itself, from the same selection documents of the same prepared shards with the same model and
# settings, so shares on one kind of device compute the same numbers.
_SHARE_REFERENCE_ATOL = 1e-6


def _share_reference(parts: list[tuple[Path, dict]]) -> ReferenceNorm | None:
    """The reference norm of the shares `parts` [(run directory, manifest)]: each share's
    `reference_norm.npz`, the same in all of them, or None where no share has one (fewer than 2
    documents: no counterfactual). A share's counterfactual moments are computed with its own r,
    so the merged counterfactual is one counterfactual only when every share used the same r:
    the same layers, selection documents, min_position, bins and token counts, and ln r equal to
    within `_SHARE_REFERENCE_ATOL`; otherwise SpectraError naming the share and the difference."""
    (d0, _), refs = parts[0], []
    for d, _ in parts:
        path = d / REFERENCE_FILE
        refs.append(ReferenceNorm.load(path) if path.exists() else None)
    first = refs[0]
    for (d, _), ref in zip(parts[1:], refs[1:], strict=True):
        if ref is None and first is None:
            continue
        if ref is None or first is None:
            has, lacks = (d0, d) if ref is None else (d, d0)
            raise SpectraError(f"{has} holds a reference norm ({REFERENCE_FILE}) and {lacks} none; "
                               "shares of one run have the same counterfactual: capture that share again")
        if (ref.layers, ref.documents, ref.min_position) != (first.layers, first.documents, first.min_position) \
                or ref.log_norm.shape != first.log_norm.shape or not np.array_equal(ref.n_tokens, first.n_tokens):
            what = "other selection documents, layers, bins or tokens"
        else:
            # NaN (a bin without selection tokens) in the same places: the token counts agree
            diff = np.nan_to_num(np.abs(ref.log_norm - first.log_norm))
            if not (diff > _SHARE_REFERENCE_ATOL).any():
                continue
            what = f"ln r differs by up to {diff.max():.3g}"
        raise SpectraError(
            f"{d} estimated another reference norm than {d0} ({what}); counterfactual moments "
            f"computed with different reference norms cannot be merged: capture every share on "
            f"one kind of device from the same prepared shards (rerun the others with --overwrite)")
    return first


def merge(cfg, *, progress: bool = True) -> ObservationalResult:
    """The tables of a run captured in shares (`config.MergeConfig`): every share's run directory
    must hold a finished share of the same configuration over the same prepared shards, and
    together they must cover every shard (a shard in several shares is read once).

    Each share estimated the reference norm itself; the counterfactual moments of the shares
    are merged only when all used the same one (`_share_reference`), which the merged run keeps
    as its `reference_norm.npz`, and every shard's counterfactual moments must be where its
    moments are read."""
    # shares may run on other hardware (device), but not in another precision: resume refuses
    # a dtype difference, and so does merge
    parts = P.read_shares(cfg, EXPERIMENT)
    run_cfg = P.merged_config(cfg, ObservationalConfig, parts[0][1])
    manifest = read_manifest(Path(parts[0][1]["shards_dir"]))
    n = len(manifest.shards)
    for d, m in parts:  # every share read these shards as they are now
        if Path(m.get("shards_dir", "")).resolve() != manifest.directory.resolve():
            raise SpectraError(f"{d} captured the shards in {m.get('shards_dir')}, {parts[0][0]} "
                               f"those in {manifest.directory}; shares of one run read one shard set")
        for i, sha in zip(m["share"]["shards"], m["share"].get("shard_sha256", []), strict=False):
            if not 0 <= i < n or manifest.shards[i].sha256 != sha:
                raise SpectraError(
                    f"{d} captured shard {i} with sha256 {sha[:12]}..., but {manifest.directory} "
                    f"now holds other tokens there (re-prepared since?); shares of different "
                    f"shards cannot be merged: capture that share again")
    reference = _share_reference(parts)
    paths, record_paths, missing = [], [], []
    for i in range(n):
        got = [d for d, m in parts if i in m["share"]["shards"]
               and (d / f"moments/shard_{i:05d}.npz").exists()]
        if not got:
            missing.append(i)
            continue
        if not check_provenance(got[0] / f"moments/shard_{i:05d}.npz", manifest, i):
            raise SpectraError(f"{got[0]} holds shard {i}'s moments without the sha256 of the shard "
                               "they came from (an older release); capture that share again")
        cf = _counterfactual_path(got[0] / f"moments/shard_{i:05d}.npz")
        if reference is not None and not cf.exists():
            raise SpectraError(f"{got[0]} holds shard {i}'s moments but not its counterfactual moments "
                               f"({cf.name}); capture that share again")
        paths.append(got[0] / f"moments/shard_{i:05d}.npz")
        record_paths.append(got[0] / f"records/shard_{i:05d}.parquet")
    if missing:
        raise SpectraError(f"shards {missing} of {n} are in none of the shares given; run the "
                           "shares that hold them (or pass their run directories)")
    inputs = [manifest.directory, *(d for d, _ in parts)]
    with P.run_directory(run_cfg, EXPERIMENT, inputs=inputs) as rd:
        resuming = rd.start(run_cfg, overwrite=run_cfg.overwrite)
        if reference is not None:  # the r of every share's counterfactual, as one process keeps it
            reference.save(rd.output(REFERENCE_FILE))
        model = _load(run_cfg, Group(), None, progress=progress) \
            if fd_sequences_for(run_cfg, manifest.seq_len) else None
        tables = _tables(run_cfg, rd, manifest, paths, record_paths if run_cfg.records else [],
                         model, model_info=parts[0][1].get("model", {}), resumed=resuming,
                         progress=progress,
                         merged_from=[str(d) for d, _ in parts])
    return ObservationalResult(out=rd.path, **tables)


def command(cfg: ObservationalConfig, *, progress: bool = True) -> int:
    """`spectra-lens observe`: run `cfg`, print a summary; SpectraError for bad input."""
    t0 = time.time()
    result = run(cfg, progress=progress)
    if result is None:  # a rank other than 0 under torchrun: rank 0 merges and reports
        return 0
    s = result.head_summary
    print(f"{len(s)} heads over {int(s['n_documents'].max())} documents; significant (BH "
          f"q<{cfg.fdr_alpha}, document-clustered CR2 test): {len(result.significant_heads)} raw, "
          f"{int(s['significant_given_pos'].sum())} given log position (the headline), "
          f"{int(s['significant_mediator_adjusted'].sum())} also given the sink mass "
          f"(mediator-adjusted); "
          f"consistent across document folds: {len(result.consistent_heads)}")
    print(f"median r(ln|q|, H) = {s['r_logq_entropy'].median():+.3f}; | ln position: "
          f"{s['r_logq_entropy_given_pos'].median():+.3f}; | ln position, sink (mediator-adjusted): "
          f"{s['r_logq_entropy_mediator_adjusted'].median():+.3f}")
    a = result.agreement_summary.iloc[0]
    counts = result.agreement["verdict"].value_counts()
    print(f"agreement (observational slope vs causal gain): "
          f"{', '.join(f'{k} {v}' for k, v in counts.items())}; "
          f"Spearman(slope, gain) = {a['spearman_obs_slope_gain']:+.2f}")
    if cfg.records:
        size = sum(p.stat().st_size for p in (result.out / "records").glob("*.parquet"))
        print(f"per-token records: {result.out / 'records'} ({size / 1e6:.1f} MB)")
    print(f"wrote {result.out} in {time.time() - t0:.0f} s")
    return 0

