"""`spectra-lens merge RUN_DIR ...`: the tables of an observational or gain run computed in shares.

Each share is the observe (or gain) command with `SPECTRA_SHARD_RANK=i SPECTRA_SHARD_WORLD=N`
in its environment (e.g. one SLURM array task each), into its own run directory, and writes no
tables. observe: over the same prepared shards, share i captures the per-document moments of
shards i, i + N, ... gain: share i computes the α-curves of parts i, i + N, ... (blocks of
--batch-size measured sequences; share 0 also chooses the target / control heads). This command
reads every share's files (the experiment is the one the shares' manifests name) and writes the
tables, figures and manifest of the whole run into --out, as one process doing all of it would.
Each observe share estimates the counterfactual's reference norm itself: the shares' counterfactual
moments are merged only when all used the same one (`observational.merge`), else refused.
"""

import time

from spectra_lens.config import MergeConfig
from spectra_lens.errors import SpectraError
from spectra_lens.runs.rundir import RunDir

__all__ = ["command"]


def _experiment(cfg: MergeConfig) -> str:
    """The experiment the shares ran ("observational" or "gain"), from the first manifest."""
    first = cfg.run_dir[0] if cfg.run_dir else None
    m = RunDir(first, "merge").read_manifest() if first else None
    experiment = (m or {}).get("experiment", "observational")
    if experiment not in ("observational", "gain"):
        raise SpectraError(f"{first} holds a {experiment} run; merge joins shares of observational "
                           "or gain runs")
    return experiment


def command(cfg: MergeConfig, *, progress: bool = True) -> int:
    t0 = time.time()
    if _experiment(cfg) == "gain":
        from .gain import merge as merge_gain

        result = merge_gain(cfg, progress=progress)
        s = result.summary
        print(f"merged {len(cfg.run_dir)} shares: gain of {len(s)} heads over "
              f"{int(s['n_sequences'].max())} sequences; median entropy gain "
              f"{s['gain_entropy'].median():+.3f} per ln α; wrote {result.out} in {time.time() - t0:.0f} s")
        return 0
    from .observational import merge

    result = merge(cfg, progress=progress)
    s = result.head_summary
    print(f"merged {len(cfg.run_dir)} shares: {len(s)} heads over {int(s['n_documents'].max())} "
          f"documents; significant (BH q, document-clustered CR2 test): "
          f"{len(result.significant_heads)}; wrote {result.out} in {time.time() - t0:.0f} s")
    return 0

