"""Token shards on disk: fixed-length token sequences -> checksummed shards with a JSON manifest.

The last of three stages (the first two, sources and tokenizing, are `spectra_lens.data.corpus`;
`spectra_lens.data.prepare` runs all three):

1. A `Corpus` is a described, re-iterable source of documents (str), read lazily:
   `default_corpus()` (CPython's reference documentation, `pydoc_data.topics`), `text_files`,
   `jsonl`, `hf_dataset`, or `data.prepare.corpus_from_spec` for a command-line string.
2. `tokenize_documents` cuts documents into fixed-length sequences and records each one's
   document, each sequence starting with BOS where the model uses one. Fixed-length,
   unpadded sequences keep position ids trivial (left padding makes the bridge derive them from
   the attention mask).
3. `write_shards` stores `[n_sequences, seq_len]` tokens as `shard_00000.safetensors`, ... and a
   `manifest.json` written last, every file atomically, so a crash never leaves a set that looks
   complete. `load_shard` verifies each file's sha256 before returning it.

Sequence ids are global and stable: shard i holds sequences `[offset_i, offset_i + count_i)`,
so per-shard results of a distributed run merge back onto the same ids.

Manifest schema (`manifest.json`, format version 1)::

    {
      "format": "spectra_lens.shards",
      "version": 1,
      "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "seq_len": 128,
      "n_sequences": 1000,
      "dtype": "int32",
      "corpus": "pydoc_data.topics: CPython 3.11.7 reference documentation (79 topics)",
      "shards": [
        {"file": "shard_00000.safetensors", "offset": 0, "n_sequences": 256,
         "sha256": "<64 hex digits of the file's bytes>",
         "documents": [0, 0, 1, ...]},   # version 2: the document of each sequence
        ...
      ],
      "meta": {"prepend_bos": true, "bos_token_id": 1, "eos_token_id": 2, ...},
      "spectra_lens_version": "0.1.0"
    }

Shard files are safetensors (one tensor under the key "tokens") or `.npy` arrays; both hold
`[count, seq_len]` integers.
"""

import bisect
import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.torch
import torch
from jaxtyping import Int
from torch import Tensor

from spectra_lens.errors import SpectraError
from spectra_lens.io import atomic_write_bytes
from spectra_lens.validate import check_int, check_tokens

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ShardInfo",
    "ShardManifest",
    "iter_shards",
    "load_shard",
    "load_tokens",
    "read_manifest",
    "write_shards",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2  # 2: per-shard document ids (version 1 still reads)
# the format id of a shard manifest (a file format, not a module path: kept across releases)
SHARDS_FORMAT = "spectra_lens.shards"
_SHARD_KEY = "tokens"
_SUFFIXES = {"safetensors": ".safetensors", "npy": ".npy"}

Tokens = Int[Tensor, "sequence pos"]
PathLike = str | os.PathLike[str]
FileFormat = Literal["safetensors", "npy"]


# ----------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: it holds the global sequence ids `[offset, offset + n_sequences)`."""

    file: str  # file name inside the shard directory
    offset: int  # global id of the shard's first sequence
    n_sequences: int  # rows in the file
    sha256: str  # hex digest of the file's bytes, checked on every load
    # document id of each sequence (the independent unit of the statistics); None in shard
    # sets written before documents were recorded (manifest version 1)
    documents: tuple[int, ...] | None = None

    @property
    def stop(self) -> int:
        """One past the global id of the shard's last sequence."""
        return self.offset + self.n_sequences


@dataclass(frozen=True)
class ShardManifest:
    """The contents of a shard directory's `manifest.json`, plus where it was read from."""

    directory: Path  # the shard directory (not stored in the file)
    tokenizer: str  # tokenizer name or path the ids belong to
    seq_len: int  # tokens per sequence, BOS included
    n_sequences: int  # sequences over all shards
    dtype: str  # "int32" or "int64", as stored on disk
    corpus: str  # description of the text the tokens came from
    shards: tuple[ShardInfo, ...]  # in order of global sequence id
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # tokenization settings etc.
    version: int = MANIFEST_VERSION  # manifest format version
    spectra_lens_version: str = ""  # package version that wrote the shards

    @property
    def path(self) -> Path:
        """The manifest file."""
        return self.directory / MANIFEST_NAME

    def shard_path(self, i: int) -> Path:
        """The file of shard `i`."""
        return self.directory / self._shard(i).file

    def locate(self, sequence_id: int) -> tuple[int, int]:
        """`(shard index, row in that shard)` of a global sequence id."""
        if not 0 <= sequence_id < self.n_sequences:
            raise SpectraError(
                f"sequence id {sequence_id} out of range; expected 0 <= id < {self.n_sequences}"
            )
        i = bisect.bisect_right([s.offset for s in self.shards], sequence_id) - 1
        return i, sequence_id - self.shards[i].offset

    def _repr_html_(self) -> str:
        from spectra_lens.present.display import html_card

        settings = {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool))}
        return html_card("ShardManifest", {
            "directory": self.directory, "corpus": self.corpus, "tokenizer": self.tokenizer,
            "sequences × tokens": f"{self.n_sequences} × {self.seq_len}",
            "shards": f"{len(self.shards)} ({self.dtype})", **settings,
        })

    def documents_of(self, start: int, stop: int) -> list[int] | None:
        """Document ids of the global sequences `[start, stop)`; None if not recorded."""
        if any(s.documents is None for s in self.shards):
            return None
        ids = [d for s in self.shards for d in s.documents]
        return ids[start:stop]

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to `manifest.json`."""
        return {
            "format": SHARDS_FORMAT,
            "version": self.version,
            "tokenizer": self.tokenizer,
            "seq_len": self.seq_len,
            "n_sequences": self.n_sequences,
            "dtype": self.dtype,
            "corpus": self.corpus,
            "shards": [
                {"file": s.file, "offset": s.offset, "n_sequences": s.n_sequences,
                 "sha256": s.sha256}
                | ({} if s.documents is None else {"documents": list(s.documents)})
                for s in self.shards
            ],
            "meta": self.meta,
            "spectra_lens_version": self.spectra_lens_version,
        }

    def _shard(self, i: int) -> ShardInfo:
        if not isinstance(i, int) or not 0 <= i < len(self.shards):
            raise SpectraError(
                f"shard index {i!r} out of range; {self.directory} has {len(self.shards)} shards "
                f"(expected 0 <= i < {len(self.shards)})"
            )
        return self.shards[i]

    def _content(self) -> tuple:
        """What makes two shard sets the same: tokens, their layout and their tokenizer."""
        return (self.tokenizer, self.seq_len, self.n_sequences, self.dtype, self.shards)


def write_shards(
    tokens: Tensor,
    out_dir: PathLike,
    *,
    shard_size: int,
    tokenizer_name: str,
    corpus: str = "unspecified",
    meta: dict[str, Any] | None = None,
    dtype: Literal["int32", "int64"] | None = None,
    file_format: FileFormat = "safetensors",
    overwrite: bool = False,
    documents: Tensor | list[int] | None = None,
) -> ShardManifest:
    """Write `tokens` as shards of `shard_size` sequences and a `manifest.json`.

    Every file is written to a temporary file in `out_dir` and renamed into place, and the
    manifest comes last: until it exists the directory is not a shard set. If `out_dir` already
    holds a complete set with the same tokens and tokenizer this is a no-op returning the
    existing manifest; a different set raises `SpectraError` unless `overwrite=True`.

    Args:
        tokens: `[n_sequences, seq_len]` non-negative token ids; shard i holds rows
            `[i * shard_size, (i + 1) * shard_size)`, which are their global sequence ids.
        out_dir: shard directory, created if missing.
        shard_size: sequences per shard (the last shard may hold fewer).
        tokenizer_name: the tokenizer the ids belong to, recorded in the manifest.
        corpus: description of the source text, recorded in the manifest.
        meta: JSON-serializable extras recorded in the manifest (tokenization settings).
        dtype: on-disk integer type; None: int32 when every id fits, else int64.
        file_format: "safetensors" (key "tokens") or "npy".
        overwrite: replace an existing, different shard set.
        documents: the document id of every sequence (`corpus.tokenize_documents`), stored
            per shard in the manifest; None records none (each sequence is then its own unit).
    """
    check_tokens(tokens)
    check_int("shard_size", shard_size, minimum=1)
    if file_format not in _SUFFIXES:
        raise SpectraError(f"file_format must be one of {sorted(_SUFFIXES)}; got {file_format!r}")
    if not tokenizer_name:
        raise SpectraError("tokenizer_name must name the tokenizer the ids belong to; got ''")
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except TypeError as err:
        raise SpectraError(f"meta must be JSON-serializable: {err}") from None
    dtype = _storage_dtype(tokens, dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SpectraError(f"out_dir {str(out_dir)!r} is a file; expected a directory")

    n_sequences, seq_len = tokens.shape
    if documents is not None:
        documents = [int(d) for d in (documents.tolist() if isinstance(documents, Tensor)
                                      else documents)]
        if len(documents) != n_sequences or min(documents) < 0:
            raise SpectraError(
                f"documents must hold one non-negative id per sequence ({n_sequences}); got "
                f"{len(documents)} ids")
    blobs: list[bytes] = []
    shards: list[ShardInfo] = []
    for i, offset in enumerate(range(0, n_sequences, shard_size)):
        block = tokens[offset : offset + shard_size].to(getattr(torch, dtype)).contiguous()
        blob = _serialize(block, file_format)
        blobs.append(blob)
        shards.append(ShardInfo(
            file=f"shard_{i:05d}{_SUFFIXES[file_format]}",
            offset=offset,
            n_sequences=len(block),
            sha256=hashlib.sha256(blob).hexdigest(),
            documents=(None if documents is None
                       else tuple(documents[offset : offset + len(block)])),
        ))
    manifest = ShardManifest(
        directory=out_dir,
        tokenizer=tokenizer_name,
        seq_len=seq_len,
        n_sequences=n_sequences,
        dtype=dtype,
        corpus=corpus,
        shards=tuple(shards),
        meta=meta,
        spectra_lens_version=_package_version(),
    )

    _refuse_a_run_directory(out_dir)
    try:
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpectraError(f"cannot create the shard directory {out_dir}: {err.strerror or err}") from err
    from spectra_lens.runs.rundir import _Lock  # the run directory's lock, on the shard directory

    lock = _Lock(out_dir)
    try:
        lock.acquire()
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    try:
        return _write_locked(out_dir, manifest, blobs, overwrite)
    finally:
        lock.release(remove=True)


def _refuse_a_run_directory(out_dir: Path) -> None:
    """SpectraError when `out_dir` holds a run's manifest: shards never replace a run's record."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable: `_existing_manifest` decides
    if isinstance(raw, dict) and raw.get("format") != SHARDS_FORMAT and (
            raw.get("format") == "spectra_lens.run" or {"experiment", "status"} <= set(raw)):
        raise SpectraError(
            f"{out_dir} is a run directory (its {MANIFEST_NAME} records a "
            f"{raw.get('experiment', '?')} run), not a shard directory; prepare writes shards only "
            f"into a new directory or a shard directory, not even with --overwrite: choose "
            f"another --out")


def _write_locked(out_dir: Path, manifest: ShardManifest, blobs: list[bytes],
                  overwrite: bool) -> ShardManifest:
    """The writing part of `write_shards`, under the shard directory's lock."""
    shards, n_sequences = manifest.shards, manifest.n_sequences
    seq_len, tokenizer_name = manifest.seq_len, manifest.tokenizer
    _refuse_a_run_directory(out_dir)  # again, under the lock
    stale: set[str] = set()
    if (out_dir / MANIFEST_NAME).exists():
        existing = _existing_manifest(out_dir, overwrite)
        if existing is not None:
            same = existing._content() == manifest._content()
            if same and _files_intact(existing):
                logger.info("%s already holds these %d sequences; nothing written", out_dir,
                            n_sequences)
                return existing
            # The same set with a damaged file is rewritten: its content is what was asked for.
            if not same and not overwrite:
                raise SpectraError(
                    f"{out_dir} already holds a different shard set ({existing.n_sequences} "
                    f"sequences of seq_len {existing.seq_len}, tokenizer {existing.tokenizer!r}); "
                    f"expected an empty directory or the same tokens ({n_sequences} sequences of "
                    f"seq_len {seq_len}, tokenizer {tokenizer_name!r}); pass overwrite=True to "
                    "replace it"
                )
            stale = {s.file for s in existing.shards} - {s.file for s in shards}
        # Remove the old manifest first: while shards are being replaced the set is incomplete.
        (out_dir / MANIFEST_NAME).unlink()

    for info, blob in zip(shards, blobs, strict=True):
        atomic_write_bytes(out_dir / info.file, blob)
    atomic_write_bytes(out_dir / MANIFEST_NAME, _manifest_bytes(manifest))
    for name in stale:
        (out_dir / name).unlink(missing_ok=True)
    logger.info("wrote %d sequences of %d tokens in %d shards to %s", n_sequences, seq_len,
                len(shards), out_dir)
    return manifest


def read_manifest(directory: PathLike) -> ShardManifest:
    """Read and validate a shard directory's `manifest.json` (or the manifest file itself)."""
    directory = Path(directory)
    if directory.name == MANIFEST_NAME and directory.is_file():
        directory = directory.parent
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise SpectraError(
            f"no shard manifest at {path}; expected a directory written by write_shards or "
            "prepare (a directory without manifest.json is not a complete shard set)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpectraError(f"{path} is not valid JSON: {err}") from None
    return _manifest_from_json(raw, directory)


def load_shard(manifest: ShardManifest | PathLike, i: int) -> Tokens:
    """Shard `i` as a `[count, seq_len]` LongTensor, after checking the file's sha256.

    A missing, truncated or corrupt file raises `SpectraError` naming the file.
    """
    if not isinstance(manifest, ShardManifest):
        manifest = read_manifest(manifest)
    info = manifest._shard(i)
    path = manifest.directory / info.file
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise SpectraError(f"shard file {path} is missing (listed in {manifest.path})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != info.sha256:
        raise SpectraError(
            f"shard file {path} is corrupt or truncated: its sha256 is {digest}, expected "
            f"{info.sha256} from {manifest.path} ({len(blob)} bytes read)"
        )
    tokens = _deserialize(blob, path)
    expected = (info.n_sequences, manifest.seq_len)
    if tuple(tokens.shape) != expected:
        raise SpectraError(
            f"shard file {path} holds shape {tuple(tokens.shape)}; the manifest says {expected}"
        )
    return tokens.long()


def iter_shards(directory: ShardManifest | PathLike) -> Iterator[tuple[ShardInfo, Tokens]]:
    """`(info, tokens)` for every shard in order; `info.offset` is the first row's global id."""
    manifest = directory if isinstance(directory, ShardManifest) else read_manifest(directory)
    for i, info in enumerate(manifest.shards):
        yield info, load_shard(manifest, i)


def load_tokens(
    source: ShardManifest | PathLike, *, start: int = 0, stop: int | None = None
) -> Tokens:
    """Global sequences `[start, stop)` of a shard set as one LongTensor, reading only the
    shards that overlap the range."""
    manifest = source if isinstance(source, ShardManifest) else read_manifest(source)
    stop = manifest.n_sequences if stop is None else stop
    if not 0 <= start <= stop <= manifest.n_sequences:
        raise SpectraError(
            f"sequence range [{start}, {stop}) out of bounds; expected "
            f"0 <= start <= stop <= {manifest.n_sequences}"
        )
    parts = [torch.empty(0, manifest.seq_len, dtype=torch.long)]
    for i, info in enumerate(manifest.shards):
        if info.stop > start and info.offset < stop:
            shard = load_shard(manifest, i)
            parts.append(shard[max(start - info.offset, 0) : stop - info.offset])
    return torch.cat(parts)


def _storage_dtype(tokens: Tensor, dtype: str | None) -> str:
    fits_int32 = int(tokens.max()) <= torch.iinfo(torch.int32).max
    if dtype is None:
        return "int32" if fits_int32 else "int64"
    if dtype not in ("int32", "int64"):
        raise SpectraError(f"dtype must be 'int32', 'int64' or None; got {dtype!r}")
    if dtype == "int32" and not fits_int32:
        raise SpectraError(f"token id {int(tokens.max())} does not fit int32; use dtype='int64'")
    return dtype


def _serialize(block: Tensor, file_format: FileFormat) -> bytes:
    if file_format == "safetensors":
        return safetensors.torch.save({_SHARD_KEY: block})
    buffer = io.BytesIO()
    np.save(buffer, block.numpy(), allow_pickle=False)
    return buffer.getvalue()


def _deserialize(blob: bytes, path: Path) -> Tensor:
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(io.BytesIO(blob), allow_pickle=False))
        tensors = safetensors.torch.load(blob)
    except Exception as err:  # the checksum matched, so the file was written this way
        raise SpectraError(f"shard file {path} could not be read: {err}") from err
    if _SHARD_KEY not in tensors:
        raise SpectraError(
            f"shard file {path} has tensors {sorted(tensors)}; expected one named {_SHARD_KEY!r}"
        )
    return tensors[_SHARD_KEY]


def _manifest_bytes(manifest: ShardManifest) -> bytes:
    return (json.dumps(manifest.to_json(), indent=2) + "\n").encode("utf-8")


def _existing_manifest(out_dir: Path, overwrite: bool) -> ShardManifest | None:
    """The complete shard set in `out_dir`, or None if its manifest is unreadable and
    `overwrite` allows replacing it."""
    try:
        return read_manifest(out_dir)
    except SpectraError as err:
        if overwrite:
            return None
        raise SpectraError(
            f"{out_dir} holds an unreadable {MANIFEST_NAME} ({err}); pass overwrite=True to "
            "replace it"
        ) from None


def _files_intact(manifest: ShardManifest) -> bool:
    for info in manifest.shards:
        path = manifest.directory / info.file
        if not path.is_file() or _file_sha256(path) != info.sha256:
            return False
    return True


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_from_json(raw: Any, directory: Path) -> ShardManifest:
    where = directory / MANIFEST_NAME
    if not isinstance(raw, dict) or raw.get("format") != SHARDS_FORMAT:
        raise SpectraError(
            f"{where} is not a shard manifest; expected a JSON object with "
            f"\"format\": {SHARDS_FORMAT!r}"
        )
    version = _field(raw, "version", int, where)
    if version > MANIFEST_VERSION:
        raise SpectraError(
            f"{where} has manifest version {version}; this spectra_lens reads versions up to "
            f"{MANIFEST_VERSION} (upgrade spectra_lens)"
        )
    shards = []
    next_offset = 0
    for j, entry in enumerate(_field(raw, "shards", list, where)):
        entry_where = f"{where} shards[{j}]"
        if not isinstance(entry, dict):
            raise SpectraError(f"{entry_where}: expected a JSON object, got {entry!r}")
        info = ShardInfo(
            file=_field(entry, "file", str, entry_where),
            offset=_field(entry, "offset", int, entry_where),
            n_sequences=_field(entry, "n_sequences", int, entry_where),
            sha256=_field(entry, "sha256", str, entry_where),
            documents=_documents_field(entry, entry_where),
        )
        if Path(info.file).name != info.file or Path(info.file).suffix not in (".safetensors",
                                                                               ".npy"):
            raise SpectraError(
                f"{entry_where}: file {info.file!r} must be a plain .safetensors or .npy name"
            )
        if info.offset != next_offset or info.n_sequences < 1:
            raise SpectraError(
                f"{entry_where}: expected offset {next_offset} and n_sequences >= 1, got offset "
                f"{info.offset} and n_sequences {info.n_sequences}"
            )
        next_offset = info.stop
        shards.append(info)
    manifest = ShardManifest(
        directory=directory,
        tokenizer=_field(raw, "tokenizer", str, where),
        seq_len=_field(raw, "seq_len", int, where),
        n_sequences=_field(raw, "n_sequences", int, where),
        dtype=_field(raw, "dtype", str, where),
        corpus=raw.get("corpus", ""),
        shards=tuple(shards),
        meta=raw.get("meta") or {},
        version=version,
        spectra_lens_version=raw.get("spectra_lens_version", ""),
    )
    if manifest.n_sequences != next_offset:
        raise SpectraError(
            f"{where}: n_sequences is {manifest.n_sequences} but the shards hold {next_offset}"
        )
    return manifest


def _documents_field(entry: dict, where: str) -> tuple[int, ...] | None:
    docs = entry.get("documents")
    if docs is None:
        return None
    n = entry.get("n_sequences")
    if (not isinstance(docs, list) or len(docs) != n
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in docs)):
        raise SpectraError(
            f"{where}: field 'documents' must list one non-negative integer per sequence ({n}); "
            f"got {str(docs)[:80]}")
    return tuple(docs)


def _field(raw: dict, key: str, kind: type, where: Any) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpectraError(f"{where}: field {key!r} must be {kind.__name__}; got {value!r}")
    return value


def _package_version() -> str:
    try:
        return metadata.version("spectra-lens")
    except metadata.PackageNotFoundError:
        return "unknown"
