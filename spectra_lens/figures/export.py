"""Writing figures: plotly JSON and HTML always (plotly.js once beside the pages, so they work
offline), PNG where an image exporter works."""

import logging
import os
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from spectra_lens.runs import atomic_write

__all__ = ["save_figure"]

log = logging.getLogger(__name__)


def save_figure(fig: go.Figure, path: str | os.PathLike, *, png: bool = True) -> list[Path]:
    """Write `path`.html and `path`.json (the plotly figure; both atomically) and, where an
    exporter works, `path`.png; the paths written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    html = path.with_suffix(".html")
    # "directory": one plotly.min.js beside the pages, loaded by relative path (offline).
    # plotly writes that bundle non-atomically, and only when it is missing, so a crash mid-write
    # would leave a truncated bundle for good: write it here, atomically, first.
    bundle = path.parent / "plotly.min.js"
    if not bundle.exists():
        atomic_write(bundle, lambda tmp: Path(tmp).write_text(get_plotlyjs(), encoding="utf-8"))
    atomic_write(html, lambda tmp: fig.write_html(tmp, include_plotlyjs="directory",
                                                  full_html=True))
    json_path = path.with_suffix(".json")
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(fig.to_json(), encoding="utf-8"))
    written = [html, json_path]
    if png:
        try:
            atomic_write(path.with_suffix(".png"),
                         lambda tmp: fig.write_image(tmp, width=900, height=600))
            written.append(path.with_suffix(".png"))
        except Exception as e:  # kaleido missing or without a browser: HTML is enough
            log.info("PNG export skipped for %s: %s", path.name, e)
    return written
