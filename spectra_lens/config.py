"""Frozen, keyword-only settings of each experiment; one CLI flag per field.

Validation happens when a run starts (`validate()`), not in `__init__`.
"""

from dataclasses import dataclass

from spectra_lens.errors import SpectraError

__all__ = ["ObservationalConfig"]


@dataclass(frozen=True, kw_only=True)
class ObservationalConfig:
    """EXP0: per-token query norm and attention metrics over a corpus, then per-head statistics."""

    model: str | None = None  # HF id or local dir; None = the embedded default model
    corpus: str | None = None  # corpus spec (see data.corpus_from_spec); None = pydoc topics
    out: str = "results/observational"  # run directory: shards, records, tables, figures
    seq_len: int = 128  # tokens per sequence (BOS included where the model uses one)
    n_sequences: int = 64  # sized so the default run fits in ~10 minutes on 2 CPU cores
    shard_size: int = 16  # sequences per shard: the unit of resuming, consistency, replication
    batch_size: int = 8  # sequences per forward pass
    min_position: int = 1  # tokens before this position (the sink/BOS token) are excluded
    n_boot: int = 1000  # cluster-bootstrap resamples of whole sequences
    fdr_alpha: float = 0.05  # Benjamini-Hochberg false discovery rate across all heads
    consistency_threshold: float = 0.8  # share of shards that must agree for "consistent"
    top_heads: int = 6  # strongest heads shown in the query-norm vs entropy scatter
    seed: int = 0  # bootstrap and replication split
    dtype: str = "float32"  # model weights; metrics are always float32
    device: str | None = None  # None = CUDA when present, else CPU
    overwrite: bool = False  # replace a finished run in `out` instead of refusing

    def validate(self) -> None:
        for name in ("seq_len", "n_sequences", "shard_size", "batch_size", "n_boot", "top_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpectraError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            raise SpectraError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 0 <= self.min_position < self.seq_len - 2:
            raise SpectraError(
                f"min_position must be in [0, seq_len - 2) = [0, {self.seq_len - 2}), "
                f"got {self.min_position}"
            )
        for name in ("fdr_alpha", "consistency_threshold"):
            v = getattr(self, name)
            if not 0 < v < 1 if name == "fdr_alpha" else not 0 < v <= 1:
                raise SpectraError(f"{name} must be in (0, 1), got {v!r}")
