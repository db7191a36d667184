"""One self-contained HTML page from a results directory.

    spectra-lens report RESULTS_DIR [--out FILE]       (default: RESULTS_DIR/report.html)
    spectra-lens report RESULTS_DIR --pdf              (also report.pdf, printed by Chromium)

The directory (and its subdirectories) is scanned for run directories: a `manifest.json` whose
"experiment" is one of `EXPERIMENTS`. Each run gets a section with its manifest (status, model,
config, versions, timings), its key tables (top rows of its CSVs) and its figures. Figures are
built by the experiment's own `figures(tables)` from the CSVs it declared (`OUTPUTS`), the same
function the run used to write them, so the page shows exactly the run's figures. Experiments with
no run are named in a "not in this directory" list, and a run whose status is not "complete" is
flagged.

The page needs no network: plotly.js is embedded once, inline (or referenced with
`--plotlyjs PATH_OR_URL`), and every figure is plotted from JSON held in the page. After plotting, a script writes into the hidden element
`#spectra-render-status` a JSON object `{figure_id: {"traces", "with_data", "rendered",
"error"}}`, so a headless browser (and the tests) can check that every figure drew its data.
"""

import base64
import html
import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from spectra_lens.errors import SpectraError
from spectra_lens.io import atomic_write
from spectra_lens.runs.outputs import Table
from spectra_lens.runs.rundir import MANIFEST, read_manifest

__all__ = ["EXPERIMENTS", "Run", "build_report", "command", "find_runs", "main", "write_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
_MAX_DEPTH = 4  # results/<group>/<run>/ is as deep as anyone nests runs
_SKIP_DIRS = {"records", "shards", "figures", "__pycache__"}  # large or never runs
# Above this many points a WebGL scatter stays WebGL; below it becomes SVG, which draws without
# a GPU (headless browsers, remote desktops) and prints.
_SVG_POINTS = 60_000


# experiment name (manifest "experiment") -> module with OUTPUTS and figures(tables)
EXPERIMENTS: dict[str, str] = {
    "observational": "spectra_lens.experiments.observational",
    "intervention": "spectra_lens.experiments.intervention",
    "gain": "spectra_lens.experiments.gain",
    "qk_control": "spectra_lens.experiments.qk_control",
}


def _module(experiment: str):
    return importlib.import_module(EXPERIMENTS[experiment])


def _outputs(experiment: str):
    return _module(experiment).OUTPUTS


@dataclass(frozen=True)
class Run:
    """One run directory found under the results directory."""

    experiment: str
    path: Path
    manifest: dict = field(repr=False)

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def complete(self) -> bool:
        return self.status == "complete"


# --------------------------------------------------------------------------- finding runs


def find_runs(results_dir: str | os.PathLike) -> list[Run]:
    """Run directories at or below `results_dir` (depth ≤ 4), in experiment then path order.

    A run directory holds a `manifest.json` whose "experiment" is a key of `EXPERIMENTS`; its
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
            if manifest is not None and manifest.get("experiment") in EXPERIMENTS:
                runs.append(Run(manifest["experiment"], here, manifest))
                dirnames.clear()
                continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS
                             and depth < _MAX_DEPTH)
    order = list(EXPERIMENTS)
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


def _top(frame: pd.DataFrame, spec: Table) -> tuple[pd.DataFrame, str]:
    """The rows and columns of `frame` to show, and how they were chosen."""
    how = []
    key = next((c for c in spec.sort_abs if c in frame.columns), None)
    if key is not None and pd.api.types.is_numeric_dtype(frame[key]):
        frame = frame.reindex(frame[key].abs().sort_values(ascending=False, na_position="last").index)
        how.append(f"sorted by |{key}|")
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
            cells[mark] = f'<a href="{_e(href)}" title="page of L{int(layer)}H{int(head)}">{int(head)}</a>'
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


def _tables_html(run: Run, links: dict[tuple[int, int], str] | None = None) -> str:
    spec = _outputs(run.experiment)
    parts, shown = [], set()
    for t in spec.tables:
        files = sorted(run.path.glob(t.pattern), key=_natural_key)
        if not t.rows:  # data of a figure, not a table to read
            shown.update(files)
            continue
        if not files:
            parts.append(f'<p class="missing">{_e(t.pattern)}: not found in this run.</p>')
            continue
        for f in files:
            shown.add(f)
            parts.append(_one_table(f, t, t.title if len(files) == 1 else f"{t.title}: {f.stem}", links))
    others = [f for f in sorted(run.path.glob("*.csv"), key=_natural_key) if f not in shown]
    if others:
        inner = "".join(_one_table(f, Table(f.name, f.stem, rows=10), f.stem, links) for f in others)
        parts.append(f"<details><summary>other tables ({len(others)})</summary>{inner}</details>")
    return "".join(parts)


def _one_table(path: Path, spec: Table, title: str, links: dict[tuple[int, int], str] | None = None) -> str:
    try:
        frame = _read_csv(path)
    except SpectraError as e:
        return f'<h4>{_e(title)}</h4><p class="missing">{_e(str(e))}</p>'
    shown, how = _top(frame, spec)
    return (f'<h4>{_e(title)}</h4><p class="caption"><code>{_e(path.name)}</code>: {_e(how)}</p>'
            f'<div class="scroll">{_frame_html(shown, links)}</div>')


# --------------------------------------------------------------------------- figures


def _figure_json(fig: go.Figure) -> dict:
    return json.loads(fig.to_json())


def _svg_if_small(fig: dict) -> dict:
    gl = [t for t in fig["data"] if t.get("type") == "scattergl"]
    if gl and sum(_n_points(t) for t in gl) <= _SVG_POINTS:
        fig = {**fig, "data": [{**t, "type": "scatter"} if t.get("type") == "scattergl" else t
                               for t in fig["data"]]}
    return fig


def _n_points(trace: dict) -> int:
    x = trace.get("x", trace.get("y"))
    if isinstance(x, dict) and "bdata" in x:  # plotly's typed-array spec {dtype, bdata[, shape]}
        try:
            return len(base64.b64decode(x["bdata"])) // np.dtype(x.get("dtype", "f8")).itemsize
        except (ValueError, TypeError):
            return _SVG_POINTS + 1  # unknown: leave it as WebGL
    return len(x) if isinstance(x, list) else 0


def _title(fig: dict, default: str) -> str:
    t = fig.get("layout", {}).get("title")
    if isinstance(t, dict):
        t = t.get("text")
    return re.sub(r"<[^>]+>", " ", t).strip() if isinstance(t, str) and t.strip() else default


# --------------------------------------------------------------------------- the page


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


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
    m = run.manifest
    top = {k: v for k, v in m.items() if not isinstance(v, dict)}
    parts = [_kv_table("run", top)]
    for key in ("model", "config", "timings", "versions"):
        if isinstance(m.get(key), dict):
            parts.append(_kv_table(key, m[key]))
    for key, v in m.items():
        if isinstance(v, dict) and key not in ("model", "config", "timings", "versions"):
            parts.append(_kv_table(key, v))
    return f'<div class="manifest">{"".join(parts)}</div>'


class _Figures:
    """Collects figure JSON by div id while sections are written."""

    def __init__(self):
        self.specs: dict[str, dict] = {}

    def div(self, fig: dict, fig_id: str, caption: str) -> str:
        fig = _svg_if_small(fig)
        base, k = fig_id, 1
        while fig_id in self.specs:
            k += 1
            fig_id = f"{base}-{k}"
        self.specs[fig_id] = {"data": fig["data"], "layout": fig.get("layout", {})}
        layout = fig.get("layout", {})
        height = layout.get("height") or 450
        # Figures with several panels get the full width; single panels share a row.
        wide = ' class="wide"' if any(re.fullmatch(r"xaxis\d+", k) for k in layout) else ""
        return (f'<figure{wide}><div class="plotly-figure" id="{_e(fig_id)}" '
                f'style="height:{int(height)}px"></div><figcaption>{_e(caption)}</figcaption></figure>')


def run_figures(run: Run) -> dict[str, go.Figure]:
    """The figures of `run`, built by its experiment's `figures(tables)` from its CSVs."""
    return _module(run.experiment).figures(_outputs(run.experiment).read_tables(run.path))


def _figures_html(run: Run, figs: _Figures, prefix: str) -> str:
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
    divs = "".join(figs.div(f, f"fig-{prefix}-{_slug(n)}", f"{_title(f, n)} — {n}") for n, f in items)
    note_html = f'<p class="note">{_e(note)}</p>' if note else ""
    return f"{note_html}<div class=\"figures\">{divs}</div>"


def _section(run: Run, root: Path, figs: _Figures, used: set[str],
             links: dict[tuple[int, int], str] | None = None) -> tuple[str, str, str]:
    """(section id, heading, html) of one run; `links`: head pages to link from its tables."""
    spec = _outputs(run.experiment)
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
    heading = f"{spec.label} {spec.title}" + ("" if rel == "." else f" ({rel})")
    return sid, heading, (
        f'<section id="{sid}"><h2>{_e(spec.label)} {_e(spec.title)} '
        f'<span class="badge {badge}">{_e(run.status)}</span></h2>'
        f'<p class="path">run directory: <code>{_e(rel)}</code></p>{flag}'
        f"<h3>Manifest</h3>{_manifest_html(run)}"
        f"<h3>Tables</h3>{_tables_html(run, links)}"
        f"<h3>Figures</h3>{_figures_html(run, figs, sid)}</section>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1280px;
 padding:0 1.5rem 4rem;color:#1d2330;line-height:1.45}
h1{margin-top:1.5rem}h2{border-bottom:2px solid #d8dde6;padding-bottom:.3rem;margin-top:2.5rem}
code{background:#f2f4f8;padding:0 .25em;border-radius:3px}
.badge{font-size:.7em;padding:.15em .6em;border-radius:1em;vertical-align:middle;color:#fff}
.badge.complete{background:#2e7d32}.badge.incomplete{background:#c62828}
.flag,.warn{background:#fdecea;border-left:4px solid #c62828;padding:.5rem .8rem}
.missing,.note{color:#6b7280;font-style:italic}
.manifest{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.kv h4{margin:.2rem 0}table{border-collapse:collapse;font-size:.85rem}
table.kv th{text-align:left;font-weight:500;color:#4b5563;padding:.1rem .8rem .1rem 0}
table.kv td{font-family:ui-monospace,monospace;padding:.1rem 0;max-width:32rem;overflow-wrap:anywhere}
table.data th,table.data td{padding:.2rem .6rem;border-bottom:1px solid #e5e7eb;text-align:right;white-space:nowrap}
table.data tr:nth-child(even){background:#f8fafc}table.data th{background:#eef1f6;position:sticky;top:0}
.scroll{overflow-x:auto;max-width:100%}.caption{margin:.1rem 0 .4rem;color:#4b5563;font-size:.85rem}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:1rem}
figure{margin:0;border:1px solid #e5e7eb;border-radius:6px;padding:.5rem;min-width:0}
figure.wide{grid-column:1/-1}
figcaption{color:#4b5563;font-size:.85rem;text-align:center}
nav ul{columns:2}#spectra-render-status{display:none}
@media print{body{max-width:none;padding:0 .5rem}.modebar-container{display:none}
 figure{break-inside:avoid}.scroll{overflow:visible}table.data th{position:static}}
"""

# Plots every figure, then records per figure: traces, traces with data, trace groups drawn.
_PLOT_JS = """
(function () {
  var specs = JSON.parse(document.getElementById("spectra-figure-data").textContent);
  var status = {};
  function len(v) { return v && typeof v.length === "number" ? v.length : 0; }
  function withData(gd) {
    return (gd._fullData || []).filter(function (t) {
      return t.visible !== false && ["x", "y", "z", "values", "r", "lat"].some(function (k) {
        return len(t[k]) > 0; });
    }).length;
  }
  function rendered(gd) {
    var n = 0;
    gd.querySelectorAll("g.trace").forEach(function (g) {
      if (g.querySelector("path.point, path.js-line, path.js-fill, .point path, path.surface")) n++;
    });
    gd.querySelectorAll("g.hm, g.contour").forEach(function (g) {
      if (g.querySelector("image, path")) n++;
    });
    gd.querySelectorAll(".gl-container canvas").forEach(function (c) { if (c.width > 0) n++; });
    return n;
  }
  var jobs = Object.keys(specs).map(function (id) {
    var fig = specs[id];
    return Promise.resolve().then(function () {
      return Plotly.newPlot(id, fig.data, fig.layout, {responsive: true, displaylogo: false});
    }).then(function (gd) {
      status[id] = {traces: fig.data.length, with_data: withData(gd), rendered: rendered(gd), error: null};
    }, function (e) {
      status[id] = {traces: fig.data.length, with_data: 0, rendered: 0, error: String(e)};
    });
  });
  Promise.all(jobs).then(function () {
    var el = document.getElementById("spectra-render-status");
    el.textContent = JSON.stringify(status);
    el.setAttribute("data-done", "1");
  });
})();
"""


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can appear."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")


def build_report(results_dir: str | os.PathLike, *, plotlyjs: str | None = None,
                 link_from: str | os.PathLike | None = None) -> str:
    """The report of every run under `results_dir`, as one HTML page: self-contained (plotly.js
    inline, once) by default, or loading plotly.js from `plotlyjs` (a path or URL).

    Heads in its tables link to their pages in `results_dir/heads/` (`spectra-lens head`), by
    paths relative to `link_from`, the directory the page will be saved in (default:
    `results_dir`)."""
    from spectra_lens import __version__

    root = Path(results_dir).resolve()
    runs = find_runs(root)
    if not runs:
        raise SpectraError(
            f"no run directory under {str(root)!r}: expected a {MANIFEST} with \"experiment\" one "
            f"of {list(EXPERIMENTS)} in it or in a subdirectory"
        )
    present = {r.experiment for r in runs}
    missing = [k for k in EXPERIMENTS if k not in present]
    incomplete = [r for r in runs if not r.complete]
    figs, used = _Figures(), set()
    links = _head_links(root, Path(link_from).resolve() if link_from is not None else root)
    sections = [_section(r, root, figs, used, links) for r in runs]
    nav = "".join(f'<li><a href="#{i}">{_e(t)}</a></li>' for i, t, _ in sections)
    missing_html = ""
    # Where a missing run would go: beside the others (the parent when root is itself a run).
    base = root.parent if any(r.path == root for r in runs) else root
    if missing:
        items = "".join(
            f"<li><b>{_e(_outputs(k).label)} {_e(_outputs(k).title)}</b>: no run found; "
            f"run <code>{_e(_outputs(k).command)} --out {_e(base / k)}</code></li>" for k in missing)
        missing_html = f'<div id="not-in-directory"><h3>Not in this directory</h3><ul>{items}</ul></div>'
    warn = ""
    if incomplete:
        items = "".join(f"<li>{_e(_outputs(r.experiment).label)} <code>{_e(r.path)}</code>: "
                        f"status “{_e(r.status)}”</li>" for r in incomplete)
        warn = f'<div class="warn" id="incomplete-runs"><b>Unfinished runs</b><ul>{items}</ul></div>'
    now = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>spectra_lens report: {_e(root.name)}</title><style>{_CSS}</style>"
        f"{_plotlyjs_tag(plotlyjs)}</head><body>"
        f"<h1>spectra_lens report</h1><p>results directory <code>{_e(root)}</code> · generated {now} "
        f"by spectra_lens {_e(__version__)} · {len(runs)} run(s), {len(figs.specs)} figure(s)</p>"
        f"{warn}<nav><ul>{nav}</ul></nav>{missing_html}{''.join(h for _, _, h in sections)}"
        f'<div id="spectra-render-status"></div>'
        f'<script type="application/json" id="spectra-figure-data">{_script_json(figs.specs)}</script>'
        f"<script>{_PLOT_JS}</script></body></html>\n"
    )


def _plotlyjs_tag(src: str | None) -> str:
    if src is None:
        return f"<script>{get_plotlyjs()}</script>"
    return f'<script src="{_e(src)}"></script>'


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 plotlyjs: str | None = None) -> Path:
    """Write `build_report(results_dir)` atomically to `out` (default RESULTS_DIR/report.html)."""
    out = Path(out) if out is not None else Path(results_dir) / REPORT_NAME
    page = build_report(results_dir, plotlyjs=plotlyjs, link_from=out.parent)

    def write(tmp: str) -> None:
        Path(tmp).write_text(page, encoding="utf-8")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is for reading

    return atomic_write(out, write)


def _runs_summary(runs: list[Run]) -> Iterator[str]:
    for r in runs:
        yield f"{_outputs(r.experiment).label} {r.experiment} ({r.status})"


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
    """`python -m spectra_lens.present.report`: the same as `spectra-lens report`."""
    from spectra_lens.cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
