"""The one atomic writer of the project and its self-describing ``.npz`` container.

Every file a run writes goes through `atomic_write`: the data goes to a hidden temporary name
beside the target, is fsynced, and is renamed onto the target, then the directory is fsynced. A
reader sees the old file or the whole new one; after a crash the new file is complete or absent.
"""

import errno
import io
import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spectra_lens.errors import SpectraError

__all__ = ["USER_ERRNOS", "atomic_write", "check_new_file", "atomic_write_bytes", "is_temporary", "npz_bytes", "read_npz", "write_npz"]

# Temporary files of the atomic writer: ".spectra-lens-tmp-<pid>-<32 hex digits><suffix>". Only
# names of exactly this form are ever removed as temporaries (`is_temporary`).
_TEMP_PREFIX = ".spectra-lens-tmp-"
_TEMP_NAME = re.compile(r"\.spectra-lens-tmp-[0-9]+-[0-9a-f]{32}(\.[A-Za-z0-9]+)?")

# Operating-system errors that say something about where the user asked us to write (a full
# disk, a quota, a file-size limit, permissions, a read-only file system, a path under a file).
USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                         errno.EFBIG, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                         errno.ENAMETOOLONG, errno.ELOOP, errno.EMLINK, errno.ENOENT})


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)`, flush the temporary file to disk, then rename it onto `path`.

    Readers see the old file or the whole new one, and after a crash the new file is either
    complete on disk or absent: the data is fsynced before the rename and the directory after.
    An operating-system error (a read-only or full disk, a path under a file) is a SpectraError
    naming the path.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
        except OSError as e:  # a library's own I/O error has no errno (pyarrow: "No space left")
            if e.errno is None:
                raise SpectraError(f"cannot write {path}: {e}") from e
            raise
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        raise SpectraError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def check_new_file(path: str | os.PathLike, *, overwrite: bool, option: str) -> Path:
    """The path of a single-file output (`option`, e.g. "--csv"), checked before any work: an
    existing file is refused unless `overwrite`, and a directory, a symbolic link or a run's
    manifest always."""
    path = Path(path)
    if path.is_symlink():
        raise SpectraError(f"{option} {path} is a symbolic link; expected a new file (nothing written)")
    if path.is_dir():
        raise SpectraError(f"{option} {path} is a directory; expected a file name")
    if path.exists():
        if path.name == "manifest.json":
            raise SpectraError(f"{option} {path} is a run's or a shard set's manifest; it is never "
                               f"replaced: choose another file name")
        if not overwrite:
            raise SpectraError(f"{option} {path} already exists; pass --overwrite to replace it or "
                               f"choose another file name")
    return path


def atomic_write_bytes(path: str | os.PathLike, blob: bytes) -> Path:
    """`atomic_write` of a bytes object."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def npz_bytes(**arrays) -> bytes:
    """`np.savez` of `arrays`, in memory. A Ctrl-C inside the write arrives as KeyboardInterrupt:
    otherwise zipfile's close in NumPy's clean-up replaces it with a ValueError ("open writing
    handle"), and an interrupted run would end in a traceback instead of status "interrupted"."""
    buffer = io.BytesIO()
    try:
        np.savez(buffer, **arrays)
    except ValueError as err:
        if isinstance(err.__context__, KeyboardInterrupt):
            raise err.__context__ from None
        raise
    return buffer.getvalue()


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
    return str(path.with_name(f"{_TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}{path.suffix}"))


def is_temporary(name: str) -> bool:
    """Whether `name` is a temporary file of the atomic writer (left behind only by a crash):
    exactly ".spectra-lens-tmp-<pid>-<32 hex digits>[.suffix]", a name no user file has by chance."""
    return _TEMP_NAME.fullmatch(name) is not None


def write_npz(path: str | os.PathLike, header: dict, **arrays: np.ndarray) -> Path:
    """Write `arrays` and a JSON `header` (which names the container's format and version) as one
    `.npz` file, atomically."""
    return atomic_write_bytes(path, npz_bytes(header=np.array(json.dumps(header)), **arrays))


def read_npz(path: str | os.PathLike, *, format: str, version: int,
             names: tuple[str, ...]) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a `write_npz` file: its header and the arrays `names`. Refuses (SpectraError) a file
    that is unreadable, of another format, or of a newer version than `version`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            arrays = {k: z[k] for k in names}
    except Exception as e:
        raise SpectraError(f"{path} is unreadable ({e}); delete it and rerun to redo it") from e
    if header.get("format") != format or header.get("version", 0) > version:
        raise SpectraError(f"{path} is not a {format} file of version <= {version}; got "
                           f"{header.get('format')!r} v{header.get('version')}")
    return header, arrays
