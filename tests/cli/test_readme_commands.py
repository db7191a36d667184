"""Every `spectra-lens ...` command the README shows parses with the real parser, and the cheap
ones run (on a tiny model, small sizes, no images), so the README cannot drift from the CLI.

Commands come from the README's fenced bash blocks and its inline code spans. Optional parts
written `[--flag value]` are taken as given; `...` and the placeholder `COMMAND` are not flags.
"""

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from spectra_lens.experiments import cli

from spectra_lens.testing import tiny_hf_model, word_corpus, word_tokenizer

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands(text: str | None = None) -> list[list[str]]:
    """argv (after `spectra-lens`) of every command in the README, in order, without repeats."""
    text = README.read_text() if text is None else text
    lines = [line.strip() for m in re.finditer(r"```bash\n(.*?)```", text, re.S)
             for line in m.group(1).splitlines()]
    lines += [m.group(1) for m in re.finditer(r"`(spectra-lens [^`]*)`", text)]
    out = []
    for line in lines:
        if not line.startswith("spectra-lens "):
            continue
        line = line.split(" #")[0].replace("[", " ").replace("]", " ")
        argv = [w for w in shlex.split(line)[1:] if w != "..."]
        if argv and argv[0] != "COMMAND" and argv not in out:
            out.append(argv)
    return out


COMMANDS = readme_commands()


def _parse(argv: list[str]):
    """cli.parse, with argparse's exit turned into a test failure that shows its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cli.parse(argv)
    except SystemExit as e:
        pytest.fail(f"`spectra-lens {shlex.join(argv)}` does not parse (exit {e.code}): "
                    f"{err.getvalue().strip()}")


def test_the_readme_shows_commands_of_every_experiment():
    shown = {argv[0] for argv in COMMANDS}
    assert {"observe", "intervene", "gain", "qk-control", "study", "generate", "head-types",
            "head", "report", "merge", "prepare"} <= shown
    assert any(len(argv) > 3 for argv in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_every_readme_command_parses(argv):
    assert argv[0] in cli.COMMANDS, f"README names an unknown command {argv[0]!r}"
    if argv[1:] in ([], ["--help"]):  # a command named in prose, or its help
        if argv[1:]:
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli.main(argv) == 0
        return
    name, cfg, _ = _parse(argv)
    assert name == argv[0]
    if hasattr(cfg, "validate"):
        cfg.validate()  # the values, not only the flags


def test_the_parser_check_catches_a_stale_command():
    """The check above fails for a command the CLI does not accept (the test can fail)."""
    stale = readme_commands("```bash\nspectra-lens observe --sequences 8 [--seq-len 64]\n```")
    assert stale == [["observe", "--sequences", "8", "--seq-len", "64"]]
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(stale[0])


# --------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, corpus glob): a tiny Llama (GQA) with a word tokenizer, and a corpus."""
    root = tmp_path_factory.mktemp("readme")
    tiny_hf_model("llama_gqa").save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "corpus").mkdir()
    return root / "model", word_corpus(root / "corpus", 12, 80)


def _small(argv: list[str], model: Path, corpus: str, out: Path) -> list[str]:
    """The README command on the tiny model at small sizes: flags it has are overridden (the
    last value of a flag wins), head labels are folded into the tiny model's 2 layers x 4 heads."""
    name = argv[0]
    fields = {f for f in cli.config_class(name).__dataclass_fields__}
    config = json.loads((model / "config.json").read_text())
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]

    def fold(word: str) -> str:
        m = re.fullmatch(r"L(\d+)H(\d+)(=.*)?", word)
        return f"L{int(m.group(1)) % n_layers}H{int(m.group(2)) % n_heads}{m.group(3) or ''}" if m else word

    argv = [fold(w) for w in argv]
    small = {"model": str(model), "corpus": corpus, "seq_len": "16", "n_sequences": "8",
             "shard_size": "4", "n_boot": "100", "fd_sequences": "2", "top_heads": "2",
             "n_repeated": "4", "half_len": "8", "window": "2", "max_new_tokens": "3",
             "device": "cpu"}
    extra = [x for k, v in small.items() if k in fields for x in (f"--{k.replace('_', '-')}", v)]
    if "images" in fields:
        extra.append("--no-images")
    if "out" in fields:
        extra += ["--out", str(out)]
    # a table the README passes by a relative name that this run has not written: left out
    for flag in ("--agreement", "--gain", "--types"):
        while flag in argv and not Path(argv[argv.index(flag) + 1]).exists():
            i = argv.index(flag)
            del argv[i: i + 2]
    return [*argv, *extra, "--no-progress"]


def _run(argv: list[str], capsys) -> str:
    status = cli.main(argv)
    printed = capsys.readouterr()
    assert status == 0, f"`spectra-lens {shlex.join(argv)}` exited {status}: {printed.err.strip()}"
    return printed.out


@pytest.mark.parametrize("name", ["observe", "generate", "head-types", "head"])
def test_cheap_readme_commands_run_on_a_tiny_model(name, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECTRA_NO_IMAGES", "1")
    model, corpus = tiny
    shown = [a for a in COMMANDS if a[0] == name]
    assert shown, f"the README shows no `spectra-lens {name}` command"
    for i, argv in enumerate(shown):
        out = tmp_path / f"run{i}"
        printed = _run(_small(argv, model, corpus, out), capsys)
        assert "{" not in printed.replace("{l}", "").replace("{h}", ""), printed  # no Python dict
        if name == "observe":  # then the report of the README over its results
            page = tmp_path / "report.html"
            _run(["report", str(tmp_path), "--out", str(page), "--no-progress"], capsys)
            assert page.stat().st_size > 0
