"""Fuzz-style tests of every corpus entry point (issue 11): random bytes, random JSON lines and
truncated shards either work or raise SpectraError, and a run on them never ends with a manifest
saying "complete" unless it did complete.

Inputs come from fixed seeds, so a failure reproduces.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import observational
from spectra_lens.config import ObservationalConfig
from spectra_lens.data.corpus import tokenize_documents
from spectra_lens.data.prepare import corpus_from_spec, prepare
from spectra_lens.data.shards import load_tokens, read_manifest
from spectra_lens.errors import SpectraError
from spectra_lens.models import bridge_from_hf
from spectra_lens.testing import TEST_WORDS, tiny_hf_model, word_tokenizer

WORDS = TEST_WORDS
SEEDS = range(6)



@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def bridge(tok):
    return bridge_from_hf(tiny_hf_model("llama_gqa"), word_tokenizer())


def random_bytes(rng, path: Path) -> str:
    kind = rng.integers(4)
    n = int(rng.integers(0, 4000))
    if kind == 0:  # arbitrary bytes: mostly not UTF-8
        blob = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == 1:  # control characters only (NUL and friends), valid UTF-8
        blob = rng.integers(0, 32, n, dtype=np.uint8).tobytes()
    elif kind == 2:  # words mixed with control characters
        parts = [rng.choice(WORDS) if rng.random() < 0.5 else chr(int(rng.integers(0, 32))) for _ in range(n // 4)]
        blob = " ".join(parts).encode()
    else:  # random printable text
        blob = bytes(rng.integers(32, 127, n, dtype=np.uint8)).replace(b"\\", b" ")
    path.write_bytes(blob)
    return str(path)


def random_jsonl(rng, path: Path) -> str:
    lines = []
    for _ in range(int(rng.integers(0, 40))):
        kind = rng.integers(7)
        words = " ".join(rng.choice(WORDS, int(rng.integers(0, 80))))
        lines.append([
            json.dumps({"text": words}),
            json.dumps({"text": int(rng.integers(100))}),
            json.dumps({"other": words}),
            json.dumps([words]),
            json.dumps({"text": words})[: int(rng.integers(1, 20))],  # cut mid-line
            "",
            json.dumps({"text": "\u0000" * int(rng.integers(1, 50))}),
        ][kind])
    path.write_text("\n".join(lines))
    return str(path)


def truncated_shards(rng, tok, directory: Path, corpus_dir: Path) -> str:
    rng_words = np.random.default_rng(0)
    (corpus_dir / "doc.txt").write_text(" ".join(rng_words.choice(WORDS, 600)))
    manifest = prepare(str(corpus_dir / "doc.txt"), tok, directory, seq_len=24, n_sequences=8,
                       shard_size=4, tokenizer_name="word-level")
    victim = [manifest.path, *(directory / s.file for s in manifest.shards)][int(rng.integers(3))]
    blob = victim.read_bytes()
    victim.write_bytes(blob[: int(rng.integers(0, len(blob)))])
    return str(directory)


def read_all(spec, tok):
    """Every reader of a corpus spec, to the end: tokens or SpectraError."""
    source = corpus_from_spec(spec)
    if hasattr(source, "shards"):
        return load_tokens(source)
    return tokenize_documents(source, tok, seq_len=24, packing="stream").tokens


MAKERS = {"bytes": lambda rng, tmp, tok: random_bytes(rng, tmp / "doc.txt"),
          "jsonl": lambda rng, tmp, tok: random_jsonl(rng, tmp / "docs.jsonl"),
          "shards": lambda rng, tmp, tok: truncated_shards(rng, tok, tmp / "shards", tmp)}


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("seed", SEEDS)
def test_readers_work_or_raise_spectra_error(kind, seed, tok, tmp_path):
    spec = MAKERS[kind](np.random.default_rng(seed), tmp_path, tok)
    try:
        tokens = read_all(spec, tok)
    except SpectraError:
        return
    assert tokens.ndim == 2 and tokens.shape[1] == 24 and int(tokens.max()) < len(tok)


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_prepare_and_observe_never_leave_a_false_complete(kind, seed, tok, bridge, tmp_path):
    spec = MAKERS[kind](np.random.default_rng(seed), tmp_path, tok)
    try:
        prepare(spec, tok, tmp_path / "prepared", seq_len=24, n_sequences=4, shard_size=2,
                tokenizer_name="word-level")
    except SpectraError:
        assert not (tmp_path / "prepared" / "manifest.json").exists()
    else:
        read_manifest(tmp_path / "prepared")  # a manifest that exists describes whole shards
    out = tmp_path / "run"
    cfg = ObservationalConfig(corpus=spec, out=str(out), seq_len=24, n_sequences=4, shard_size=2,
                              batch_size=4, n_boot=20, top_heads=1)
    try:
        observational.run(cfg, model=bridge, progress=False)
    except SpectraError:
        if (out / "manifest.json").exists():
            assert json.loads((out / "manifest.json").read_text())["status"] != "complete"
    else:
        assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
