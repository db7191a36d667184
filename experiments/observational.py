"""EXP0, observational: every head's query norm and attention entropy over a corpus.

    python -m experiments.observational [--model M] [--corpus C] [--out DIR] ...
    spectra-lens observe ...

Stages, each stored so that a rerun resumes and analysis can be redone without the model:
corpus -> token shards (`shards/`) -> per-token records per shard (`records/*.parquet`) ->
per-head statistics (`head_summary.csv`, `significant_heads.csv`, `consistent_heads.csv`,
`layer_statistics.csv`) -> figures (`figures/`) -> `manifest.json` (status "complete" last).
"""

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from spectra_lens import display, stats
from spectra_lens import figures as figs
from spectra_lens.config import ObservationalConfig
from spectra_lens.distributed import Group
from spectra_lens.errors import SpectraError
from spectra_lens.hooks import MetricCapture, attached
from spectra_lens.layout import attention_layout
from spectra_lens.models import DEFAULT_MODEL, load_model, resolve_device
from spectra_lens.runs import RunDir, atomic_write
from spectra_lens.shards import (
    MANIFEST_NAME,
    ShardManifest,
    corpus_from_spec,
    load_shard,
    prepare,
    read_manifest,
)
from spectra_lens.validate import check_context

from . import _common as C

__all__ = ["ObservationalResult", "analyze", "collect", "command", "main", "run"]

log = logging.getLogger(__name__)
EXPERIMENT = "observational"
_Y = ("entropy", "max_attn", "k_eff_exp")


@dataclasses.dataclass(frozen=True, repr=False)
class ObservationalResult:
    """The tables of one observational run (figures and records stay on disk under `out`)."""

    out: Path
    head_summary: pd.DataFrame
    significant_heads: pd.DataFrame
    consistent_heads: pd.DataFrame
    layer_statistics: pd.DataFrame

    def __repr__(self) -> str:
        n = len(self.head_summary)
        return (f"ObservationalResult(out={str(self.out)!r}, heads={n}, "
                f"significant={len(self.significant_heads)}, consistent={len(self.consistent_heads)})")

    def _repr_html_(self) -> str:
        top = self.head_summary.reindex(
            self.head_summary["correlation"].abs().sort_values(ascending=False).index
        ).head(10)
        return (f"<b>{self!r}</b><br>strongest heads:"
                + top[["layer", "head", "correlation", "partial_r_entropy", "q_entropy_cluster", "significant"]]
                .to_html(index=False, float_format="%.3g"))


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


def collect(model, manifest: ShardManifest, run: RunDir, *, batch_size: int,
            top_mass: float | None = 0.9, progress: bool = True,
            shards: Sequence[int] | None = None) -> list[Path]:
    """Per-token records of every shard (or of `shards`, this process's share under torchrun)
    into `records/shard_XXXXX.parquet`; finished shards skipped."""
    layout = attention_layout(model)
    device = next(model.parameters()).device
    cap = MetricCapture(layout, top_mass=top_mass)
    paths = []
    mine = None if shards is None else set(shards)
    todo = [(i, s) for i, s in enumerate(manifest.shards) if mine is None or i in mine]
    bar = display.progress_bar(total=sum(s.n_sequences for _, s in todo), desc="capture", unit="seq",
                               enabled=progress)
    for i, info in todo:
        path = run.output(f"records/shard_{i:05d}.parquet")
        paths.append(path)
        if path.exists():
            bar.update(info.n_sequences)
            continue
        t0 = time.time()
        tokens = load_shard(manifest, i)
        if len(tokens) and int(tokens.max()) >= model.cfg.d_vocab:
            raise SpectraError(
                f"shard {manifest.shard_path(i)} holds token id {int(tokens.max())}, expected ids "
                f"below the model's vocabulary size {model.cfg.d_vocab}: tokenizer mismatch?"
            )
        frames = []
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size].to(device)
            with torch.no_grad(), attached(model, cap, layout=layout):
                model(batch, return_type=None)
            ids = range(info.offset + start, info.offset + start + len(batch))
            frames.append(cap.result().to_frame(sequence_ids=list(ids), shard=i))
            bar.update(len(batch))
        run.write_parquet(path.relative_to(run.path).as_posix(), pd.concat(frames, ignore_index=True))
        run.timed("capture_s", time.time() - t0)
    bar.close()
    return paths


def analyze(records: pd.DataFrame, cfg: ObservationalConfig, *,
            progress: bool = False) -> dict[str, pd.DataFrame]:
    """Per-head and per-layer statistics of the records (no model needed); `progress`: a bar
    over the stages (the cluster bootstrap of every head is the long one)."""
    stages = ["correlations, bootstrap", "shard consistency", "replication", "layer statistics"]
    with display.stages("statistics", stages, enabled=progress) as step:
        step(stages[0])
        return _analyze(records, cfg, step, stages)


def _analyze(records, cfg, step, stages) -> dict[str, pd.DataFrame]:
    summary = stats.head_correlations(
        records, ys=_Y, min_position=cfg.min_position, n_boot=cfg.n_boot, alpha=cfg.fdr_alpha,
        seed=cfg.seed,
    )
    keys = ["layer", "head"]
    step(stages[1])
    consistency = stats.shard_consistency(
        records, alpha=cfg.fdr_alpha, threshold=cfg.consistency_threshold,
        min_position=cfg.min_position,
    )
    cons_cols = keys + ["n_shards", "frac_same_sign", "frac_significant_same_sign", "consistent"]
    summary = summary.merge(consistency[cons_cols], on=keys, how="left")
    step(stages[2])
    rep = stats.replication(records, alpha=cfg.fdr_alpha, min_position=cfg.min_position,
                            split_seed=cfg.seed)
    rep_cols = [c for c in rep.columns if c in keys or c not in summary.columns]
    summary = summary.merge(rep[rep_cols], on=keys, how="left")
    # The original's extra columns: mean metrics per head.
    extra = [c for c in ("k_norm", "max_attn", "k_eff_exp", "k_eff_pr", "k_eff_top90",
                         "local_gain", "sink_mass") if f"mean_{c}" not in summary.columns]
    means = (records[records["position"] >= cfg.min_position]
             .groupby(keys)[extra].mean().add_prefix("mean_").reset_index())
    summary = summary.merge(means, on=keys, how="left")
    step(stages[3])
    layer_stats = stats.layer_statistics(summary)
    return {
        "head_summary": summary,
        "significant_heads": summary[summary["significant"]].reset_index(drop=True),
        "consistent_heads": consistency[consistency["consistent"]].reset_index(drop=True),
        "layer_statistics": layer_stats,
    }


OUTPUTS = C.Outputs(
    "EXP0", "observational: query norm vs attention entropy", "spectra-lens observe",
    (
        C.Table("head_summary.csv", "strongest heads", ("r_entropy", "correlation"),
                ("layer", "head", "mean_q_norm", "mean_entropy", "r_entropy", "r_entropy_ci_low",
                 "r_entropy_ci_high", "q_entropy_cluster", "partial_r_entropy",
                 "partial_q_entropy_cluster", "r_entropy_norm", "r_max_attn", "r_k_eff_exp",
                 "significant", "consistent", "replicated", "r_replication", "mean_local_gain")),
        C.Table("significant_heads.csv", "significant heads", ("r_entropy", "correlation"),
                ("layer", "head", "mean_entropy", "r_entropy", "r_entropy_ci_low", "r_entropy_ci_high",
                 "q_entropy_cluster", "partial_r_entropy", "partial_q_entropy_cluster", "consistent",
                 "replicated", "r_replication")),
        C.Table("consistent_heads.csv", "heads consistent across shards",
                ("r_pooled", "r_entropy", "frac_significant_same_sign"),
                ("layer", "head", "r_pooled", "p_pooled", "n_shards", "frac_same_sign",
                 "frac_significant_same_sign", "consistent")),
        C.Table("layer_statistics.csv", "layer statistics", (),
                ("layer", "n_heads", "mean_r", "mean_abs_r", "std_r", "min_r", "max_r",
                 "n_significant", "frac_significant"), rows=200),
        C.Table("strongest_heads_sample.csv", "sampled tokens of the strongest heads", (), (), rows=0),
    ),
)


def strongest_heads_sample(records: pd.DataFrame, summary: pd.DataFrame, *, top_heads: int,
                           min_position: int, max_points: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Up to `max_points` random tokens (position ≥ min_position) of each of the `top_heads` heads
    with the largest |r(log ‖q‖, H)|, in that order: the data of the scatter figure."""
    strongest = summary.reindex(summary["r_entropy"].abs().sort_values(ascending=False).index)
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
        out["heatmap_r_entropy"] = figs.head_heatmap(
            summary, "r_entropy", mark="significant", title="r(log query norm, entropy) per head")
        out["heatmap_partial_r_entropy"] = figs.head_heatmap(
            summary, "partial_r_entropy", mark="significant_partial",
            title="partial r(log query norm, entropy | log position)")
        out["heatmap_r_entropy_norm"] = figs.head_heatmap(
            summary, "r_entropy_norm", title="r(log query norm, normalized entropy)")
        out["r_distribution"] = figs.r_distribution(
            summary, {"r_entropy": "raw r", "partial_r_entropy": "position-controlled r"},
            title="distribution of per-head r(log query norm, entropy)")
    if tables.get("layer_statistics") is not None:
        out["layer_statistics"] = figs.layer_summary(
            tables["layer_statistics"], title="query norm vs entropy by layer")
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
    Under `torchrun` each rank captures its share of the shards and rank 0 merges; the other
    ranks return None. A rank that dies leaves its unfinished shards missing; the same command
    (any number of processes) redoes only those.
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
    # prepares the shards, each rank captures its share, rank 0 merges (spectra_lens.distributed).
    group = Group.from_env(device=cfg.device)
    try:
        if not group.is_main:
            _capture_share(cfg, group, model, source, progress=progress)
            return None
        return _run_main(cfg, group, model, source, model_name, inputs, progress=progress)
    finally:
        group.close()


class _ShardWriter:
    """What `collect` needs of a run directory, for ranks other than 0: the shard files of the
    run rank 0 started (atomic writes; rank 0 lists them in the manifest when it merges)."""

    def __init__(self, path: Path):
        self.path = path

    def output(self, name: str) -> Path:
        return self.path / name

    def write_parquet(self, name: str, frame: pd.DataFrame) -> Path:
        return atomic_write(self.output(name), lambda tmp: frame.to_parquet(tmp, index=False))

    def timed(self, name: str, seconds: float) -> None:
        pass


def _load(cfg: ObservationalConfig, group: Group, model, *, progress: bool = False):
    if model is not None:
        return model
    return load_model(cfg.model, dtype=cfg.dtype, device=resolve_device(group.device(cfg.device)),
                      device_map=cfg.device_map, progress=progress)


def _capture_share(cfg: ObservationalConfig, group: Group, model, source, *, progress: bool) -> None:
    """A rank other than 0: wait for the shards, capture this rank's share, wait for the rest."""
    model = _load(cfg, group, model)
    group.barrier()  # rank 0 has started the run and written the shards
    manifest = source if isinstance(source, ShardManifest) else read_manifest(Path(cfg.out) / "shards")
    collect(model, manifest, _ShardWriter(Path(cfg.out)), batch_size=cfg.batch_size,
            top_mass=cfg.top_mass, progress=False, shards=group.shards(len(manifest.shards)))
    group.barrier()  # every rank's shards are written


def _run_main(cfg, group: Group, model, source, model_name: str, inputs, *, progress: bool):
    with C.run_directory(cfg, EXPERIMENT, inputs=inputs) as rd:
        t0 = time.time()
        model = _load(cfg, group, model, progress=progress)
        rd.timed("load_model_s", time.time() - t0)
        check_context(model, source.seq_len if isinstance(source, ShardManifest) else cfg.seq_len)
        resuming = rd.start(cfg, overwrite=cfg.overwrite)
        t0 = time.time()
        manifest = _shards(cfg, rd, model, source, model_name)
        rd.timed("shards_s", time.time() - t0)
        group.barrier()  # the shards exist: every rank may start
        collect(model, manifest, rd, batch_size=cfg.batch_size, top_mass=cfg.top_mass,
                progress=progress, shards=group.shards(len(manifest.shards)))
        group.barrier()  # every rank's shards are written
        paths = [rd.output(f"records/shard_{i:05d}.parquet") for i in range(len(manifest.shards))]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise SpectraError(f"shards not captured: {', '.join(missing)}; rerun the same command "
                               f"to redo them")
        t0 = time.time()
        records = read_records(paths)
        tables = analyze(records, cfg, progress=progress)
        written = dict(tables, strongest_heads_sample=strongest_heads_sample(
            records, tables["head_summary"], top_heads=cfg.top_heads, min_position=cfg.min_position,
            seed=cfg.seed))
        rd.timed("statistics_s", time.time() - t0)
        t0 = time.time()
        C.write_outputs(rd, written, figures(written), images=cfg.images)
        rd.timed("figures_s", time.time() - t0)
        layout = attention_layout(model)
        rd.finish(
            model=C.model_info(model_name, layout, model),
            corpus=manifest.corpus, n_sequences=manifest.n_sequences, seq_len=manifest.seq_len,
            n_tokens_per_head=int(len(records) / max(1, layout.n_layers * layout.n_heads)),
            resumed=resuming, seed=cfg.seed,
        )
    return ObservationalResult(out=rd.path, **tables)


def command(cfg: ObservationalConfig, *, progress: bool = True) -> int:
    """`spectra-lens observe`: run `cfg`, print a summary; SpectraError for bad input."""
    t0 = time.time()
    result = run(cfg, progress=progress)
    if result is None:  # a rank other than 0 under torchrun: rank 0 merges and reports
        return 0
    s = result.head_summary
    print(f"{len(s)} heads; significant (BH q<{cfg.fdr_alpha} on the sequence-clustered test): "
          f"{len(result.significant_heads)}; consistent across shards: {len(result.consistent_heads)}; "
          f"replicated: {int(s['replicated'].sum()) if 'replicated' in s else 'n/a'}")
    print(f"median r(log|q|, H) = {s['r_entropy'].median():+.3f}; "
          f"median partial r (| log position) = {s['partial_r_entropy'].median():+.3f}")
    print(f"wrote {result.out} in {time.time() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.observational`: the same as `spectra-lens observe`."""
    from spectra_lens.cli import main as cli_main

    return cli_main(["observe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
