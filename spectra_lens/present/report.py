"""One self-contained HTML page from a results directory (`spectra-lens report`).

The directory (and its subdirectories) is scanned for run directories: a `manifest.json` whose
"experiment" is a key of the `experiments` mapping the caller passes (name -> the experiment's
module, or anything with its `OUTPUTS` declaration and `figures(tables)`). The page opens with
what was found: for each run, the headline numbers, counts (verdicts, labels) and strongest heads
its experiment's optional `summary(tables) -> Findings` reads from the run's own tables, with
links to its figures. Each run then gets a section with its figures, its key tables (top rows of
its CSVs, sorted as its optional `views` say) and, folded at the end, its manifest (status,
model, config, versions, timings) and file list. Figures are built by the experiment's own `figures(tables)` from the
CSVs it declared (`OUTPUTS`), the same function the run used to write them, so the page shows
exactly the run's figures. Experiments with no run are named in a "not in this directory" list,
and a run whose status is not "complete" is flagged.

The page (`spectra_lens.present.page`) needs no network: `write_report` writes plotly.js once
beside the page (`page.PLOTLYJS_FILE`, which the run directories' figure pages load too) and the
page loads it by relative path (or inline with `plotlyjs="inline"`, or from another path or
URL); every figure is plotted from JSON held in the page.
After plotting, a script writes into the hidden element `#spectra-render-status` a JSON object
`{figure_id: {"traces", "with_data", "rendered", "error"}}`, so a headless browser (and the
tests) can check that every figure drew its data.

This module knows no experiment: the caller names them (the `report` subcommand, in
experiments/report.py, passes the four experiment modules).
"""

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from spectra_lens.errors import SpectraError
from spectra_lens.io import atomic_write
from spectra_lens.present.page import PLOTLYJS_FILE, Figures, document, figure_title, write_plotlyjs
from spectra_lens.present.page import escape as _e
from spectra_lens.runs.rundir import MANIFEST, read_manifest
from spectra_lens.validate import HeadRef

__all__ = ["REPORT_NAME", "Experiment", "Findings", "Run", "View", "build_report", "find_runs", "run_figures",
           "write_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
_MAX_DEPTH = 4  # results/<group>/<run>/ is as deep as anyone nests runs
_SKIP_DIRS = {"records", "shards", "figures", "__pycache__"}  # large or never runs


@runtime_checkable
class Experiment(Protocol):
    """What the report needs of an experiment (its module satisfies it).

    `OUTPUTS`: its declaration of outputs, with `label`, `title`, `command`, `tables` (each with
    `pattern`, `title`, `sort_abs`, `columns`, `rows`; `rows = 0` marks the data of a figure, not
    a table to show) and `read_tables(directory) -> {stem: DataFrame}`. `figures(tables)`: every
    figure of a run, built from those tables alone."""

    OUTPUTS: Any
    figures: Callable[[dict[str, pd.DataFrame]], dict[str, go.Figure]]


@dataclass(frozen=True)
class Findings:
    """What a run found, for the top of the page: `headline` (label, value) pairs, `counts`
    (e.g. verdict -> number of heads) under `counts_title`, and `heads`, the strongest heads
    (a few rows) under `heads_title`."""

    headline: list[tuple[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    counts_title: str = ""
    heads: pd.DataFrame | None = None
    heads_title: str = ""


@dataclass(frozen=True)
class View:
    """How the report shows a table, where it differs from the experiment's declaration:
    `sort_abs` (by |first column| descending, ties by the next), `columns` shown first, and
    `derive(frame) -> frame`, columns computed for showing (e.g. a mean over folds)."""

    sort_abs: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    rows: int | None = None
    derive: Callable[[pd.DataFrame], pd.DataFrame] | None = None


@dataclass(frozen=True)
class Run:
    """One run directory found under the results directory."""

    experiment: str
    path: Path
    manifest: dict = field(repr=False)
    definition: Experiment = field(repr=False, compare=False)

    @property
    def outputs(self):
        return self.definition.OUTPUTS

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def complete(self) -> bool:
        return self.status == "complete"


# --------------------------------------------------------------------------- finding runs


def find_runs(results_dir: str | os.PathLike, experiments: Mapping[str, Experiment]) -> list[Run]:
    """Run directories at or below `results_dir` (depth ≤ 4), in experiment then path order.

    A run directory holds a `manifest.json` whose "experiment" is a key of `experiments`; its
    subdirectories are not searched further (their manifests, e.g. of token shards, are not
    runs). Symlinked directories are followed (each real directory once). Unreadable manifests
    are logged and skipped.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise SpectraError(f"results directory {str(root)!r} does not exist or is not a directory")
    runs = []
    seen: set[str] = set()  # real paths already walked: a symlink loop is entered once
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        depth = len(here.relative_to(root).parts)
        if MANIFEST in filenames:
            manifest = _read_manifest(here / MANIFEST)
            if manifest is not None and manifest.get("experiment") in experiments:
                runs.append(Run(manifest["experiment"], here, manifest, experiments[manifest["experiment"]]))
                dirnames.clear()
                continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS
                             and depth < _MAX_DEPTH)
    order = list(experiments)
    return sorted(runs, key=lambda r: (order.index(r.experiment), str(r.path)))


def _read_manifest(path: Path) -> dict | None:
    try:
        return read_manifest(path)
    except SpectraError as e:
        log.warning("skipping unreadable manifest %s: %s", path, e)
        return None


# --------------------------------------------------------------------------- tables


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as e:  # empty, truncated, not CSV: a note on the page, no crash
        raise SpectraError(f"{path.name} is unreadable as CSV ({type(e).__name__}: {e})") from e


@dataclass
class _Shown:
    """How a CSV is shown when the experiment did not declare it, or a view changes it."""

    rows: int = 10
    sort_abs: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    pattern: str = ""
    title: str = ""


def _top(frame: pd.DataFrame, spec) -> tuple[pd.DataFrame, str]:
    """The rows and columns of `frame` to show (`spec`: a declared table's `sort_abs`, `columns`,
    `rows`), and how they were chosen."""
    how = []
    keys = [c for c in spec.sort_abs if c in frame.columns
            and (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))]
    if keys:
        order = pd.DataFrame({k: frame[k].astype(float).abs() for k in keys})
        order = order.sort_values(keys, ascending=False, na_position="last", kind="stable")
        frame = frame.reindex(order.index)
        how.append("sorted by " + ", then ".join(f"|{k}|" for k in keys))
    cols = [c for c in spec.columns if c in frame.columns]
    if cols and len(cols) < len(frame.columns):
        how.append(f"{len(cols)} of {len(frame.columns)} columns")
        frame = frame[cols]
    if len(frame) > spec.rows:
        how.insert(0, f"top {spec.rows} of {len(frame)} rows")
        frame = frame.head(spec.rows)
    else:
        how.insert(0, f"{len(frame)} rows")
    return frame, ", ".join(how)


def _frame_html(frame: pd.DataFrame, links: dict[tuple[int, int], str] | None = None) -> str:
    """The table as HTML; with `links` ({(layer, head): href}), each head cell of a row whose
    (layer, head) has a page links to it."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.4g}"
        return str(v)

    cells: dict[str, str] = {}
    if links and {"layer", "head"} <= set(frame.columns):
        frame = frame.copy()
        marks = []
        for i, (layer, head) in enumerate(zip(frame["layer"], frame["head"])):
            try:
                href = links.get((int(layer), int(head)))
            except (TypeError, ValueError):  # NaN or not a number: no page to link
                href = None
            if href is None:
                marks.append(fmt(head))
                continue
            mark = f"@@head-page-{i}@@"  # survives escaping; replaced by the link below
            cells[mark] = f'<a href="{_e(href)}" title="page of {HeadRef(int(layer), int(head))}">{int(head)}</a>'
            marks.append(mark)
        frame["head"] = marks
    out = frame.to_html(index=False, classes="data", border=0, na_rep="", escape=True,
                        formatters={c: fmt for c in frame.columns})
    for mark, link in cells.items():
        out = out.replace(mark, link)
    return out


def _head_links(root: Path, link_from: Path) -> dict[tuple[int, int], str]:
    """{(layer, head): href relative to `link_from`} of the head pages in `root/heads/`
    (written by `spectra-lens head`)."""
    if not (root / "heads").is_dir():  # head_page.HEAD_PAGES_DIR; checked before importing torch
        return {}
    from spectra_lens.present.head_page import HEAD_PAGES_DIR, head_page_path

    out = {}
    for f in (root / HEAD_PAGES_DIR).glob("L*H*.html"):
        m = re.fullmatch(r"L(\d+)H(\d+)\.html", f.name)
        if m and head_page_path(root / HEAD_PAGES_DIR, int(m[1]), int(m[2])) == f:
            out[(int(m[1]), int(m[2]))] = Path(os.path.relpath(f, link_from)).as_posix()
    return out


def _view(run: Run, table):
    """The declared `table` with the experiment's `views` applied (its `pattern` as the key)."""
    view = (getattr(run.definition, "views", None) or {}).get(table.pattern)
    if view is None:
        return table, None
    return _Shown(rows=view.rows or table.rows, sort_abs=view.sort_abs or tuple(table.sort_abs),
                  columns=view.columns or tuple(table.columns), pattern=table.pattern,
                  title=table.title), view.derive


def _tables_html(run: Run, links: dict[tuple[int, int], str] | None = None) -> str:
    spec = run.outputs
    parts, shown = [], set()
    for declared in spec.tables:
        t, derive = _view(run, declared)
        files = sorted(run.path.glob(t.pattern), key=_natural_key)
        if not t.rows:  # data of a figure, not a table to read
            shown.update(files)
            continue
        if not files:
            parts.append(f'<p class="missing">{_e(t.pattern)}: not found in this run.</p>')
            continue
        for f in files:
            shown.add(f)
            parts.append(_one_table(f, t, t.title if len(files) == 1 else f"{t.title}: {f.stem}", links,
                                    derive))
    others = [f for f in sorted(run.path.glob("*.csv"), key=_natural_key) if f not in shown]
    if others:
        inner = "".join(_one_table(f, _Shown(), f.stem, links) for f in others)
        parts.append(f"<details><summary>other tables ({len(others)})</summary>{inner}</details>")
    return "".join(parts)


def _one_table(path: Path, spec, title: str, links: dict[tuple[int, int], str] | None = None,
               derive: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> str:
    try:
        frame = _read_csv(path)
    except SpectraError as e:
        return f'<h4>{_e(title)}</h4><p class="missing">{_e(str(e))}</p>'
    if derive is not None:
        try:
            frame = derive(frame)
        except (KeyError, ValueError, TypeError) as e:  # an older table without the columns
            log.info("%s shown as written (%s)", path.name, e)
    shown, how = _top(frame, spec)
    return (f'<h4>{_e(title)}</h4><p class="caption"><code>{_e(path.name)}</code>: {_e(how)}</p>'
            f'<div class="scroll">{_frame_html(shown, links)}</div>')


# --------------------------------------------------------------------------- figures


def _figure_json(fig: go.Figure) -> dict:
    return json.loads(fig.to_json())


# --------------------------------------------------------------------------- the page


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "run"


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "—" if v is None else str(v)


def _kv_table(title: str, items: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_scalar(v))}</td></tr>" for k, v in items.items())
    return f'<div class="kv"><h4>{_e(title)}</h4><table class="kv">{rows}</table></div>'


def _manifest_html(run: Run) -> str:
    """The manifest (without its file list) and the file list, folded: the end of a section."""
    m = run.manifest
    top = {k: v for k, v in m.items() if not isinstance(v, dict) and k != "outputs"}
    parts = [_kv_table("run", top)]
    for key in ("model", "config", "timings", "versions"):
        if isinstance(m.get(key), dict):
            parts.append(_kv_table(key, m[key]))
    for key, v in m.items():
        if isinstance(v, dict) and key not in ("model", "config", "timings", "versions"):
            parts.append(_kv_table(key, v))
    files = m.get("outputs") if isinstance(m.get("outputs"), list) else []
    items = "".join(f"<li><code>{_e(f)}</code></li>" for f in files)
    return (f'<details class="manifest-details"><summary>Manifest: status, model, config, versions, '
            f'timings</summary><div class="manifest">{"".join(parts)}</div></details>'
            f'<details class="files"><summary>Files of this run ({len(files)})</summary>'
            f'<ul class="files">{items}</ul></details>')


def run_figures(run: Run) -> dict[str, go.Figure]:
    """The figures of `run`, built by its experiment's `figures(tables)` from its CSVs."""
    return run.definition.figures(run.outputs.read_tables(run.path))


def _figures_html(run: Run, figs: Figures, prefix: str) -> tuple[str, list[tuple[str, str]]]:
    """(html, [(figure id, title)]) of the run's figures."""
    note = ""
    try:
        built = run_figures(run)
    except (SpectraError, KeyError, ValueError, TypeError, IndexError) as e:
        # a malformed CSV must not cost the rest of the page
        log.warning("figures of %s could not be built: %s", run.path, e)
        built, note = {}, f"Figures could not be built from this run's CSVs ({type(e).__name__}: {e})."
    items = [(name, _figure_json(fig)) for name, fig in built.items()]
    if not items and not note:
        note = "No figures: the run's tables are missing."
    divs, index = [], []
    for n, f in items:
        before = set(figs.specs)
        divs.append(figs.div(f, f"fig-{prefix}-{_slug(n)}", f"{figure_title(f, n)} — {n}"))
        fig_id = next(iter(set(figs.specs) - before))
        index.append((fig_id, figure_title(f, n)))
    note_html = f'<p class="note">{_e(note)}</p>' if note else ""
    return f"{note_html}<div class=\"figures\">{''.join(divs)}</div>", index


def _summary(run: Run) -> Findings | None:
    summary = getattr(run.definition, "summary", None)
    if summary is None:
        return None
    try:
        return summary(run.outputs.read_tables(run.path))
    except (SpectraError, KeyError, ValueError, TypeError, IndexError) as e:
        log.warning("findings of %s could not be read: %s", run.path, e)
        return Findings(headline=[("findings", f"could not be read from the tables ({type(e).__name__}: {e})")])


def _counts_html(counts: dict[str, int], title: str) -> str:
    if not counts:
        return ""
    total = max(1, sum(counts.values()))
    rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="n">{int(v)}</td><td class="bar"><span style="width:'
        f'{100 * v / total:.1f}%"></span></td></tr>' for k, v in counts.items())
    return f'<div class="counts"><h4>{_e(title)}</h4><table class="counts">{rows}</table></div>'


def _findings_html(run: Run, sid: str, heading: str, found: Findings | None,
                   index: list[tuple[str, str]], links: dict[tuple[int, int], str] | None) -> str:
    """One run's card at the top of the page: headline numbers, counts, strongest heads, links."""
    parts = []
    if not run.complete:
        parts.append(f'<p class="flag">Status “{_e(run.status)}”: this run did not finish; what '
                     f"follows may be partial.</p>")
    if found is not None and found.headline:
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_scalar(v))}</td></tr>" for k, v in found.headline)
        parts.append(f'<table class="headline">{rows}</table>')
    if found is not None:
        parts.append(_counts_html(found.counts, found.counts_title))
        if found.heads is not None and len(found.heads):
            parts.append(f'<div class="heads"><h4>{_e(found.heads_title)}</h4>'
                         f'<div class="scroll">{_frame_html(found.heads, links)}</div></div>')
    if found is None:
        parts.append('<p class="note">No summary for this experiment: see its tables below.</p>')
    figure_links = "".join(f'<li><a href="#{_e(i)}">{_e(t)}</a></li>' for i, t in index)
    return (f'<div class="finding" id="finding-{sid}"><h3><a href="#{sid}">{_e(heading)}</a></h3>'
            f'<div class="finding-body">{"".join(parts)}</div>'
            + (f'<p class="figlinks">Figures:</p><ul class="figlinks">{figure_links}</ul>' if index else "")
            + "</div>")


def _section(run: Run, root: Path, figs: Figures, used: set[str],
             links: dict[tuple[int, int], str] | None = None) -> tuple[str, str, str, str]:
    """(section id, heading, findings card, section html) of one run; `links`: head pages to
    link from its tables."""
    spec = run.outputs
    rel = run.path.relative_to(root).as_posix() if run.path != root else "."
    sid = _slug(f"{run.experiment}-{rel}")
    while sid in used:
        sid += "-x"
    used.add(sid)
    flag = "" if run.complete else (
        f'<p class="flag">Status “{_e(run.status)}”: this run did not finish. Its tables and figures '
        f'may be partial or missing. The same command with <code>--out {_e(run.path)}</code> '
        f'(<code>{_e(spec.command)}</code>, same options) resumes it.</p>')
    badge = "complete" if run.complete else "incomplete"
    # The run directory is part of every heading: two runs of one experiment stay distinct
    # (in the PDF too, which has no navigation).
    where = run.path.name if rel == "." else rel
    heading = f"{spec.label} {spec.title} — {where}"
    figures_html, index = _figures_html(run, figs, sid)
    card = _findings_html(run, sid, heading, _summary(run), index, links)
    return sid, heading, card, (
        f'<section id="{sid}"><h2>{_e(spec.label)} {_e(spec.title)} <span class="where">— '
        f'<code>{_e(where)}</code></span> <span class="badge {badge}">{_e(run.status)}</span></h2>'
        f'<p class="path">run directory: <code>{_e(rel)}</code> · <a href="#finding-{sid}">findings</a></p>{flag}'
        f"<h3>Figures</h3>{figures_html}"
        f"<h3>Tables</h3>{_tables_html(run, links)}"
        f"<h3>Manifest and files</h3>{_manifest_html(run)}</section>"
    )


_CSS = """
#findings .finding{border:1px solid #d8dde6;border-radius:6px;padding:.4rem .9rem;margin:.6rem 0;
 break-inside:avoid}
#findings h3{margin:.3rem 0}.finding-body{display:flex;flex-wrap:wrap;gap:.4rem 2rem;align-items:flex-start}
table.headline th{text-align:left;font-weight:500;color:#4b5563;padding:.1rem 1rem .1rem 0}
table.headline td{font-weight:600;font-variant-numeric:tabular-nums}
table.counts th{text-align:left;font-weight:500;padding:.05rem .8rem .05rem 0;white-space:nowrap}
table.counts td.n{text-align:right;font-weight:600;padding-right:.5rem}
table.counts td.bar{width:10rem}table.counts td.bar span{display:block;height:.8rem;background:#4c78a8}
.counts h4,.heads h4{margin:.2rem 0}.finding-body>*{min-width:0;max-width:100%}
p.figlinks{margin:.3rem 0 0;font-size:.85rem;color:#4b5563}
ul.figlinks{margin:.1rem 0 .2rem;padding-left:1.2rem;columns:2;font-size:.85rem}
.where{font-weight:400;font-size:.8em}details{margin:.4rem 0}summary{cursor:pointer;color:#374151}
ul.files{columns:2;font-size:.85rem}
@media print{ul.figlinks{display:none}}
"""


def build_report(results_dir: str | os.PathLike, experiments: Mapping[str, Experiment], *,
                 plotlyjs: str | None = None, link_from: str | os.PathLike | None = None) -> str:
    """The report of every run of `experiments` (name -> `Experiment`, in page order) under
    `results_dir`, as one HTML page: self-contained (plotly.js inline, once) by default, or
    loading plotly.js from `plotlyjs` (a path or URL).

    The page opens with the findings of every run (`Experiment.summary`, when it has one),
    then one section per run: figures, tables, and the manifest and file list folded.
    Heads in its tables link to their pages in `results_dir/heads/` (`spectra-lens head`), by
    paths relative to `link_from`, the directory the page will be saved in (default:
    `results_dir`)."""
    from spectra_lens import __version__

    root = Path(results_dir).resolve()
    runs = find_runs(root, experiments)
    if not runs:
        raise SpectraError(
            f"no run directory under {str(root)!r}: expected a {MANIFEST} with \"experiment\" one "
            f"of {list(experiments)} in it or in a subdirectory"
        )
    present = {r.experiment for r in runs}
    missing = [k for k in experiments if k not in present]
    incomplete = [r for r in runs if not r.complete]
    figs, used = Figures(), set()
    links = _head_links(root, Path(link_from).resolve() if link_from is not None else root)
    sections = [_section(r, root, figs, used, links) for r in runs]
    nav = "".join(f'<li><a href="#{i}">{_e(t)}</a></li>' for i, t, _, _ in sections)
    missing_html = ""
    # Where a missing run would go: beside the others (the parent when root is itself a run).
    base = root.parent if any(r.path == root for r in runs) else root
    if missing:
        items = "".join(
            f"<li><b>{_e(experiments[k].OUTPUTS.label)} {_e(experiments[k].OUTPUTS.title)}</b>: no run found; "
            f"run <code>{_e(experiments[k].OUTPUTS.command)} --out {_e(base / k)}</code></li>" for k in missing)
        missing_html = f'<div id="not-in-directory"><h3>Not in this directory</h3><ul>{items}</ul></div>'
    warn = ""
    if incomplete:
        items = "".join(f"<li>{_e(r.outputs.label)} <code>{_e(r.path)}</code>: "
                        f"status “{_e(r.status)}”</li>" for r in incomplete)
        warn = f'<div class="warn" id="incomplete-runs"><b>Unfinished runs</b><ul>{items}</ul></div>'
    now = time.strftime("%Y-%m-%d %H:%M:%S %z")
    findings = "".join(card for _, _, card, _ in sections)
    body = (
        f"<h1>spectra_lens report</h1><p>results directory <code>{_e(root)}</code> · generated {now} "
        f"by spectra_lens {_e(__version__)} · {len(runs)} run(s), {len(figs.specs)} figure(s)</p>"
        f'{warn}<div id="findings"><h2>Findings</h2>{findings}</div>'
        f"<nav><h2>Runs</h2><ul>{nav}</ul></nav>{missing_html}{''.join(h for _, _, _, h in sections)}"
    )
    return document(f"spectra_lens report: {root.name}", body, figs, plotlyjs=plotlyjs, css=_CSS,
                    generator=GENERATOR)


GENERATOR = "spectra_lens report"  # <meta name="generator"> of the page: a report may replace it


def _is_report(path: Path) -> bool:
    """Whether `path` is a page this module wrote (its <meta name="generator">)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">' in head


def write_report(results_dir: str | os.PathLike, experiments: Mapping[str, Experiment],
                 out: str | os.PathLike | None = None, *, plotlyjs: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write `build_report(results_dir, experiments)` atomically to `out` (default
    RESULTS_DIR/report.html), and plotly.js beside it (`page.PLOTLYJS_FILE`, once; the page and
    the runs' figure pages load it). `plotlyjs`: "inline" embeds it in the page instead; any
    other value is the path or URL the page loads it from.

    An existing `out` is replaced only with `overwrite`, or, at the default location, when it
    is a report page this function wrote; otherwise SpectraError, and nothing is written."""
    default = out is None
    out = Path(results_dir) / REPORT_NAME if default else Path(out)
    if out.is_dir():
        raise SpectraError(f"--out {str(out)!r} is a directory; expected an HTML file to write")
    if (out.exists() or out.is_symlink()) and not overwrite and not (default and _is_report(out)):
        raise SpectraError(f"--out {str(out)!r} exists: pass --overwrite to replace it, or name "
                           f"another file")
    if plotlyjs == "inline":
        src = None
    elif plotlyjs is None:
        src = PLOTLYJS_FILE
    else:
        src = plotlyjs
    page = build_report(results_dir, experiments, plotlyjs=src, link_from=out.parent)
    if plotlyjs is None:
        try:  # a folder that cannot be made (a file on the path, no permission) is the user's error
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpectraError(f"cannot write {out}: {e.strerror or e} ({e.filename})") from e
        write_plotlyjs(out.parent)

    # the writer creates the file with the umask's permissions, like every other output
    return atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
