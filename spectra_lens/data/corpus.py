"""Text sources and tokenization: corpora of documents -> fixed-length token sequences.

1. A `Corpus` is a described, re-iterable source of documents (str), read lazily:
   `default_corpus()` (CPython's reference documentation, `pydoc_data.topics`), `text_files`,
   `jsonl`, `hf_dataset`; `spectra_lens.data.prepare.corpus_from_spec` resolves a command-line string.
2. `tokenize_documents` cuts every document into its own fixed-length sequences (a sequence
   never spans two documents), draws them round-robin across documents so that no document
   dominates, and records each sequence's document id: the independent unit of the statistics.
   With `packing="stream"` it concatenates documents with the EOS token between them and cuts
   the stream instead (sequences may span documents). Every sequence starts with BOS where the
   model uses one. Fixed-length, unpadded sequences keep position ids trivial (left padding
   makes the bridge derive them from the attention mask).

The next stage, shards on disk with a manifest, is `spectra_lens.data.shards`.
"""

import glob
import itertools
import json
import logging
import os
import platform
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from spectra_lens.errors import SpectraError
from spectra_lens.validate import check_int

__all__ = [
    "Corpus",
    "default_corpus",
    "hf_dataset",
    "jsonl",
    "text_files",
    "TokenizedCorpus",
    "tokenize_corpus",
    "tokenize_documents",
    "with_coarser",
    "CorpusTooShort",
]

logger = logging.getLogger(__name__)

_GLOB_MAGIC = re.compile(r"[*?\[]")
_ENCODE_BATCH = 64  # documents per tokenizer call: fast tokenizers parallelize within a batch
# A document longer than this (characters) is tokenized in growing prefixes, cut at whitespace,
# until it yields the tokens a run needs: tokenizing 20 MB at once takes gigabytes.
_LONG_DOCUMENT = 1 << 20
_PREFIX_MARGIN = 8  # tokens beyond the ones needed, so that none comes from the cut itself

Tokens = Int[Tensor, "sequence pos"]
PathLike = str | os.PathLike[str]


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
    # what to try when its documents are too short for a sequence (e.g. a coarser document unit)
    hint: str = field(default="", repr=False, compare=False)
    # the same text in longer documents (e.g. a book per document rather than a chapter), which
    # `tokenize_corpus` reads instead when no document holds one sequence
    coarser: "Callable[[], Corpus] | None" = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator[str]:
        return self.reader()

    def _repr_html_(self) -> str:
        import html

        return f"<b>Corpus</b> {html.escape(self.description)} (documents are read when iterated)"


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
            "not installed: pip install 'spectra-lens[hf]'"
        ) from None
    kw.setdefault("streaming", True)

    def read() -> Iterator[str]:
        yield from _hf_rows(datasets, name, split, field, kw)

    options = "".join(f", {k}={v!r}" for k, v in sorted(kw.items()) if k != "streaming")
    description = f"Hugging Face dataset {name!r} (split={split!r}, field={field!r}{options})"
    return Corpus(description, read)


def _hf_rows(datasets, name: str, split: str, field: str, kw: dict) -> Iterator[str]:
    """The rows of a Hugging Face dataset; a failure to fetch it (offline, no such dataset, a
    network error part-way) is one SpectraError line, not the library's traceback."""
    try:
        rows = iter(datasets.load_dataset(name, split=split, **kw))
    except SpectraError:
        raise
    except Exception as err:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise SpectraError(_hf_failure(name, err)) from None
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:
            raise SpectraError(_hf_failure(name, err)) from None
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


def _hf_failure(name: str, err: Exception) -> str:
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    offline = " (offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)" if any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) else ""
    return (f"cannot read the Hugging Face dataset {name!r}{offline}: {type(err).__name__}: "
            f"{first[:300]}; check the name and the network, or pass a local file as --corpus")


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
            # json's own message may end in "at" ("Unterminated string starting at")
            f"{where}: invalid JSON ({err.msg.removesuffix(' at')} at column {err.colno}); "
            "expected one JSON object per line"
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


class CorpusTooShort(SpectraError):
    """No document of the corpus holds the content of one sequence."""


@dataclass(frozen=True, repr=False)
class TokenizedCorpus:
    """Fixed-length sequences and, per sequence, the id of the document they come from.

    `documents[i]` is the index (in the corpus's reading order, from 0) of the document that
    holds sequence i, or, for a sequence that spans documents (packing "stream"), the one
    holding most of its tokens.
    """

    tokens: Int[Tensor, "sequence pos"]
    documents: Int[Tensor, " sequence"]
    n_documents_read: int

    def __repr__(self) -> str:
        return (f"TokenizedCorpus(sequences={self.tokens.shape[0]}, seq_len={self.tokens.shape[1]}, "
                f"documents={int(self.documents.unique().numel())})")

    def max_document_share(self) -> float:
        """The largest share of the sequences that one document supplies."""
        return float(torch.bincount(self.documents).max()) / len(self.documents)


def tokenize_documents(
    docs: Iterable[str],
    tokenizer: Any,
    *,
    seq_len: int,
    max_sequences: int | None = None,
    prepend_bos: bool | None = None,
    min_tokens: int | None = None,
    packing: str = "document",
    balance: bool = True,
) -> TokenizedCorpus:
    """Documents -> `[n_sequences, seq_len]` token ids and the document of every sequence.

    `packing="document"` (default): each document is cut into its own chunks of `seq_len`
    tokens ([BOS] + seq_len − 1 content tokens where the model uses BOS); a document's trailing
    partial chunk is dropped, so a sequence never spans two documents and documents shorter
    than one chunk give none. With `balance` (default) and `max_sequences`, the sequences are
    drawn round-robin across documents (the first chunk of every document, then the second,
    ...), so that no document supplies more than its share; reading stops once `max_sequences`
    documents have a chunk. Without `balance` the chunks are taken in reading order. Either
    way the result is ordered by document, then by position in the document.

    `packing="stream"`: the documents concatenated with the tokenizer's EOS token between
    consecutive ones (no separator if it has none) and the stream cut into consecutive chunks;
    the trailing partial chunk is dropped (no other tokens lost, sequences may span documents).
    `documents[i]` is the document holding most of sequence i (the earlier one on a tie).
    `balance` does not apply.

    Document ids are indices in the reading order of `docs`, counting every document read
    (also empty or skipped ones), so they are stable across runs of the same corpus.
    """
    if isinstance(docs, str):
        raise SpectraError("tokenize_documents expected an iterable of documents; got one str")
    if packing not in ("document", "stream"):
        raise SpectraError(f"packing must be 'document' or 'stream'; got {packing!r}")
    check_int("seq_len", seq_len, minimum=2)
    if max_sequences is not None:
        check_int("max_sequences", max_sequences, minimum=1)
    if min_tokens is not None:
        check_int("min_tokens", min_tokens, minimum=1)
    bos = _bos_token(tokenizer, prepend_bos)
    content_len = seq_len - (bos is not None)
    if packing == "stream":
        return _stream_with_documents(docs, tokenizer, bos=bos, content_len=content_len,
                                      max_sequences=max_sequences, min_tokens=min_tokens)

    chunks: dict[int, np.ndarray] = {}  # document id -> [n_chunks, content_len]
    n_read = n_tokens = 0
    needed = None if max_sequences is None else max(max_sequences * content_len, min_tokens or 0)
    for doc_id, ids in enumerate(_encode_documents(docs, tokenizer, needed=needed)):
        n_read = doc_id + 1
        if min_tokens is not None and len(ids) < min_tokens:
            continue
        n_tokens += len(ids)
        n_chunks = len(ids) // content_len
        if max_sequences is not None:
            n_chunks = min(n_chunks, max_sequences)
        if n_chunks:
            chunks[doc_id] = np.asarray(ids[: n_chunks * content_len], dtype=np.int64).reshape(
                n_chunks, content_len)
        if max_sequences is not None:
            if balance and len(chunks) >= max_sequences:
                break
            if not balance and sum(len(c) for c in chunks.values()) >= max_sequences:
                break
    if not chunks:
        raise CorpusTooShort(
            f"corpus too short: {n_read} documents ({n_tokens} tokens) hold no document of at "
            f"least {content_len} tokens, the content of one sequence of seq_len={seq_len}; "
            "use a shorter seq_len (in Python, packing='stream' also joins documents)"
            + (f"; {docs.hint}" if getattr(docs, "hint", "") else ""))
    if max_sequences is None:
        picked = [(d, k) for d in chunks for k in range(len(chunks[d]))]
    elif balance:
        picked = []
        depth = 0
        while len(picked) < max_sequences:
            layer = [(d, depth) for d in chunks if depth < len(chunks[d])]
            if not layer:
                break
            picked.extend(layer[: max_sequences - len(picked)])
            depth += 1
    else:
        picked = [(d, k) for d in chunks for k in range(len(chunks[d]))][:max_sequences]
    picked.sort()
    body = torch.from_numpy(np.stack([chunks[d][k] for d, k in picked]))
    documents = torch.tensor([d for d, _ in picked], dtype=torch.long)
    if bos is not None:
        body = torch.cat([torch.full((len(picked), 1), bos, dtype=torch.long), body], dim=1)
    return TokenizedCorpus(body, documents, n_read)


def with_coarser(source: Corpus, attempt: Callable[[Corpus], Any], *, why: str) -> tuple[Corpus, Any]:
    """(source, attempt(source)), or, where that raises `CorpusTooShort` and `source` names a
    `coarser` corpus (the same text in longer documents), (coarser, attempt(coarser)) with one
    warning "<source>: <why>; reading <coarser> instead". Record the description of the corpus
    returned."""
    try:
        return source, attempt(source)
    except CorpusTooShort:
        if source.coarser is None:
            raise
    coarse = source.coarser()
    logger.warning("%s: %s; reading %s instead", source.description.split(":")[0], why,
                   coarse.description.split(":")[0])
    return coarse, attempt(coarse)


def tokenize_corpus(source: Corpus, tokenizer: Any, **kwargs: Any) -> tuple[Corpus, TokenizedCorpus]:
    """`tokenize_documents(source, tokenizer, **kwargs)` through `with_coarser`: where no document
    of `source` holds one sequence, its coarser corpus's sequences. Returns the corpus read and
    its sequences."""
    return with_coarser(source, lambda c: tokenize_documents(c, tokenizer, **kwargs),
                        why=f"no document holds {kwargs.get('seq_len')} tokens")


def _stream_with_documents(docs, tokenizer, *, bos, content_len, max_sequences, min_tokens):
    eos = tokenizer.eos_token_id
    wanted = None if max_sequences is None else max_sequences * content_len
    pieces, owners = [], []
    n_tokens = n_docs = n_read = 0
    needed = None if wanted is None else max(wanted, min_tokens or 0)
    for doc_id, ids in enumerate(_encode_documents(docs, tokenizer, needed=needed)):
        n_read = doc_id + 1
        if not ids or (min_tokens is not None and len(ids) < min_tokens):
            continue
        if n_docs and eos is not None:
            pieces.append(np.array([eos], dtype=np.int64))
            owners.append(np.array([doc_id], dtype=np.int64))  # the separator opens the next
            n_tokens += 1
        pieces.append(np.asarray(ids, dtype=np.int64))
        owners.append(np.full(len(ids), doc_id, dtype=np.int64))
        n_tokens += len(ids)
        n_docs += 1
        if wanted is not None and n_tokens >= wanted:
            break
    n_sequences = n_tokens // content_len
    if max_sequences is not None:
        n_sequences = min(n_sequences, max_sequences)
    if n_sequences == 0:
        raise SpectraError(
            f"corpus too short: found {n_tokens} tokens in {n_docs} documents; one sequence of "
            f"{content_len} content tokens needs more")
    cut = n_sequences * content_len
    body = torch.from_numpy(np.concatenate(pieces)[:cut]).view(n_sequences, content_len)
    own = np.concatenate(owners)[:cut].reshape(n_sequences, content_len)
    # The owner holding most tokens of each chunk; ids ascend along the stream, so the
    # earliest maximum is the earlier document on a tie.
    documents = []
    for row in own:
        values, counts = np.unique(row, return_counts=True)
        documents.append(int(values[np.argmax(counts)]))
    if bos is not None:
        body = torch.cat([torch.full((n_sequences, 1), bos, dtype=torch.long), body], dim=1)
    return TokenizedCorpus(body.clone(), torch.tensor(documents, dtype=torch.long), n_read)


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


# C0/C1 control characters other than tab, newline and carriage return.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _check_text(doc: str, where: str) -> None:
    """SpectraError for a document that is mostly control characters (a binary file, NUL bytes):
    it tokenizes without complaint and gives attention statistics of noise."""
    n_control = len(_CONTROL.findall(doc))
    if n_control and n_control * 2 > len(doc):
        raise SpectraError(
            f"{where} is mostly control characters ({n_control} of {len(doc)}, e.g. NUL bytes); "
            f"expected text"
        )


def _encode_documents(docs: Iterable[str], tokenizer: Any, *,
                      needed: int | None = None) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, encoded in batches.

    `needed`: at most this many tokens of a document are used; a document longer than
    `_LONG_DOCUMENT` characters then yields only its first tokens (`_encode_prefix`), so its
    memory is bounded by what the run uses, not by the document's length."""
    batch: list[str] = []
    label = f" of {docs.description}" if isinstance(docs, Corpus) else ""
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise SpectraError(f"document {i} is {type(doc).__name__}; expected str")
        _check_text(doc[:_LONG_DOCUMENT], f"document {i}{label}")
        if needed is not None and len(doc) > _LONG_DOCUMENT:
            if batch:
                yield from _encode(tokenizer, batch)
                batch = []
            yield _encode_prefix(tokenizer, doc, needed)
            continue
        if len(doc) > _LONG_DOCUMENT:
            _check_text(doc, f"document {i}{label}")
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            yield from _encode(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode(tokenizer, batch)


def _encode_prefix(tokenizer: Any, doc: str, needed: int) -> list[int]:
    """The first `needed` token ids of `doc` (all of them when it has fewer), from prefixes of
    growing length cut just before a whitespace that follows a word: tokenizers split words at
    whitespace, so the tokens before the cut are those of the whole document, and
    `_PREFIX_MARGIN` more are tokenized than kept. A document with no such whitespace is
    tokenized whole."""
    size = max(16 * needed, 1 << 16)
    while size < len(doc):
        cut = _WORD_END.search(doc, size)
        if cut is None:
            break
        ids = _encode(tokenizer, [doc[: cut.start() + 1]])[0]
        if len(ids) >= needed + _PREFIX_MARGIN:
            return ids[:needed]
        size = 4 * size
    return _encode(tokenizer, [doc])[0]


# the last character of a word followed by whitespace (the prefix ends after it)
_WORD_END = re.compile(r"\S(?=\s)")


def _encode(tokenizer: Any, batch: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the model's context are expected here, since they are
    # cut into seq_len chunks; without it transformers warns about every one.
    encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return encoded["input_ids"]


def _tokenizer_label(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "")
    return repr(name) if name else type(tokenizer).__name__


