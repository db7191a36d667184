"""docs/DATA_DICTIONARY.md covers every file a run writes: each table an experiment declares
(`OUTPUTS`) has a heading there, and so do the other files (tests/present/test_report.py checks
every file real runs list in their manifests, and every figure name, against the same headings)."""

import fnmatch
import importlib
import re
from pathlib import Path

from spectra_lens.experiments.report import EXPERIMENTS

DICTIONARY = Path(__file__).resolve().parents[2] / "docs" / "DATA_DICTIONARY.md"


def dictionary_patterns(text: str | None = None) -> list[str]:
    """The file patterns of the dictionary's "## " headings: "## a.csv (one row per head)" names
    `a.csv`, "## x/*.html, x/*.json" names both; `XXXXX` stands for five digits."""
    text = DICTIONARY.read_text(encoding="utf-8") if text is None else text
    out = []
    for line in text.splitlines():
        if not line.startswith("## "):
            continue
        for part in line[3:].split(", "):
            name = part.split(" (")[0].strip().strip("`")
            if re.fullmatch(r"[\w*./{}|-]+\.(csv|json|npz|parquet|safetensors|npy|html|png|svg)", name):
                out.append(name.replace("XXXXX", "?????"))
    return out


def covered(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def test_every_declared_table_has_a_heading():
    patterns = dictionary_patterns()
    for experiment, module in EXPERIMENTS.items():
        for table in importlib.import_module(module).OUTPUTS.tables:
            assert table.pattern in patterns, f"{experiment}: {table.pattern} has no heading in {DICTIONARY.name}"


def test_the_files_outside_the_declarations_have_headings():
    patterns = dictionary_patterns()
    for name in ("manifest.json", "moments/shard_00000.npz", "records/shard_00003.parquet",
                 "strongest_heads_sample.csv", "parts/part_00001.npz", "shards/manifest.json",
                 "shards/shard_00000.safetensors", "figures/agreement.html", "figures/agreement.json",
                 "figures/agreement.png", "figures/agreement.svg"):
        assert covered(name, patterns), name


def test_the_heading_parser_can_fail():
    patterns = dictionary_patterns("## a.csv (rows)\n## b/*.npz, c.json\n## Tests named in column names\n")
    assert patterns == ["a.csv", "b/*.npz", "c.json"]
    assert not covered("records/shard_00000.parquet", patterns)
