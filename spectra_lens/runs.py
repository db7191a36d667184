"""Run directories: atomic writes, the run manifest, and the refuse / resume rule.

A run directory holds `manifest.json`, written first with `"status": "running"` and rewritten
with `"status": "complete"` only after every output exists. Every file is written to a temporary
name in the same directory and renamed into place, so no half-written file ever looks complete.
"""

import dataclasses
import json
import os
import platform
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from spectra_lens.errors import SpectraError

__all__ = ["RunDir", "atomic_write", "atomic_write_bytes", "package_versions"]

MANIFEST = "manifest.json"
_PACKAGES = ("spectra-lens", "torch", "transformer-lens", "transformers", "numpy", "scipy",
             "pandas", "plotly")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)`, flush the temporary file to disk, then rename it onto `path`.

    Readers see the old file or the whole new one, and after a crash the new file is either
    complete on disk or absent: the data is fsynced before the rename and the directory after.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, blob: bytes) -> Path:
    """`atomic_write` of a bytes object."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_name(path: str | os.PathLike) -> str:
    """An unused hidden name beside `path` (same suffix), for a file to be renamed onto it.

    The file is not created here: the writer creates it with the usual permissions (umask), where
    `tempfile.mkstemp` would leave every result readable by its owner only (mode 0600).
    """
    path = Path(path)
    return str(path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}{path.suffix}"))


class RunDir:
    """One experiment's output directory.

    `start(config)` refuses a directory that holds a finished run unless `overwrite`, refuses a
    different experiment or config, and resumes an unfinished run of the same config.
    """

    def __init__(self, path: str | os.PathLike, experiment: str):
        self.path = Path(path)
        self.experiment = experiment
        self._t0 = time.time()
        self.timings: dict[str, float] = {}
        self.info: dict[str, Any] = {}

    def file(self, name: str) -> Path:
        return self.path / name

    def start(self, config: Any, *, overwrite: bool = False, resumable_keys: tuple[str, ...] = ()) -> bool:
        """Prepare the directory; True when resuming an unfinished run."""
        cfg = _jsonable(config)
        if self.path.exists() and not self.path.is_dir():
            raise SpectraError(f"{self.path} is a file; expected a run directory (new or existing)")
        old = self.read_manifest()
        resuming = False
        if old is not None:
            same = old.get("experiment") == self.experiment and _strip(old.get("config"), resumable_keys) == _strip(cfg, resumable_keys)
            if old.get("status") == "complete" and not overwrite:
                raise SpectraError(
                    f"{self.path} already holds a finished {old.get('experiment')} run; "
                    f"pass --overwrite to replace it or choose another --out"
                )
            if old.get("status") != "complete" and not same and not overwrite:
                raise SpectraError(
                    f"{self.path} holds an unfinished run with a different experiment or config; "
                    f"pass --overwrite to discard it or choose another --out"
                )
            resuming = same and old.get("status") != "complete" and not overwrite
        elif self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise SpectraError(
                f"{self.path} is not empty and has no {MANIFEST}; expected a new or an "
                f"existing run directory (pass --overwrite to write into it anyway)"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._config = cfg
        self._write_manifest("running")
        return resuming

    def read_manifest(self) -> dict | None:
        f = self.file(MANIFEST)
        if not f.exists():
            return None
        try:
            manifest = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise SpectraError(f"{f} is not valid JSON ({e}); remove it or pass --overwrite") from e
        if not isinstance(manifest, dict):
            raise SpectraError(f"{f} holds {type(manifest).__name__}; expected a run manifest "
                               f"(a JSON object); remove it or pass --overwrite")
        return manifest

    def timed(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)

    def write_csv(self, name: str, frame: pd.DataFrame) -> Path:
        return atomic_write(self.file(name), lambda tmp: frame.to_csv(tmp, index=False))

    def write_parquet(self, name: str, frame: pd.DataFrame) -> Path:
        return atomic_write(self.file(name), lambda tmp: frame.to_parquet(tmp, index=False))

    def write_json(self, name: str, obj: Any) -> Path:
        text = json.dumps(_jsonable(obj), indent=2, sort_keys=False)
        return atomic_write(self.file(name), lambda tmp: Path(tmp).write_text(text))

    def finish(self, **info: Any) -> None:
        self.info.update(info)
        self._write_manifest("complete")

    def _write_manifest(self, status: str) -> None:
        self.timed("total_s", 0.0)
        self.timings["total_s"] = round(time.time() - self._t0, 3)
        self.write_json(MANIFEST, {
            "experiment": self.experiment,
            "status": status,
            "config": self._config,
            "versions": package_versions(),
            "timings": self.timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.info,
        })


def _strip(cfg: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(cfg, dict):
        return {k: v for k, v in cfg.items() if k not in keys}
    return cfg


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
