"""Run directories: an exclusive lock, atomic writes, a manifest that lists every output, and the
rules for refusing, resuming and replacing a run.

A run directory holds `manifest.json` and the files the manifest lists under "outputs". The life
of a run (`RunDir`):

1. `check(config, overwrite=...)`: read-only checks of the path and of what the directory holds,
   made before the model loads, so that a run that cannot start writes nothing;
2. `with rd:` takes an exclusive lock (`fcntl.flock` on the directory itself; the file
   `.spectra-lens.lock` records the holder's pid, host and start time) for the whole run; a
   second writer is refused with a message naming the holder. Removing or editing the file does
   not release the lock. The kernel releases the lock when its process dies, so the lock of a
   killed run is taken over by the next start (the file a killed run leaves is harmless);
3. `start(config, overwrite=...)`, once the model has loaded: removes the outputs of the run it
   replaces, then writes the manifest with `"status": "running"`; True when resuming;
4. `output(name)` registers a file in the manifest *before* it is written, so that a killed run
   never leaves a file the manifest does not list; `write_csv` / `write_parquet` / `write_json`
   do this and write atomically (temporary name, then rename);
5. `finish(**info)` rewrites the manifest with `"status": "complete"`. An exception inside the
   `with` block marks a started run "failed" with the error (Ctrl-C: "interrupted"); a run that
   had not started leaves nothing behind.

Replacing never deletes anything the manifest does not list, never follows a symbolic link and
never touches a directory that is not a run of this project.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from spectra_lens.errors import SpectraError
from spectra_lens.io import atomic_write, is_temporary

__all__ = ["LOCK", "MANIFEST", "NOT_RESULT_FIELDS", "RunDir", "package_versions", "read_manifest"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".spectra-lens.lock"
FORMAT = "spectra_lens.run"
# Config fields that do not change a run's results: a run may resume with other values.
NOT_RESULT_FIELDS: tuple[str, ...] = ("out", "device", "device_map", "overwrite", "images")
_UNFINISHED = ("running", "interrupted", "failed")
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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- the lock


class _Lock:
    """An exclusive `flock` on the run directory itself; `directory/LOCK` names the holder.

    The lock is held on the directory's inode, which no edit of a file inside it can replace:
    removing or rewriting `LOCK` (`rm`, `sed -i`) does not let a second command in. After the
    flock the directory's path is checked to still be the locked inode (a directory moved or
    replaced meanwhile is locked again). `LOCK` only describes the holder (pid, host, start
    time, command) for the message that refuses a second writer; it is removed when the run
    ends, and one left by a killed run is harmless (the kernel released the flock with the
    process) and replaced by the next run.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(10):  # the directory can be replaced between open and flock: then retry
            try:
                fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise SpectraError(f"cannot open the run directory {self.directory}: "
                                   f"{e.strerror or e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise SpectraError(f"cannot lock {self.directory}: {e.strerror or e}") from e
                holder = _read_holder(self.path)
                for _ in range(40):  # the holder writes who it is right after its flock
                    if holder:
                        break
                    time.sleep(0.05)
                    holder = _read_holder(self.path)
                raise SpectraError(
                    f"{self.directory} is in use by another run ({_describe_holder(holder)}); "
                    f"wait for it to finish or choose another --out"
                ) from None
            try:
                st, now = os.fstat(fd), os.stat(self.directory)
                same = (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_holder(self.path)
            if previous.get("pid") not in (None, os.getpid()):
                log.info("taking over the lock of %s, which no longer runs", _describe_holder(previous))
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                      "command": " ".join(sys.argv)}
            self.fd = fd
            self._write_holder(holder)
            return
        raise SpectraError(f"cannot lock {self.directory}: the directory keeps being replaced")

    def _write_holder(self, holder: dict) -> None:
        """Write `LOCK` (a description only: a failure to write it does not stop the run)."""
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            if os.path.islink(self.path) or os.path.isfile(self.path):
                os.unlink(self.path)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise SpectraError(f"cannot write {self.path}: {e.strerror or e}") from e
            log.warning("cannot write %s (%s); the run is locked all the same", self.path, e)
            return
        try:
            os.write(fd, (json.dumps(holder) + "\n").encode())
        finally:
            os.close(fd)

    def release(self, *, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove and _read_holder(self.path).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


def _read_holder(path: Path) -> dict:
    try:
        if os.path.islink(path) or not os.path.isfile(path):
            return {}
        with open(path, "rb") as f:
            holder = json.loads(f.read(4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}")


# --------------------------------------------------------------------------- the run directory


def read_manifest(path: str | os.PathLike, *, hint: str = "") -> dict:
    """The JSON object of a manifest file (a run's, or a shard set's); SpectraError when the file
    cannot be read, is not JSON or holds no JSON object (`hint` ends the message)."""
    f = Path(path)
    try:
        manifest = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpectraError(f"{f} is not valid JSON ({e}); it is not a run manifest that "
                           f"spectra_lens can resume or replace{hint}") from e
    except OSError as e:
        raise SpectraError(f"cannot read {f}: {e.strerror or e}") from e
    if not isinstance(manifest, dict):
        raise SpectraError(f"{f} holds {type(manifest).__name__}; expected a run manifest "
                           f"(a JSON object){hint}")
    return manifest


class RunDir:
    """One experiment's output directory (see the module docstring for its life)."""

    def __init__(self, path: str | os.PathLike, experiment: str):
        self.path = Path(path)
        self.experiment = experiment
        self.timings: dict[str, float] = {}
        self.info: dict[str, Any] = {}
        self.outputs: list[str] = []
        self.status: str | None = None  # None until start()
        self._t0 = time.time()
        self._lock = _Lock(self.path)
        self._created = False  # this process created the directory (removed if never started)
        self._config: Any = None
        self._previous_total = 0.0
        self._sessions = 0
        self._versions: dict[str, str] | None = None

    def file(self, name: str) -> Path:
        return self.path / name

    # ----------------------------------------------------------------- before the model loads

    def check(self, config: Any, *, overwrite: bool = False, resumable_keys: tuple[str, ...] = (),
              inputs=()) -> None:
        """Refuse, without writing anything, a path or directory this run cannot use.

        `inputs` are directories the run reads (prepared shards): they must not be the run
        directory or lie inside it, where replacing the run would delete what it reads.
        """
        _check_writable_path(self.path)
        root = self.path.resolve()
        for d in inputs:
            d = Path(d).resolve()
            if d == root or root in d.parents:
                raise SpectraError(
                    f"--out {self.path} holds {d}, which this run reads (--corpus); "
                    f"choose another --out"
                )
        self._decide(_jsonable(config), overwrite, resumable_keys)

    def __enter__(self) -> "RunDir":
        self.lock()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if exc is not None and self.status == "running":
                try:
                    if isinstance(exc, KeyboardInterrupt):
                        self._write_manifest("interrupted", error="interrupted by the user (Ctrl-C)")
                    else:
                        self._write_manifest("failed", error=_one_line(exc))
                except (SpectraError, OSError) as e:  # a full disk: the first error is the one to tell
                    log.warning("could not mark %s as failed: %s", self.path, _one_line(e))
        finally:
            self.close()

    def lock(self) -> None:
        """Take the run's exclusive lock, creating the directory if needed (idempotent)."""
        if self._lock.fd is not None:
            return
        _check_writable_path(self.path)
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True)
                self._created = True
            except FileExistsError:
                pass
            except OSError as e:
                raise SpectraError(f"cannot create the run directory {self.path}: {e.strerror or e}") from e
        self._lock.acquire()

    def close(self) -> None:
        """Release the lock (its file is removed: a finished run leaves only its outputs); a
        directory this process created and never started is removed too."""
        never_started = self.status is None
        self._lock.release(remove=True)
        if never_started and self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty: nothing else was written
            self._created = False

    # ----------------------------------------------------------------- once the model has loaded

    def start(self, config: Any, *, overwrite: bool = False,
              resumable_keys: tuple[str, ...] = ()) -> bool:
        """Replace or resume under the lock, write the "running" manifest; True when resuming."""
        self.lock()
        cfg = _jsonable(config)
        action, old = self._decide(cfg, overwrite, resumable_keys)
        if action == "replace":
            _remove_outputs(self.path, old)
        elif action == "resume":
            self.outputs = [o for o in old.get("outputs", []) if isinstance(o, str)]
            old_t = old.get("timings") if isinstance(old.get("timings"), dict) else {}
            for k, v in old_t.items():  # this session's timings so far (model loading) add up
                if isinstance(v, (int, float)) and k != "total_s":
                    self.timings[k] = round(self.timings.get(k, 0.0) + float(v), 3)
            self._previous_total = float(old_t.get("total_s", 0.0) or 0.0)
            self._sessions = int(old.get("sessions", 1) or 1)
        self._config = cfg
        self._sessions += 1
        self.status = "running"
        self._write_manifest("running")
        return action == "resume"

    def _decide(self, cfg: Any, overwrite: bool, resumable_keys: tuple[str, ...]) -> tuple[str, dict | None]:
        """("new" | "resume" | "replace", the old manifest) or a SpectraError."""
        if not self.path.exists():
            return "new", None
        if not self.path.is_dir():
            raise SpectraError(f"{self.path} is a file; expected a run directory (new or existing)")
        old = self.read_manifest()
        if old is None:
            # another run's first manifest being written (its lock then refuses this one)
            # or a crash's leftover temporary file is not content of the directory
            others = sorted(p.name for p in self.path.iterdir()
                            if p.name != LOCK and not is_temporary(p.name))
            if others:
                shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                raise SpectraError(
                    f"{self.path} is not empty ({shown}) and is not a spectra_lens run directory "
                    f"(no {MANIFEST}); nothing in it is replaced, not even with --overwrite: "
                    f"choose a new or empty --out"
                )
            return "new", None
        ignore = set(NOT_RESULT_FIELDS) | set(resumable_keys)
        same = (old.get("experiment") == self.experiment
                and _strip(old.get("config"), ignore) == _strip(cfg, ignore))
        status = old.get("status")
        what = f"{old.get('experiment')} run"
        if status == "complete":
            if not overwrite:
                raise SpectraError(f"{self.path} already holds a finished {what}; pass --overwrite "
                                   f"to replace it or choose another --out")
            return "replace", old
        if same and not overwrite:
            return "resume", old
        if status == "failed" or overwrite:
            return "replace", old
        raise SpectraError(
            f"{self.path} holds an unfinished {what} (status {status!r}) with a different experiment "
            f"or config: {_difference(old.get('config'), cfg, ignore)}; rerun with its config to "
            f"resume it, pass --overwrite to discard it, or choose another --out"
        )

    def finished(self, config: Any) -> bool:
        """True when the directory holds a complete run of this experiment with `config` (the
        fields of NOT_RESULT_FIELDS aside): its outputs can be read instead of run again."""
        if not (self.path / MANIFEST).is_file():
            return False
        try:
            old = self.read_manifest()
        except SpectraError:
            return False
        ignore = set(NOT_RESULT_FIELDS)
        return (old is not None and old.get("status") == "complete"
                and old.get("experiment") == self.experiment
                and _strip(old.get("config"), ignore) == _strip(_jsonable(config), ignore))

    def read_manifest(self) -> dict | None:
        """The run manifest, None when there is none, SpectraError when it is not one."""
        f = self.file(MANIFEST)
        if not os.path.lexists(f):
            return None
        if f.is_symlink() or not f.is_file():
            raise SpectraError(f"{f} is not a regular file; expected a run manifest")
        manifest = read_manifest(f, hint=": choose another --out")
        from spectra_lens.data.shards import SHARDS_FORMAT  # torch: only when a manifest is read

        if manifest.get("format") == SHARDS_FORMAT:
            raise SpectraError(f"{self.path} is a prepared shard directory, not a run directory; "
                               f"choose another --out (its shards are read with --corpus {self.path})")
        if "experiment" not in manifest or "status" not in manifest:
            raise SpectraError(f"{f} is not a spectra_lens run manifest (no experiment and status); "
                               f"choose another --out")
        return manifest

    # ----------------------------------------------------------------- outputs

    def output(self, name: str) -> Path:
        """The path of output `name` (relative, '/'-separated), listed in the manifest first."""
        rel = _relative(name)
        if rel in (MANIFEST, LOCK):
            raise SpectraError(f"{rel} is reserved for the run itself")
        if self.status != "running":
            raise SpectraError(f"output {rel} of {self.path} asked for before the run started")
        path = self.path / rel
        _check_inside(self.path, path)
        if rel not in self.outputs:
            self.outputs.append(rel)
            self._write_manifest("running")
        return path

    def timed(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)

    def write_csv(self, name: str, frame: pd.DataFrame) -> Path:
        return atomic_write(self.output(name), lambda tmp: frame.to_csv(tmp, index=False))

    def write_parquet(self, name: str, frame: pd.DataFrame) -> Path:
        return atomic_write(self.output(name), lambda tmp: frame.to_parquet(tmp, index=False))

    def write_json(self, name: str, obj: Any) -> Path:
        text = json.dumps(_jsonable(obj), indent=2, sort_keys=False)
        return atomic_write(self.output(name), lambda tmp: Path(tmp).write_text(text))

    def finish(self, **info: Any) -> None:
        self.info.update(info)
        self._write_manifest("complete")

    def _write_manifest(self, status: str, *, error: str | None = None) -> None:
        if self._versions is None:
            self._versions = package_versions()
        timings = dict(self.timings)
        timings["total_s"] = round(self._previous_total + time.time() - self._t0, 3)
        manifest = {
            "format": FORMAT,
            "experiment": self.experiment,
            "status": status,
            "config": self._config,
            "versions": self._versions,
            "timings": timings,
            "sessions": self._sessions,
            "updated": _now(),
            "outputs": list(self.outputs),
            **self.info,
        }
        if error is not None:
            manifest["error"] = error
        text = json.dumps(_jsonable(manifest), indent=2, sort_keys=False)
        atomic_write(self.file(MANIFEST), lambda tmp: Path(tmp).write_text(text))
        self.status = status


# --------------------------------------------------------------------------- paths


def _check_writable_path(path: Path) -> None:
    """SpectraError for a run path that is a file, lies under a file, or cannot be written."""
    if path.exists() and not path.is_dir():
        raise SpectraError(f"{path} is a file; expected a run directory (new or existing)")
    probe = path
    while not probe.exists():
        if os.path.lexists(probe):  # a dangling symbolic link
            raise SpectraError(f"{probe} is a broken symbolic link; expected a directory for --out {path}")
        probe = probe.parent
    if not probe.is_dir():
        raise SpectraError(f"--out {path} lies under {probe}, which is a file; expected a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SpectraError(f"cannot write in {probe} (permission denied); choose another --out than {path}")


def _relative(name: str) -> str:
    p = PurePosixPath(str(name).replace(os.sep, "/"))
    if p.is_absolute() or not p.parts or any(part in ("..", ".", "") for part in p.parts):
        raise SpectraError(f"output name {name!r} must be a relative path inside the run directory")
    return p.as_posix()


def _check_inside(root: Path, path: Path) -> None:
    """SpectraError when a directory between `root` and `path` is a symbolic link or a file."""
    current = root
    for part in PurePosixPath(path.relative_to(root).as_posix()).parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise SpectraError(
                f"{current} is a symbolic link (to {os.readlink(current)}); a run writes and "
                f"removes files only inside its own directory: remove the link or choose another --out"
            )
        if os.path.lexists(current) and not current.is_dir():
            raise SpectraError(f"{current} is a file; expected a directory of the run's outputs")
    if path.is_symlink():
        raise SpectraError(f"{path} is a symbolic link; a run never writes through one")


def _remove_outputs(root: Path, manifest: dict) -> None:
    """Delete the files `manifest` lists inside `root`, and this project's temporary files beside
    them; nothing through a symbolic link, nothing unlisted. All paths are checked first."""
    outputs = manifest.get("outputs")
    if not isinstance(outputs, list):
        raise SpectraError(
            f"{root / MANIFEST} does not list the run's outputs (written by an older spectra_lens); "
            f"it cannot be replaced safely: remove the directory yourself or choose another --out"
        )
    paths = []
    for name in outputs:
        path = root / _relative(name)
        _check_inside(root, path)
        if os.path.lexists(path) and not path.is_file():
            raise SpectraError(f"{path} is listed as an output but is not a regular file; "
                               f"nothing was removed")
        paths.append(path)
    dirs = {root} | {p.parent for p in paths}
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for d in dirs:
        if not d.is_dir() or d.is_symlink():
            continue
        for entry in os.scandir(d):
            if is_temporary(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    for d in sorted(dirs - {root}, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty


# --------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, SpectraError) else text


def _strip(cfg: Any, keys) -> Any:
    if isinstance(cfg, dict):
        return {k: v for k, v in cfg.items() if k not in keys}
    return cfg


def _difference(old: Any, new: Any, ignore) -> str:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "its config is not comparable"
    keys = sorted((set(old) | set(new)) - set(ignore))
    diff = [f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diff[:4]) or "the experiment differs"


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
