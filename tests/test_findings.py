"""The README quotes only numbers that `make findings` regenerates into docs/FINDINGS.md."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("## What the default run finds",)
_NUMBER = re.compile(r"(?<![\w.])[−+-]?\d+(?:[.,]\d+)*%?")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else None]


def numbers(text: str) -> set[str]:
    """The numbers of `text` as written (signs and % kept, U+2212 read as a minus)."""
    text = re.sub(r"`[^`]*`", " ", text)  # commands and code are not findings
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"\bL\d+H\d+\b", " ", text)  # head labels are names
    return {m.group().replace("−", "-").lstrip("+") for m in _NUMBER.finditer(text)}


def test_the_number_finder_reads_signed_decimals_and_percentages():
    assert numbers("slope −1.85 [−1.96, +0.04], 17 heads, 7.8% (`--n 3`), L6H0") == {
        "-1.85", "-1.96", "0.04", "17", "7.8%"}


def test_every_number_the_readme_quotes_is_in_findings():
    readme = (ROOT / "README.md").read_text()
    findings = (ROOT / "docs" / "FINDINGS.md").read_text()
    have = numbers(findings)
    for heading in SECTIONS:
        missing = sorted(numbers(_section(readme, heading)) - have)
        assert not missing, (f"README section {heading!r} quotes numbers that docs/FINDINGS.md "
                             f"does not hold (run `make findings`): {missing}")
