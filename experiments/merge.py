"""`spectra-lens merge RUN_DIR ...`: the observational tables of a run captured in shares.

Each share is the observe command with `SPECTRA_SHARD_RANK=i SPECTRA_SHARD_WORLD=N` in its
environment (e.g. one SLURM array task each), over the same prepared shards, into its own run
directory; it writes per-document moments of shards i, i + N, ... and no tables. This command
reads every share's moments (merging is concatenation) and writes the tables, figures and
manifest of the whole run into --out, as one process running every shard would.
"""

import sys
import time

from spectra_lens.config import MergeConfig

from .observational import merge

__all__ = ["command", "main"]


def command(cfg: MergeConfig, *, progress: bool = True) -> int:
    t0 = time.time()
    result = merge(cfg, progress=progress)
    s = result.head_summary
    print(f"merged {len(cfg.run_dir)} shares: {len(s)} heads over {int(s['n_documents'].max())} "
          f"documents; significant (BH q, document-clustered CR2 test): "
          f"{len(result.significant_heads)}; wrote {result.out} in {time.time() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    from spectra_lens.cli import main as cli_main

    return cli_main(["merge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
