"""A long document (a 20 MB single-line file) is tokenized only as far as a run needs it: the
tokens are those of the whole document, and the tokenizer never sees the whole text."""

import numpy as np
import pytest
import torch

from spectra_lens.data import corpus as C
from spectra_lens.data.corpus import text_files, tokenize_documents
from spectra_lens.testing import TEST_WORDS, word_tokenizer


@pytest.fixture(scope="module")
def long_line(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("long") / "one_line.txt"
    path.write_text(" ".join(rng.choice(TEST_WORDS, 400_000)))  # ~2.4 MB, no newline
    return path


@pytest.mark.parametrize("packing", ["document", "stream"])
def test_a_long_single_line_is_tokenized_only_as_far_as_needed(long_line, monkeypatch, packing):
    tok = word_tokenizer(pad=True)
    whole = tok(long_line.read_text(), add_special_tokens=False)["input_ids"]
    assert len(long_line.read_text()) > C._LONG_DOCUMENT
    seen = []
    real = C._encode

    def encode(tokenizer, batch):
        seen.extend(len(d) for d in batch)
        return real(tokenizer, batch)

    monkeypatch.setattr(C, "_encode", encode)
    got = tokenize_documents(text_files(str(long_line)), tok, seq_len=17, max_sequences=4,
                             packing=packing)
    bos = tok.bos_token_id
    content = 17 - (bos is not None)
    expected = torch.tensor(whole[: 4 * content]).view(4, content)
    if bos is not None:
        expected = torch.cat([torch.full((4, 1), bos), expected], dim=1)
    assert torch.equal(got.tokens, expected)  # the tokens of the whole document
    assert max(seen) < C._LONG_DOCUMENT // 4  # but never the whole text at once


def test_without_a_limit_a_long_document_is_tokenized_whole(long_line):
    tok = word_tokenizer(pad=True)
    got = tokenize_documents(text_files(str(long_line)), tok, seq_len=17)
    whole = tok(long_line.read_text(), add_special_tokens=False)["input_ids"]
    content = 17 - (tok.bos_token_id is not None)
    assert got.tokens.shape[0] == len(whole) // content
