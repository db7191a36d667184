"""The report of a results directory (`spectra_lens.present.report`) over the four experiments.

    spectra-lens report RESULTS_DIR [--out FILE]       (default: RESULTS_DIR/report.html)
    spectra-lens report RESULTS_DIR --pdf              (also report.pdf, printed by Chromium)

`EXPERIMENTS` names the experiments a report shows, in page order: a run directory is one whose
`manifest.json` names one of them, and its figures are built by that experiment module's own
`figures(tables)` from the CSVs its `OUTPUTS` declares. The functions here are the library's with
these experiments filled in.
"""

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from spectra_lens.present import report as R
from spectra_lens.present.report import Run, run_figures

__all__ = ["EXPERIMENTS", "Run", "build_report", "command", "experiments", "find_runs", "main",
           "run_figures", "write_report"]

# experiment name (manifest "experiment") -> module with OUTPUTS and figures(tables)
EXPERIMENTS: dict[str, str] = {
    "observational": "spectra_lens.experiments.observational",
    "intervention": "spectra_lens.experiments.intervention",
    "gain": "spectra_lens.experiments.gain",
    "qk_control": "spectra_lens.experiments.qk_control",
}


def experiments() -> dict[str, object]:
    """{name: module} of `EXPERIMENTS`, in page order."""
    return {name: importlib.import_module(module) for name, module in EXPERIMENTS.items()}


def find_runs(results_dir: str | os.PathLike) -> list[Run]:
    """The runs of the four experiments at or below `results_dir` (`present.report.find_runs`)."""
    return R.find_runs(results_dir, experiments())


def build_report(results_dir: str | os.PathLike, **kwargs) -> str:
    """The report page of `results_dir` (`present.report.build_report`: `plotlyjs`, `link_from`)."""
    return R.build_report(results_dir, experiments(), **kwargs)


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 plotlyjs: str | None = None) -> Path:
    """Write the report of `results_dir` atomically to `out` (default RESULTS_DIR/report.html)."""
    return R.write_report(results_dir, experiments(), out, plotlyjs=plotlyjs)


def _runs_summary(runs: list[Run]) -> Iterator[str]:
    for r in runs:
        yield f"{r.outputs.label} {r.experiment} ({r.status})"


def command(cfg, *, progress: bool = True) -> int:
    """`spectra-lens report` (a `config.ReportConfig`): write the page, print what it holds."""
    cfg.validate()
    runs = find_runs(cfg.results_dir)
    path = write_report(cfg.results_dir, cfg.out, plotlyjs=cfg.plotlyjs)
    missing = [k for k in EXPERIMENTS if k not in {r.experiment for r in runs}]
    print(f"wrote {path}: {', '.join(_runs_summary(runs))}"
          + (f"; not in this directory: {', '.join(missing)}" if missing else ""))
    if cfg.pdf:  # drawn by the same headless browser that exports the figures' images
        from spectra_lens.present.figures.export import print_pdf

        print(f"wrote {print_pdf(path, path.with_suffix('.pdf'))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.report`: the same as `spectra-lens report`."""
    from spectra_lens.cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
