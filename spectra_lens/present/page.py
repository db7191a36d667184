"""The one HTML page builder of the report and the head page: style, plotly.js, figures, and the
render-status script a headless browser reads.

`Figures` collects plotly figures as JSON by div id while a page's body is written (`div`);
`document(title, body, figures)` wraps the body into a page that loads plotly.js once (inline by
default, or from `plotlyjs`, a path or URL), holds every figure's JSON in
`<script id="spectra-figure-data">`, and plots them all. After plotting, its script writes into
the hidden element `#spectra-render-status` a JSON object `{figure_id: {"traces", "with_data",
"rendered", "error"}}` and sets `data-done="1"`, so a headless browser (and the tests) can check
that every figure drew its data.

A results tree holds one copy of plotly.js, `PLOTLYJS_FILE`, beside its report
(`write_plotlyjs`); the run directories' figure pages find it with `plotlyjs_loader`, which
tries `shared_plotlyjs_candidates()` in order.

Scatter plots with WebGL (`scattergl`) of at most `SVG_POINTS` points are drawn as SVG instead,
which works without a GPU (headless browsers, remote desktops) and prints.
"""

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import plotly
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from spectra_lens.io import atomic_write

__all__ = ["CSS", "PLOTLYJS_FILE", "PLOT_JS", "SVG_POINTS", "Figures", "document", "escape", "figure_title",
           "plotlyjs_loader", "script_json", "shared_plotlyjs_candidates", "write_plotlyjs"]

# The one copy of plotly.js of a results tree, written beside the report (`write_plotlyjs`) and
# loaded by every page under it; its name carries plotly's version, so pages written by another
# version never load a bundle they were not written for.
PLOTLYJS_FILE = f"plotly-{plotly.__version__}.min.js"

# Above this many points a WebGL scatter stays WebGL; below it becomes SVG, which draws without
# a GPU (headless browsers, remote desktops) and prints.
SVG_POINTS = 60_000


def escape(s: Any) -> str:
    """`s` as text safe in HTML content and attribute values."""
    return html.escape(str(s), quote=True)


def script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can appear."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")


def figure_title(fig: dict, default: str) -> str:
    """The title text of a figure's JSON, without markup; `default` when it has none."""
    t = fig.get("layout", {}).get("title")
    if isinstance(t, dict):
        t = t.get("text")
    return re.sub(r"<[^>]+>", " ", t).strip() if isinstance(t, str) and t.strip() else default


def _svg_if_small(fig: dict) -> dict:
    gl = [t for t in fig["data"] if t.get("type") == "scattergl"]
    if gl and sum(_n_points(t) for t in gl) <= SVG_POINTS:
        fig = {**fig, "data": [{**t, "type": "scatter"} if t.get("type") == "scattergl" else t
                               for t in fig["data"]]}
    return fig


def _n_points(trace: dict) -> int:
    x = trace.get("x", trace.get("y"))
    if isinstance(x, dict) and "bdata" in x:  # plotly's typed-array spec {dtype, bdata[, shape]}
        try:
            return len(base64.b64decode(x["bdata"])) // np.dtype(x.get("dtype", "f8")).itemsize
        except (ValueError, TypeError):
            return SVG_POINTS + 1  # unknown: leave it as WebGL
    return len(x) if isinstance(x, list) else 0


# Characters of a title that fit on one line of a figure in the page's grid (≥ 540 px wide) and
# of a figure spanning the page; longer titles are wrapped at spaces and the top margin grows.
_TITLE_CHARS, _WIDE_TITLE_CHARS = 52, 110


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _fit_title(fig: dict) -> dict:
    """`fig` with a long title wrapped onto lines that fit its width (no clipping), the top
    margin grown to hold them."""
    layout = fig.get("layout", {})
    title = layout.get("title")
    text = title.get("text") if isinstance(title, dict) else title
    if not isinstance(text, str) or "<br" in text:
        return fig
    wide = any(re.fullmatch(r"xaxis\d+", k) for k in layout)
    width = layout.get("width")
    chars = int(width / 11) if isinstance(width, (int, float)) else (_WIDE_TITLE_CHARS if wide else _TITLE_CHARS)
    lines = _wrap(text, max(20, chars))
    if len(lines) == 1:
        return fig
    title = {**(title if isinstance(title, dict) else {}), "text": "<br>".join(lines)}
    margin = dict(layout.get("margin") or {})
    margin["t"] = max(int(margin.get("t") or 0), 50 + 22 * len(lines))
    return {**fig, "layout": {**layout, "title": title, "margin": margin}}


class Figures:
    """Collects figure JSON by div id while a page's body is written."""

    def __init__(self):
        self.specs: dict[str, dict] = {}

    def div(self, fig: dict | go.Figure, fig_id: str, caption: str) -> str:
        """A `<figure>` holding an empty div that the page's script plots `fig` into. The id is
        made unique (`fig_id-2`, ...); figures with several panels span the full width."""
        if isinstance(fig, go.Figure):
            fig = json.loads(fig.to_json())
        fig = _fit_title(_svg_if_small(fig))
        base, k = fig_id, 1
        while fig_id in self.specs:
            k += 1
            fig_id = f"{base}-{k}"
        self.specs[fig_id] = {"data": fig["data"], "layout": fig.get("layout", {})}
        layout = fig.get("layout", {})
        height = layout.get("height") or 450
        # Figures with several panels get the full width; single panels share a row.
        wide = ' class="wide"' if any(re.fullmatch(r"xaxis\d+", k) for k in layout) else ""
        return (f'<figure{wide}><div class="plotly-figure" id="{escape(fig_id)}" '
                f'style="height:{int(height)}px"></div><figcaption>{escape(caption)}</figcaption></figure>')


CSS = """
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
PLOT_JS = """
function spectraPlot() {
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
}
"""

def shared_plotlyjs_candidates(levels: int = 5) -> list[str]:
    """Where a page written under a results tree finds plotly.js: beside itself (`plotly.min.js`,
    as `save_figure` writes it, or `PLOTLYJS_FILE`), then `PLOTLYJS_FILE` in each of the
    `levels` directories above it (the report writes it beside itself, `write_plotlyjs`)."""
    return ["plotly.min.js", PLOTLYJS_FILE] + ["../" * k + PLOTLYJS_FILE for k in range(1, levels + 1)]


def plotlyjs_loader(paths: list[str]) -> str:
    """Scripts for a page's <head> that load plotly.js synchronously from the first of `paths`
    that exists (each is tried only when the ones before it did not define `Plotly`), so the
    page's own scripts below run as with a plain <script src>; when none loads, a line on the
    page says where to get it."""
    tags = []
    for i, src in enumerate(paths):
        tag = script_json(f'<script src="{escape(src)}"></script>').replace("/", "\\/")
        tags.append(f"<script>{'' if i == 0 else 'if (!window.Plotly) '}document.write({tag});</script>")
    note = script_json(_NO_PLOTLY.replace('style="display:none"', ""))
    tags.append(f"<script>if (!window.Plotly) document.write({note});</script>")
    return "".join(tags)


def write_plotlyjs(directory: str | os.PathLike) -> Path:
    """`directory`/`PLOTLYJS_FILE` (atomically), unless a copy of the same size is there."""
    path = Path(directory) / PLOTLYJS_FILE
    code = get_plotlyjs()
    if path.is_file() and path.stat().st_size == len(code.encode("utf-8")):
        return path

    def write(tmp: str) -> None:
        Path(tmp).write_text(code, encoding="utf-8")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; pages load it

    return atomic_write(path, write)


def _plotlyjs_tag(src: str | None) -> str:
    if src is None:
        return f"<script>{get_plotlyjs()}</script>"
    return f'<script src="{escape(src)}"></script>'


_NO_PLOTLY = ('<p id="spectra-no-plotly" class="flag" style="display:none">The figures need plotly.js, '
              f"which was not found beside this page or in the directories above it: "
              f"<code>spectra-lens report RESULTS_DIR</code> writes it (<code>{PLOTLYJS_FILE}</code>) "
              "beside the report.</p>")


def document(title: str, body: str, figures: Figures, *, plotlyjs: str | None = None,
             css: str = "", generator: str = "spectra_lens") -> str:
    """The whole page: `body` (HTML) under the shared style (plus `css`), plotly.js inline once
    (or loaded from `plotlyjs`, a path or URL), every figure of `figures` plotted into its div,
    and the render status written into `#spectra-render-status`. `generator` is written into
    `<meta name="generator">`."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f'<meta name="generator" content="{escape(generator)}">'
        f"<title>{escape(title)}</title><style>{CSS}{css}</style>"
        f"{_plotlyjs_tag(plotlyjs)}</head><body>{body}"
        f'<div id="spectra-render-status"></div>'
        f'<script type="application/json" id="spectra-figure-data">{script_json(figures.specs)}</script>'
        f"<script>{PLOT_JS}spectraPlot();</script></body></html>\n"
    )
