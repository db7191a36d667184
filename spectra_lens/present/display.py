"""HTML and progress helpers shared by the result types: how results look in Jupyter
(`_repr_html_`) and how long work shows its progress (tqdm bars that stay on screen, one-line
notes for steps without a count, and `write` for any message printed while a bar is live).
"""

import html
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["html_card", "note", "note_if_slow", "progress_bar", "stages", "write"]

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
                 unit: str = "it", enabled: bool = True, tick: float | None = 2.0):
    """A labelled tqdm bar that stays on screen when done (`enabled=False`: no output). It is
    redrawn every `tick` seconds until closed, so a long first step shows its elapsed time
    instead of a frozen 0% (None: redrawn only when it advances)."""
    from tqdm.auto import tqdm

    bar = tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=True,
               dynamic_ncols=True)
    if tick and not bar.disable:
        _redraw_every(bar, tick)
    return bar


def _redraw_every(bar, tick: float) -> None:
    """Refresh `bar` every `tick` seconds from a daemon thread until it is closed (tqdm's close
    sets `disable`) or garbage-collected; the thread holds only a weak reference."""
    ref = weakref.ref(bar)

    def redraw() -> None:
        while True:
            time.sleep(tick)
            b = ref()
            if b is None or b.disable:
                return
            b.refresh()
            del b

    threading.Thread(target=redraw, daemon=True, name="spectra-lens-bar").start()


@contextmanager
def stages(desc: str, names: list[str], *, enabled: bool = True, tick: float = 2.0) -> Iterator:
    """A bar over named stages of one long step: `with stages("load model", [...]) as step:`
    then `step("weights")` before each stage; the current stage shows beside the bar, and the
    bar redraws every `tick` seconds, so a long stage shows its elapsed time instead of silence."""
    bar = progress_bar(total=len(names), desc=desc, unit="step", enabled=enabled, tick=tick)
    started = []

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
        bar.close()


def write(text: str, *, file=None) -> None:
    """`text` on its own line(s) of `file` (default: stderr at call time), above any live bar:
    tqdm clears the bars, writes the text and draws them again, so a message never lands in the
    middle of a bar's line and the bar is not torn."""
    from tqdm import tqdm

    tqdm.write(text.rstrip("\n"), file=sys.stderr if file is None else file)


def note(text: str, *, enabled: bool = True) -> None:
    """A one-line status message on stderr (above any live bar) for a step that has no count to
    show in a bar; `enabled=False`: nothing, like a disabled bar."""
    if enabled:
        write(text)


@contextmanager
def note_if_slow(text: str, *, after: float = 1.0, enabled: bool = True) -> Iterator[None]:
    """`note(text)` once the block has run for `after` seconds; nothing for a quicker block (a
    module already imported, a cached result), so fast paths stay silent."""
    if not enabled:
        yield
        return
    timer = threading.Timer(after, note, args=(text,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
