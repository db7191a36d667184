"""HTML and progress helpers shared by the result types: how results look in Jupyter
(`_repr_html_`) and how long work shows its progress (tqdm bars that stay on screen).
"""

import html
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["html_card", "progress_bar", "stages"]

_STYLE = ("font-family:system-ui,sans-serif;font-size:13px;border:1px solid #ddd;border-radius:4px;"
          "padding:6px 10px;display:inline-block;max-width:100%;overflow-x:auto")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)) and len(value) > 8:
        return html.escape(f"{list(value[:3])[:-1]} … {list(value[-2:])} ({len(value)} values)")
    return html.escape(str(value))


def html_card(title: str, fields: Mapping[str, Any], tables: Mapping[str, Any] | None = None,
              *, max_rows: int = 10) -> str:
    """A titled key/value table, then each (name, DataFrame) of `tables` cut to `max_rows` rows."""
    rows = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(k))}</th>"
                   f"<td style='text-align:left'>{_cell(v)}</td></tr>" for k, v in fields.items())
    parts = [f"<div style='{_STYLE}'><b>{html.escape(title)}</b><table>{rows}</table>"]
    for name, frame in (tables or {}).items():
        more = f" (first {max_rows} of {len(frame)} rows)" if len(frame) > max_rows else ""
        parts.append(f"<div><i>{html.escape(name)}</i>{more}"
                     f"{frame.head(max_rows).to_html(index=False, float_format='%.4g', border=0)}</div>")
    parts.append("</div>")
    return "".join(parts)


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str,
                 unit: str = "it", enabled: bool = True):
    """A labelled tqdm bar that stays on screen when done (`enabled=False`: no output)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=True,
                dynamic_ncols=True)


@contextmanager
def stages(desc: str, names: list[str], *, enabled: bool = True, tick: float = 2.0) -> Iterator:
    """A bar over named stages of one long step: `with stages("load model", [...]) as step:`
    then `step("weights")` before each stage; the current stage shows beside the bar, and the
    bar redraws every `tick` seconds, so a long stage shows its elapsed time instead of silence."""
    bar = progress_bar(total=len(names), desc=desc, unit="step", enabled=enabled)
    started = []
    done = threading.Event()
    if enabled and not bar.disable:
        def redraw() -> None:
            while not done.wait(tick):
                bar.refresh()

        threading.Thread(target=redraw, daemon=True).start()

    def step(name: str) -> None:
        if started:
            bar.update(1)
        started.append(name)
        bar.set_postfix_str(name, refresh=True)

    try:
        yield step
        if started:
            bar.update(1)
        bar.set_postfix_str("done", refresh=True)
    finally:
        done.set()
        bar.close()
