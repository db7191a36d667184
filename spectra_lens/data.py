"""Corpora -> fixed-length token sequences -> checksummed shards with a JSON manifest.

The pipeline has three stages, each usable on its own:

1. A `Corpus` is a described, re-iterable source of documents (str), read lazily:
   `default_corpus()` (CPython's reference documentation, `pydoc_data.topics`), `text_files`,
   `jsonl`, `hf_dataset`, or `corpus_from_spec` for a command-line string.
2. `tokenize_corpus` concatenates documents with the EOS token between them and cuts the stream
   into fixed-length sequences, each starting with BOS where the model uses one. Fixed-length,
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
         "sha256": "<64 hex digits of the file's bytes>"},
        ...
      ],
      "meta": {"prepend_bos": true, "bos_token_id": 1, "eos_token_id": 2, ...},
      "spectra_lens_version": "0.1.0"
    }

Shard files are safetensors (one tensor under the key "tokens") or `.npy` arrays; both hold
`[count, seq_len]` integers.
"""

import bisect
import glob
import hashlib
import io
import json
import logging
import os
import platform
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
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

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Corpus",
    "ShardInfo",
    "ShardManifest",
    "corpus_from_spec",
    "default_corpus",
    "hf_dataset",
    "iter_shards",
    "jsonl",
    "load_shard",
    "load_tokens",
    "prepare",
    "read_manifest",
    "text_files",
    "tokenize_corpus",
    "write_shards",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_FORMAT = "spectra_lens.shards"
_SHARD_KEY = "tokens"
_SUFFIXES = {"safetensors": ".safetensors", "npy": ".npy"}
_GLOB_MAGIC = re.compile(r"[*?\[]")
_ENCODE_BATCH = 64  # documents per tokenizer call: fast tokenizers parallelize within a batch

Tokens = Int[Tensor, "sequence pos"]
PathLike = str | os.PathLike[str]
FileFormat = Literal["safetensors", "npy"]


# ----------------------------------------------------------------------------------------------
# Text sources


@dataclass(frozen=True)
class Corpus:
    """A described, re-iterable source of documents.

    Iterating calls `reader` afresh, so the documents are read lazily and the same corpus can be
    tokenized twice. `description` is what a shard manifest records as the corpus.
    """

    description: str  # recorded in the shard manifest, so a run can be traced to its text
    reader: Callable[[], Iterator[str]] = field(repr=False, compare=False)  # yields documents

    def __iter__(self) -> Iterator[str]:
        return self.reader()


def default_corpus() -> Corpus:
    """CPython's reference documentation text, `pydoc_data.topics`, one document per topic.

    It ships with every Python install, so it needs no download. Topics are read in sorted key
    order; the text differs between Python versions, which the description records.
    """
    from pydoc_data.topics import topics

    def read() -> Iterator[str]:
        for key in sorted(topics):
            yield topics[key]

    description = (
        f"pydoc_data.topics: CPython {platform.python_version()} reference documentation "
        f"({len(topics)} topics)"
    )
    return Corpus(description, read)


def text_files(paths_or_globs: PathLike | Iterable[PathLike]) -> Corpus:
    """Plain UTF-8 text files, one document per file.

    Each argument is a file path or a glob (`**` recurses). A glob's matches are read in sorted
    order; arguments keep the order given and a file named twice is read once. Missing files,
    globs without a match and empty files raise `SpectraError` here, before any reading.
    """
    if isinstance(paths_or_globs, (str, os.PathLike)):
        items = [os.fspath(paths_or_globs)]
    else:
        items = [os.fspath(p) for p in paths_or_globs]
    if not items:
        raise SpectraError("text_files expected at least one file path or glob; got none")
    files: dict[Path, None] = {}  # ordered set
    for item in items:
        if _GLOB_MAGIC.search(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise SpectraError(
                    f"glob {item!r} matched no files (relative to {os.getcwd()}); "
                    "expected at least one text file"
                )
            files.update((Path(p), None) for p in matches)
            continue
        path = Path(item)
        if path.is_dir():
            raise SpectraError(
                f"{item!r} is a directory; expected a text file or a glob such as "
                f"{os.path.join(item, '*.txt')!r}"
            )
        if not path.is_file():
            raise SpectraError(f"text file not found: {item!r}")
        files[path] = None
    for path in files:
        if path.stat().st_size == 0:
            raise SpectraError(f"text file {str(path)!r} is empty; expected some text")

    def read() -> Iterator[str]:
        for path in files:
            text = _read_text(path)
            if not text.strip():
                raise SpectraError(f"text file {str(path)!r} holds only whitespace")
            yield text

    return Corpus(f"text files {', '.join(items)} ({len(files)} files)", read)


def jsonl(path: PathLike, field: str = "text") -> Corpus:
    """A JSON-lines file, one document per line taken from the string field `field`.

    Blank lines are skipped. A line that is not a JSON object with a string `field` raises
    `SpectraError` naming the file and line number (when iteration reaches it).
    """
    path = Path(path)
    if not path.is_file():
        raise SpectraError(f"JSONL file not found: {str(path)!r}")

    def read() -> Iterator[str]:
        with path.open(encoding="utf-8") as lines:
            try:
                for lineno, line in enumerate(lines, start=1):
                    if line.strip():
                        yield _jsonl_text(line, field, f"{path}:{lineno}")
            except UnicodeDecodeError as err:
                raise SpectraError(f"{path} is not UTF-8 text: {err}") from None

    return Corpus(f"JSONL {path} (field {field!r})", read)


def hf_dataset(name: str, split: str = "train", field: str = "text", **kw: Any) -> Corpus:
    """A Hugging Face dataset, streamed, one document per row from the string field `field`.

    Needs the optional `datasets` package. `kw` goes to `datasets.load_dataset` (for example
    `name=` for a configuration or `data_files=`); `streaming` defaults to True so nothing is
    downloaded beyond the rows read.
    """
    try:
        import datasets
    except ImportError:
        raise SpectraError(
            f"reading the Hugging Face dataset {name!r} needs the `datasets` package, which is "
            "not installed; fix: pip install datasets"
        ) from None
    kw.setdefault("streaming", True)

    def read() -> Iterator[str]:
        rows = datasets.load_dataset(name, split=split, **kw)
        for i, row in enumerate(rows):
            if field not in row:
                raise SpectraError(
                    f"Hugging Face dataset {name!r} (split {split!r}): row {i} has no field "
                    f"{field!r}; its fields are {sorted(row)}"
                )
            text = row[field]
            if not isinstance(text, str):
                raise SpectraError(
                    f"Hugging Face dataset {name!r} (split {split!r}): row {i} field {field!r} "
                    f"is {type(text).__name__}; expected a string"
                )
            yield text

    options = "".join(f", {k}={v!r}" for k, v in sorted(kw.items()) if k != "streaming")
    description = f"Hugging Face dataset {name!r} (split={split!r}, field={field!r}{options})"
    return Corpus(description, read)


def corpus_from_spec(spec: PathLike | None) -> "Corpus | ShardManifest":
    """Resolve a command-line corpus string.

    - None or "default": `default_corpus()`;
    - "hf:NAME[:SPLIT[:FIELD]]": `hf_dataset(NAME, SPLIT, FIELD)`;
    - "PATH.jsonl[:FIELD]": `jsonl(PATH, FIELD)`;
    - a directory holding a shard `manifest.json`: that manifest (already tokenized shards);
    - anything else: a text file or glob, `text_files(spec)`.
    """
    if spec is None or spec == "default":
        return default_corpus()
    spec = os.fspath(spec)
    if not spec:
        raise SpectraError("corpus spec is empty; expected 'default', 'hf:NAME', a path or glob")
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3 or not all(parts):
            raise SpectraError(
                f"corpus spec {spec!r}: expected 'hf:NAME[:SPLIT[:FIELD]]' with non-empty parts"
            )
        return hf_dataset(*parts)
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".jsonl") and tail:
        return jsonl(head, field=tail)
    if spec.endswith(".jsonl"):
        return jsonl(spec)
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, MANIFEST_NAME)):
        return read_manifest(spec)
    if os.path.isdir(spec):
        raise SpectraError(
            f"corpus directory {spec!r} holds no {MANIFEST_NAME}; expected prepared shards, or "
            f"pass a glob such as {os.path.join(spec, '*.txt')!r} to read its text files"
        )
    return text_files(spec)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpectraError(f"text file {str(path)!r} is not UTF-8 text: {err}") from None


def _jsonl_text(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise SpectraError(
            f"{where}: invalid JSON ({err.msg} at column {err.colno}); expected one JSON object "
            "per line"
        ) from None
    if not isinstance(record, dict):
        raise SpectraError(
            f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}"
        )
    if field not in record:
        raise SpectraError(f"{where}: no field {field!r}; the record has fields {sorted(record)}")
    text = record[field]
    if not isinstance(text, str):
        raise SpectraError(f"{where}: field {field!r} is {type(text).__name__}; expected a string")
    return text


# ----------------------------------------------------------------------------------------------
# Tokenization


def tokenize_corpus(
    docs: Iterable[str],
    tokenizer: Any,
    *,
    seq_len: int,
    max_sequences: int | None = None,
    prepend_bos: bool | None = None,
    min_tokens: int | None = None,
) -> Tokens:
    """Documents -> `[n_sequences, seq_len]` token ids, deterministically.

    Documents are encoded without special tokens and concatenated with the tokenizer's EOS token
    between consecutive documents (no separator if it has none). The stream is cut into
    consecutive chunks; with BOS each sequence is `[BOS] + seq_len - 1` content tokens, else
    `seq_len` content tokens. The trailing partial chunk is dropped.

    Args:
        docs: documents, read lazily; reading stops once `max_sequences` are filled.
        tokenizer: a Hugging Face tokenizer (callable, with `bos_token_id`, `eos_token_id`).
        seq_len: tokens per sequence, BOS included; at least 2.
        max_sequences: keep at most this many sequences (None: all).
        prepend_bos: start every sequence with BOS. None: when the tokenizer defines one. Pass the
            model's own setting (TransformerLens `cfg.default_prepend_bos`) to follow the model.
        min_tokens: skip documents shorter than this many tokens (None: keep all).
    """
    if isinstance(docs, str):
        raise SpectraError("tokenize_corpus expected an iterable of documents; got one str")
    _check_int("seq_len", seq_len, minimum=2)
    if max_sequences is not None:
        _check_int("max_sequences", max_sequences, minimum=1)
    if min_tokens is not None:
        _check_int("min_tokens", min_tokens, minimum=1)
    bos = _bos_token(tokenizer, prepend_bos)
    eos = tokenizer.eos_token_id
    content_len = seq_len - (bos is not None)
    wanted = None if max_sequences is None else max_sequences * content_len

    pieces: list[np.ndarray] = []
    n_tokens = n_docs = n_skipped = 0
    for ids in _encode_documents(docs, tokenizer):
        if not ids:
            continue
        if min_tokens is not None and len(ids) < min_tokens:
            n_skipped += 1
            continue
        if n_docs and eos is not None:
            pieces.append(np.array([eos], dtype=np.int64))
            n_tokens += 1
        pieces.append(np.asarray(ids, dtype=np.int64))
        n_tokens += len(ids)
        n_docs += 1
        if wanted is not None and n_tokens >= wanted:
            break

    skipped = f" ({n_skipped} shorter than min_tokens={min_tokens} skipped)" if n_skipped else ""
    if n_docs == 0:
        raise SpectraError(f"empty corpus: expected documents with text, found none{skipped}")
    n_sequences = n_tokens // content_len
    if max_sequences is not None:
        n_sequences = min(n_sequences, max_sequences)
    if n_sequences == 0:
        bos_note = " after BOS" if bos is not None else ""
        raise SpectraError(
            f"corpus too short: found {n_tokens} tokens in {n_docs} documents{skipped}; one "
            f"sequence of seq_len={seq_len} needs {content_len} content tokens{bos_note}"
        )
    stream = np.concatenate(pieces)[: n_sequences * content_len]
    body = torch.from_numpy(stream).view(n_sequences, content_len)
    if bos is None:
        return body.clone()
    return torch.cat([torch.full((n_sequences, 1), bos, dtype=torch.long), body], dim=1)


def _bos_token(tokenizer: Any, prepend_bos: bool | None) -> int | None:
    """The BOS id to prepend, or None for no BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is None:
        return bos
    if prepend_bos and bos is None:
        raise SpectraError(
            f"prepend_bos=True but the tokenizer {_tokenizer_label(tokenizer)} has no BOS token; "
            "pass prepend_bos=False or None"
        )
    return bos if prepend_bos else None


def _encode_documents(docs: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, encoded in batches."""
    batch: list[str] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise SpectraError(f"document {i} is {type(doc).__name__}; expected str")
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            yield from _encode(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode(tokenizer, batch)


def _encode(tokenizer: Any, batch: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the model's context are expected here, since they are
    # cut into seq_len chunks; without it transformers warns about every one.
    encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return encoded["input_ids"]


def _tokenizer_label(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "")
    return repr(name) if name else type(tokenizer).__name__


# ----------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: it holds the global sequence ids `[offset, offset + n_sequences)`."""

    file: str  # file name inside the shard directory
    offset: int  # global id of the shard's first sequence
    n_sequences: int  # rows in the file
    sha256: str  # hex digest of the file's bytes, checked on every load

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

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to `manifest.json`."""
        return {
            "format": _FORMAT,
            "version": self.version,
            "tokenizer": self.tokenizer,
            "seq_len": self.seq_len,
            "n_sequences": self.n_sequences,
            "dtype": self.dtype,
            "corpus": self.corpus,
            "shards": [
                {"file": s.file, "offset": s.offset, "n_sequences": s.n_sequences,
                 "sha256": s.sha256}
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
    """
    _check_tokens(tokens)
    _check_int("shard_size", shard_size, minimum=1)
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

    out_dir.mkdir(parents=True, exist_ok=True)
    for info, blob in zip(shards, blobs, strict=True):
        _atomic_write(out_dir / info.file, blob)
    _atomic_write(out_dir / MANIFEST_NAME, _manifest_bytes(manifest))
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


def _check_tokens(tokens: Any) -> None:
    if not isinstance(tokens, Tensor):
        raise SpectraError(f"tokens must be a torch.Tensor; got {type(tokens).__name__}")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise SpectraError(
            f"tokens must have shape [n_sequences, seq_len], both > 0; got {tuple(tokens.shape)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise SpectraError(f"tokens must be integer ids; got dtype {tokens.dtype}")
    if int(tokens.min()) < 0:
        raise SpectraError(f"token ids must be non-negative; got minimum {int(tokens.min())}")


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


def _atomic_write(path: Path, blob: bytes) -> None:
    """Write `blob` to `path` so that readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; shards are ordinary data, readable as the umask allows.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise SpectraError(
            f"{where} is not a shard manifest; expected a JSON object with "
            f"\"format\": {_FORMAT!r}"
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


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpectraError(f"{name} must be an integer >= {minimum}; got {value!r}")


# ----------------------------------------------------------------------------------------------
# The whole pipeline


def prepare(
    corpus_spec: "PathLike | Corpus | None",
    tokenizer: Any,
    out_dir: PathLike,
    *,
    seq_len: int,
    n_sequences: int | None,
    shard_size: int,
    prepend_bos: bool | None = None,
    min_tokens: int | None = None,
    tokenizer_name: str | None = None,
    dtype: Literal["int32", "int64"] | None = None,
    file_format: FileFormat = "safetensors",
    overwrite: bool = False,
) -> ShardManifest:
    """Corpus -> tokens -> shards in `out_dir`; returns the manifest.

    `corpus_spec` is a `Corpus` or a string for `corpus_from_spec`. If it names prepared shards,
    their first `n_sequences` are re-sharded into `out_dir` (their tokenizer and seq_len must
    match). `n_sequences=None` takes every full sequence the corpus yields; a number the corpus
    cannot fill raises `SpectraError` saying how many it holds. `tokenizer_name` defaults to
    the tokenizer's `name_or_path`. Re-running with the same arguments is a no-op; see
    `write_shards` for `dtype`, `file_format` and `overwrite`.
    """
    if n_sequences is not None:
        _check_int("n_sequences", n_sequences, minimum=1)
    name = tokenizer_name or getattr(tokenizer, "name_or_path", "")
    if not name:
        raise SpectraError(
            "the tokenizer has no name_or_path to record in the manifest; pass tokenizer_name="
        )
    source = corpus_spec if isinstance(corpus_spec, Corpus) else corpus_from_spec(corpus_spec)
    if isinstance(source, ShardManifest):
        tokens = _reuse_shards(source, name, seq_len, n_sequences)
        description, meta = source.corpus, dict(source.meta)
    else:
        bos = _bos_token(tokenizer, prepend_bos)
        tokens = tokenize_corpus(source, tokenizer, seq_len=seq_len, max_sequences=n_sequences,
                                 prepend_bos=bos is not None, min_tokens=min_tokens)
        if n_sequences is not None and len(tokens) < n_sequences:
            raise SpectraError(
                f"corpus {source.description} gives {len(tokens)} sequences of seq_len "
                f"{seq_len}; expected n_sequences={n_sequences} (ask for at most {len(tokens)} "
                "or use a larger corpus)"
            )
        description = source.description
        meta = {
            "prepend_bos": bos is not None,
            "bos_token_id": bos,
            "eos_token_id": tokenizer.eos_token_id,
            "min_tokens": min_tokens,
            "vocab_size": len(tokenizer),
        }
    return write_shards(tokens, out_dir, shard_size=shard_size, tokenizer_name=name,
                        corpus=description, meta=meta, dtype=dtype, file_format=file_format,
                        overwrite=overwrite)


def _reuse_shards(
    source: ShardManifest, tokenizer_name: str, seq_len: int, n_sequences: int | None
) -> Tokens:
    if source.tokenizer != tokenizer_name:
        raise SpectraError(
            f"shards in {source.directory} were tokenized by {source.tokenizer!r}; expected "
            f"{tokenizer_name!r} (pass tokenizer_name= if they are the same tokenizer)"
        )
    if source.seq_len != seq_len:
        raise SpectraError(
            f"shards in {source.directory} have seq_len {source.seq_len}; expected {seq_len}"
        )
    if n_sequences is not None and n_sequences > source.n_sequences:
        raise SpectraError(
            f"shards in {source.directory} hold {source.n_sequences} sequences; expected at "
            f"least n_sequences={n_sequences}"
        )
    return load_tokens(source, stop=n_sequences)
