"""Writing figures: HTML always, and static images (PNG, SVG) and PDFs drawn by a system Chromium.

HTML: `save_figure` / `write_figures` write `name.html` atomically and `name.json`, the plotly
figure (the report reads it back). A page loads plotly.js from beside itself (`save_figure`
writes `plotly.min.js` there) or from the one copy of its results tree that `spectra-lens
report` writes beside the report (`write_figures`, which runs use), so it works offline.

Images are exported in one batch: `export_images` starts one process (`_export_worker`) that
starts one headless browser (kaleido >= 1, which drives Chrome/Chromium over the DevTools
protocol through choreographer), renders every figure in a few tabs, writes each file
atomically and closes the browser. The process runs in its own session: a Ctrl-C during the
export stops it and its browser (nothing is left running) and reaches the caller as
KeyboardInterrupt, as in every other phase of a run. An experiment writes
its HTML figures, then exports all their images once at the end of the run (`write_figures`);
inside `deferred_images()` the exports of several runs wait and share one browser.

Nothing here touches the network: plotly.js is the copy inside the plotly package, MathJax is
off, and the browser is the one installed on the machine (`find_browser`: $SPECTRA_CHROMIUM,
else $BROWSER_PATH, else chromium / google-chrome on PATH; `scripts/install_chromium.sh`
installs Debian's). Where no browser exists, or it fails to start, the images are skipped with
one warning that says why and how to get them; the HTML figures are always written.
$SPECTRA_NO_IMAGES=1 turns every export off (the test suite sets it; its image tests unset it).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from spectra_lens.errors import SpectraError
from spectra_lens.io import atomic_write, atomic_write_bytes

__all__ = [
    "BROWSER_ENV",
    "DEFAULT_IMAGES",
    "IMAGE_FORMATS",
    "NO_IMAGES_ENV",
    "ImageExport",
    "deferred_images",
    "export_images",
    "find_browser",
    "image_formats",
    "print_pdf",
    "save_figure",
    "write_figures",
]

log = logging.getLogger(__name__)

BROWSER_ENV = "SPECTRA_CHROMIUM"
NO_IMAGES_ENV = "SPECTRA_NO_IMAGES"  # set (not "0"): every run writes HTML only, like --no-images
IMAGE_FORMATS = ("png", "svg")
DEFAULT_IMAGES = ("png",)  # what a run writes beside each HTML figure unless told otherwise
DEFAULT_WIDTH, DEFAULT_HEIGHT = 900, 600  # CSS pixels, unless the figure's layout sets its own
DEFAULT_SCALE = 2  # device pixels per CSS pixel in PNGs: sharp in papers and slides
_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])  # the directory holding spectra_lens/
_INSTALL_HINT = (f"run scripts/install_chromium.sh (Debian/Ubuntu) or set {BROWSER_ENV} to a "
                 "Chrome/Chromium binary")


def find_browser() -> str | None:
    """The Chrome/Chromium binary to draw with, or None: ${BROWSER_ENV}, else $BROWSER_PATH,
    else the first of chromium, chromium-browser, google-chrome on PATH.

    Raises SpectraError when ${BROWSER_ENV} names no executable (a typo should not silently
    fall back to another browser).
    """
    named = os.environ.get(BROWSER_ENV)
    if named:
        found = shutil.which(named)
        if not found:
            raise SpectraError(f"{BROWSER_ENV}={named!r} is not an executable file")
        return found
    named = os.environ.get("BROWSER_PATH")  # choreographer's own variable
    if named and shutil.which(named):
        return shutil.which(named)
    for name in _NAMES:
        if found := shutil.which(name):
            return found
    return None


@dataclass
class ImageExport:
    """What one export did: files written, files that failed (path -> reason), and, when
    nothing could be drawn at all, why (`skipped`)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    skipped: str | None = None
    browser: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.failed


def _size(fig: go.Figure, width: int | None, height: int | None) -> tuple[int, int]:
    return (int(fig.layout.width or width or DEFAULT_WIDTH),
            int(fig.layout.height or height or DEFAULT_HEIGHT))


def export_images(
    items: Iterable[tuple[go.Figure, str | os.PathLike]],
    formats: Sequence[str] = ("png",),
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = DEFAULT_SCALE,
    browser: str | None = None,
    tabs: int = 2,
    timeout: float = 120.0,
) -> ImageExport:
    """Write `path`.{fmt} for every (figure, path) and every format in `formats`, in one browser.

    `path`'s own suffix (.html, .json or an image format) is replaced; any other dot is part of
    the name. Size: the figure's layout width/height, else `width` ×
    `height` (default 900 × 600), times `scale` for PNGs. Never raises for a missing or broken
    browser: the reason is in the result (`skipped`, `failed`) and logged once as a warning.
    """
    formats = image_formats(formats)
    jobs = [(fig, _named(Path(p), fmt), fmt) for fig, p in items for fmt in formats]
    return _export(jobs, width=width, height=height, scale=scale, browser=browser, tabs=tabs,
                   timeout=timeout)


def _export(jobs: list[tuple[go.Figure, Path, str]], *, width: int | None = None,
            height: int | None = None, scale: float = DEFAULT_SCALE, browser: str | None = None,
            tabs: int = 2, timeout: float = 120.0) -> ImageExport:
    """Draw every (figure, file, format) job in one browser session."""
    t0 = time.perf_counter()
    result = ImageExport()
    if not jobs:
        return result
    if os.environ.get(NO_IMAGES_ENV, "") not in ("", "0"):
        result.skipped = f"{NO_IMAGES_ENV} is set"
        log.info("figures written as HTML only: %s", result.skipped)
        return result
    try:
        result.browser = browser or find_browser()
    except SpectraError as e:
        result.skipped = str(e)
    if result.browser is None and result.skipped is None:
        result.skipped = f"no Chrome/Chromium found ({_INSTALL_HINT})"
    if result.skipped is None:
        try:
            _draw_in_process(jobs, result, width, height, scale, tabs, timeout)
        except Exception as e:  # the browser did not start or died: keep the HTML, say why
            why = str(e) if isinstance(e, _ExportError) else _reason(e)
            result.skipped = f"{result.browser} did not start or stopped: {why}"
    result.seconds = time.perf_counter() - t0
    kinds = "/".join(dict.fromkeys(fmt.upper() for _, _, fmt in jobs))
    if result.skipped:
        log.warning("figures written as HTML only, no %s: %s", kinds, result.skipped)
    elif result.failed:
        path, why = next(iter(result.failed.items()))
        log.warning("%d of %d %s images failed (first: %s: %s)", len(result.failed), len(jobs),
                    kinds, path.name, why)
    return result


def _browser_session(browser: str, tabs: int, timeout: float):
    """kaleido's browser (`tabs` tabs), quiet: the driver logs its own retries and watchdog at
    WARNING; our one-line summary says what matters. A level the user set is kept."""
    import kaleido  # the browser driver; imported here because it is only needed to export
    import plotly

    for name in ("choreographer", "kaleido", "logistro"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.ERROR)
    plotlyjs = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return kaleido.Kaleido(n=tabs, timeout=timeout, plotlyjs=str(plotlyjs), mathjax=False, path=browser)


def _draw_in_process(jobs, result: ImageExport, width, height, scale, tabs, timeout) -> None:
    """Draw `jobs` in a child process (`_export_worker`) that runs the browser, and wait for it.

    The child runs in its own session, so a Ctrl-C reaches only this process: on any
    exception here (KeyboardInterrupt included) the child is stopped (SIGTERM, then SIGKILL),
    the browser's process group is killed if it is still there, and the exception propagates.
    Raises _ExportError when the browser did not start or the child failed.
    """
    with tempfile.TemporaryDirectory(prefix="spectra-images-") as tmp:
        work = Path(tmp)
        spec = {"browser": result.browser, "tabs": tabs, "timeout": timeout, "scale": scale,
                "jobs": [dict(zip(("width", "height"), _size(fig, width, height), strict=True),
                              figure=fig.to_json(), path=str(path), format=fmt)
                         for fig, path, fmt in jobs]}
        (work / "jobs.json").write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, "SPECTRA_IMAGES_PARENT": str(os.getpid())}
        # the child imports spectra_lens from wherever this process did
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        limit = 60.0 + timeout * (1 + len(jobs) / max(1, tabs))
        with open(work / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "spectra_lens.present.figures._export_worker",
                                     str(work)], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _stop(proc, work)
                raise _ExportError(f"the export did not finish within {limit:.0f} s") from None
            except BaseException:  # Ctrl-C (KeyboardInterrupt), SystemExit, ...
                _stop(proc, work)
                raise
        done = work / "result.json"
        if code != 0 or not done.is_file():
            _kill_browser(work)
            tail = " ".join((work / "stderr").read_text(errors="replace").strip().splitlines()[-2:])
            raise _ExportError(f"the export process exited with status {code}: {tail[-300:]}")
        got = json.loads(done.read_text(encoding="utf-8"))
    if got["error"]:
        raise _ExportError(got["error"])
    result.written += [Path(p) for p in got["written"]]
    result.failed.update({Path(p): why for p, why in got["failed"].items()})
    order = {p: i for i, (_, p, _) in enumerate(jobs)}
    result.written.sort(key=order.__getitem__)


class _ExportError(RuntimeError):
    """Why the export process drew nothing (its message is the one line the warning shows)."""


def _stop(proc: subprocess.Popen, work: Path) -> None:
    """Stop the export process (it closes its browser on SIGTERM), then its browser's group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _kill_browser(work)


def _kill_browser(work: Path) -> None:
    """SIGKILL the browser's process group (it leads its own session) if any of it is left."""
    try:
        pgid = int((work / "browser.pid").read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _reason(e: BaseException) -> str:
    """One line: the exception's type and first message (kaleido's errors hold tuples)."""
    first = e.args[0] if e.args else ""
    text = " ".join(str(first).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# --------------------------------------------------------------------------- saving figures


def image_formats(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Image formats from a spec: "png", "png,svg", ["svg"], "none" / "" / None (no images).

    Raises SpectraError for a format that is not in IMAGE_FORMATS.
    """
    if spec is None:
        return ()
    parts = spec.replace("+", ",").split(",") if isinstance(spec, str) else list(spec)
    out = tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    if out in ((), ("none",)):
        return ()
    bad = [f for f in out if f not in IMAGE_FORMATS]
    if bad:
        raise SpectraError(f"image formats must be among {list(IMAGE_FORMATS)} (or 'none'), "
                           f"got {', '.join(map(repr, bad))}")
    return out


def _named(path: Path, fmt: str) -> Path:
    """`path` with the suffix `.fmt`: a figure file's own suffix (.html, .json, .png, .svg) is
    replaced, anything else is part of the name (figures/kl_alpha_0.5 -> kl_alpha_0.5.json)."""
    if path.suffix.lower() in (".html", ".json", *(f".{f}" for f in IMAGE_FORMATS)):
        return path.with_suffix(f".{fmt}")
    return path.with_name(f"{path.name}.{fmt}")


def _write_html(fig: go.Figure, path: Path, *, bundle: bool = False) -> list[Path]:
    """`path`.html and `path`.json (the plotly figure, which the report reads back), atomically.

    The page loads plotly.js from the first of `present.page.shared_plotlyjs_candidates()` that
    exists: beside itself, or the one copy of the results tree that `spectra-lens report` writes
    beside the report. With `bundle`, that copy (`plotly.min.js`) is written beside the page
    too, so the page works on its own."""
    from spectra_lens.present.page import plotlyjs_loader, shared_plotlyjs_candidates

    path.parent.mkdir(parents=True, exist_ok=True)
    html = _named(path, "html")
    if bundle:
        bundle_path = path.parent / "plotly.min.js"
        if not bundle_path.exists():
            atomic_write(bundle_path, lambda tmp: Path(tmp).write_text(get_plotlyjs(), encoding="utf-8"))
    page = fig.to_html(include_plotlyjs=False, full_html=True)
    head = page.index("<head>") + len("<head>")
    page = page[:head] + plotlyjs_loader(shared_plotlyjs_candidates()) + page[head:]
    atomic_write(html, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    json_path = _named(path, "json")
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(fig.to_json(), encoding="utf-8"))
    return [html, json_path]


def save_figure(fig: go.Figure, path: str | os.PathLike, *,
                images: str | Sequence[str] | None = (), bundle: bool = True) -> list[Path]:
    """Write `path`.html and `path`.json (atomically) and `path`.{fmt} for each format in
    `images` (none by default); the paths written. With `bundle` (default), plotly.js is
    written beside the page (`plotly.min.js`, once) so it works on its own; without, the page
    loads the results tree's copy (`_write_html`). For many figures use `write_figures`: one
    browser for all."""
    path = Path(path)
    written = _write_html(fig, path, bundle=bundle)
    formats = image_formats(images)
    if formats:
        written += export_images([(fig, path)], formats).written
    return written


# (queued jobs, formats for write_figures calls that name none) of the innermost deferred block
_pending: contextvars.ContextVar[tuple[list, tuple[str, ...]] | None] = contextvars.ContextVar(
    "spectra_pending_images", default=None)


def write_figures(figures: Mapping[str, go.Figure], directory: str | os.PathLike, *,
                  images: str | Sequence[str] | None = None) -> ImageExport:
    """Write `directory`/`name`.html and .json for every figure (the pages load the results
    tree's one plotly.js, see `_write_html`), then export all their images in one browser. `images`: formats ("png", "png,svg"; "none" or () for none); None means the
    enclosing `deferred_images` block's formats, else DEFAULT_IMAGES. Inside such a block the
    images wait for its end. The result lists the files written (HTML first)."""
    directory = Path(directory)
    pending = _pending.get()
    result = ImageExport()
    for name, fig in figures.items():
        if Path(name).name != name or not name:
            raise SpectraError(f"a figure name must be a plain file name, got {name!r}")
        result.written += _write_html(fig, directory / name)
    if images is None:
        formats = pending[1] if pending is not None else DEFAULT_IMAGES
    else:
        formats = image_formats(images)
    if not formats or not figures:
        return result
    jobs = [(fig, directory / f"{name}.{fmt}", fmt) for name, fig in figures.items()
            for fmt in formats]
    if pending is not None:
        pending[0].extend(jobs)
        return result
    exported = _export(jobs)
    result.written += exported.written
    result.failed, result.skipped = exported.failed, exported.skipped
    result.browser, result.seconds = exported.browser, exported.seconds
    return result


@contextlib.contextmanager
def deferred_images(images: str | Sequence[str] | None = None) -> Iterator[ImageExport]:
    """Inside the block, `write_figures` writes HTML only and queues its images (in `images`,
    default DEFAULT_IMAGES, where a call names no formats); when the block ends without an
    error they are all exported together, in one browser. The yielded ImageExport is filled
    in then; in a nested block it stays empty and the outermost block exports."""
    queue: list = []
    result = ImageExport()
    outer = _pending.get()
    token = _pending.set((queue, DEFAULT_IMAGES if images is None else image_formats(images)))
    try:
        yield result
    finally:
        _pending.reset(token)
    if outer is not None:  # nested: the outermost block exports everything at once
        outer[0].extend(queue)
        return
    done = _export(queue)
    result.written, result.failed, result.skipped = done.written, done.failed, done.skipped
    result.browser, result.seconds = done.browser, done.seconds


# --------------------------------------------------------------------------- PDF of a page

_CHROMIUM_FLAGS = (
    "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    # no sandbox: Chromium refuses to start as root with one, and many containers lack the
    # kernel features it needs; the page is our own local file.
    "--no-sandbox",
    # offline machines: no background connections (update checks, sync, field trials)
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--disable-dev-shm-usage", "--hide-scrollbars",
)


def print_pdf(page: str | os.PathLike, out: str | os.PathLike, *, browser: str | None = None,
              budget_ms: int = 30_000, timeout: float = 300.0) -> Path:
    """Print the local HTML file `page` to the PDF `out` (atomically) with headless Chromium;
    the page's headings become the PDF's outline (bookmarks).

    The page's scripts get `budget_ms` of virtual time to draw before printing. Raises
    SpectraError when no browser is found or printing fails.
    """
    page, out = Path(page).resolve(), Path(out)
    if not page.is_file():
        raise SpectraError(f"no page to print at {str(page)!r}")
    binary = browser or find_browser()
    if binary is None:
        raise SpectraError(f"cannot write a PDF: no Chrome/Chromium found ({_INSTALL_HINT})")
    with tempfile.TemporaryDirectory(prefix="spectra-pdf-") as tmp:
        pdf = Path(tmp) / "page.pdf"
        cmd = [binary, *_CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}",
               f"--virtual-time-budget={budget_ms}", "--window-size=1200,1600",
               "--no-pdf-header-footer", "--generate-pdf-document-outline",  # headings as bookmarks
               f"--print-to-pdf={pdf}", page.as_uri()]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise SpectraError(f"{binary} did not finish printing {page.name} within {timeout:.0f} s") from None
        if done.returncode != 0 or not pdf.is_file() or pdf.stat().st_size == 0:
            tail = " ".join(done.stderr.strip().splitlines()[-2:])
            raise SpectraError(f"{binary} could not print {page.name} to PDF "
                               f"(exit {done.returncode}): {tail[-300:]}")
        return atomic_write_bytes(out, pdf.read_bytes())
