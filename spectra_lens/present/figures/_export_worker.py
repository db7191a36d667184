"""The image export's own process: `python -m spectra_lens.present.figures._export_worker DIR`.

`export._export` writes DIR/jobs.json (the browser, the drawing options and every job: the
plotly figure as JSON, the file, the format and the size in CSS pixels) and waits for this
process, which draws every job in one headless browser (kaleido) and writes DIR/result.json:
{"written": [file, ...], "failed": {file: reason}, "error": reason or null}. As soon as the
browser runs it writes its process id to DIR/browser.pid: the browser leads its own process
group, which the caller kills if this process is stopped before it could close the browser.

SIGTERM, SIGINT and the death of the calling process cancel the drawing; the browser is then
closed and the process exits with status 130, writing nothing more.

$SPECTRA_IMAGES_HOLD (a directory; for tests): once the browser runs, the process creates
`started` in it (holding this process's id and the browser's) and draws nothing until `release` appears there, so a test can act while an
export is certainly in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

HOLD_ENV = "SPECTRA_IMAGES_HOLD"


async def _hold(browser_pid: int | None) -> None:
    directory = os.environ.get(HOLD_ENV)
    if not directory:
        return
    Path(directory, "started").write_text(f"{os.getpid()} {browser_pid or ''}")
    while not Path(directory, "release").exists():
        await asyncio.sleep(0.05)


async def _watch_parent(parent: int, task: asyncio.Task) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    task.cancel()


async def _draw(work: Path, spec: dict, result: dict) -> None:
    from spectra_lens.io import atomic_write_bytes
    from spectra_lens.present.figures.export import _browser_session, _reason

    jobs = spec["jobs"]
    async with _browser_session(spec["browser"], max(1, min(spec["tabs"], len(jobs))),
                                spec["timeout"]) as k:
        proc = getattr(k, "subprocess", None)
        if proc is not None:
            (work / "browser.pid").write_text(str(proc.pid))
        await _hold(None if proc is None else proc.pid)

        async def one(job: dict) -> None:
            fmt = job["format"]
            try:
                data = await k.calc_fig(json.loads(job["figure"]),
                                        opts=dict(format=fmt, width=job["width"], height=job["height"],
                                                  scale=spec["scale"] if fmt == "png" else 1))
            except Exception as e:
                result["failed"][job["path"]] = _reason(e)
                return
            path = Path(job["path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            result["written"].append(job["path"])

        await asyncio.gather(*(one(job) for job in jobs))


async def _main(work: Path, parent: int) -> int:
    spec = json.loads((work / "jobs.json").read_text(encoding="utf-8"))
    result: dict = {"written": [], "failed": {}, "error": None}
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    watch = asyncio.create_task(_watch_parent(parent, task))
    try:
        await _draw(work, spec, result)
    except asyncio.CancelledError:
        return 130
    except Exception as e:  # the browser did not start or died
        from spectra_lens.present.figures.export import _reason

        result["error"] = _reason(e)
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    tmp = work / "result.json.tmp"
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(work / "result.json")
    return 0


def main(argv: list[str]) -> int:
    parent = int(os.environ.get("SPECTRA_IMAGES_PARENT", os.getppid()))
    try:
        return asyncio.run(_main(Path(argv[0]), parent))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
