"""What an experiment writes, declared once (`Outputs`, `Table`), and the writing of it:
tables as CSV, figures as HTML and JSON, then their images in one browser session at the end
(`write_outputs`; one warning line when no browser draws them). The report reads the same
declaration, so it shows exactly the tables and figures a run wrote."""

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from spectra_lens.errors import SpectraError
from spectra_lens.present import figures as figs
from spectra_lens.runs.rundir import RunDir

__all__ = ["Outputs", "Table", "write_figure", "write_outputs"]


@dataclass(frozen=True)
class Table:
    """One CSV an experiment writes: file name or glob, heading, how the report shows it."""

    pattern: str  # e.g. "gain_summary.csv" or "q_scale_intervention_L*_H*_*.csv"
    title: str
    sort_abs: tuple[str, ...] = ()  # sort by |column| descending (first one present)
    columns: tuple[str, ...] = ()  # shown first when present
    rows: int = 15


@dataclass(frozen=True)
class Outputs:
    """The one declaration of what an experiment writes. `figures(tables)` of the experiment
    module builds every figure from these tables alone, so the report rebuilds exactly the
    figures the run wrote."""

    label: str  # "EXP0"
    title: str
    command: str
    tables: tuple[Table, ...]

    def read_tables(self, directory: str | Path) -> dict[str, pd.DataFrame]:
        """{file stem: DataFrame} of every declared CSV present in `directory` (natural order).
        An unreadable CSV raises SpectraError naming it."""
        directory = Path(directory)
        out: dict[str, pd.DataFrame] = {}
        for spec in self.tables:
            for path in sorted(directory.glob(spec.pattern), key=_natural_key):
                if path.name.startswith("."):
                    continue
                try:
                    out[path.stem] = pd.read_csv(path)
                except Exception as e:  # pandas raises many types for a malformed file
                    raise SpectraError(f"table {path} is unreadable: {e}") from e
        return out


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def write_outputs(rd: RunDir, tables: dict, figures: dict, *, images: str = "png",
                  progress: bool = False) -> list[str]:
    """Write every table as `{name}.csv` and every figure under figures/ (HTML and JSON), then
    the figures' images (formats `images`: "png", "png,svg", "none") in one browser session,
    timed as timings["images_s"]; the CSV file names written. `progress`: a bar over the two."""
    from spectra_lens.present.display import stages

    formats = figs.image_formats(images)
    what = f"figures and {', '.join(formats)} images" if formats and figures else "figures"
    with stages("write outputs", ["tables", what], enabled=progress) as step:
        step("tables")
        names = _write_outputs(rd, tables, figures, formats, step=lambda: step(what))
    return names


def _write_outputs(rd: RunDir, tables: dict, figures: dict, formats, *, step) -> list[str]:
    names = []
    for name, frame in tables.items():
        rd.write_csv(f"{name}.csv", frame)
        names.append(f"{name}.csv")
    step()
    # every file the figures may write is listed in the run's manifest first (`RunDir.output`)
    for name in figures:
        for suffix in ("html", "json", *formats):
            rd.output(f"figures/{name}.{suffix}")
    exported = figs.write_figures(figures, rd.file("figures"), images=formats)
    rd.timed("images_s", exported.seconds)
    return names


def write_figure(rd: RunDir, fig, name: str) -> list[Path]:
    """figures/`name`.html and .json (atomic), no image: `write_outputs` exports a run's images
    together at the end. Both files are listed in the run's manifest first (`RunDir.output`)."""
    for file in (f"{name}.html", f"{name}.json"):
        rd.output(f"figures/{file}")
    return figs.save_figure(fig, rd.file("figures") / name, bundle=False)
