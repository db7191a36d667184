"""What the command line says when something is wrong: one line, a "did you mean" for a
mistyped flag or command, flags (not Python fields) in messages, one-line warnings, and head
ranges checked before any weights load."""

import os
import sys
import warnings

import pytest
from spectra_lens.experiments import cli

from spectra_lens import config
from spectra_lens import models as M
from spectra_lens.errors import SpectraError


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_mistyped_flag_gets_one_line_and_a_suggestion(capsys):
    assert cli.main(["observe", "--n-sequencs", "8"]) == 2
    line = _one_error(capsys)
    assert line.startswith("spectra-lens observe: error: unrecognized argument")
    assert "did you mean --n-sequences?" in line
    assert cli.main(["generate", "hi", "--max-tokens", "3"]) == 2
    assert "did you mean --max-new-tokens?" in _one_error(capsys)


def test_a_mistyped_command_gets_one_line_and_a_suggestion(capsys):
    assert cli.main(["obsrve"]) == 2
    line = _one_error(capsys)
    assert "unknown command 'obsrve'; did you mean observe?" in line
    assert cli.main(["head-type"]) == 2
    assert "did you mean head-types?" in _one_error(capsys)


@pytest.mark.parametrize("argv", [["head"], ["observe", "--n-sequences", "x"],
                                  ["generate", "hi", "--kind", "z"], []])
def test_usage_errors_are_one_line(argv, capsys):
    assert cli.main(argv) == 2
    assert "error:" in _one_error(capsys)


def test_messages_name_flags_not_fields():
    cls = config.ObservationalConfig
    assert cli.flag_names("n_sequences must be >= 2, got 1", cls) == "--n-sequences must be >= 2, got 1"
    assert cli.flag_names("out holds a run; pass overwrite=True to replace it", cls) == \
        "out holds a run; pass --overwrite to replace it"
    assert cli.flag_names("images='svg,jpg' is not a format", cls) == "--images svg,jpg is not a format"
    assert cli.flag_names("use a shorter seq_len", cls) == "use a shorter --seq-len"
    # column names, paths and words that are no field stay as they are
    assert cli.flag_names("n_sequences_fd of /a/seq_len/x; layer must be", cls) == \
        "n_sequences_fd of /a/seq_len/x; layer must be"
    # the head page's head is a positional argument, not a flag
    assert cli.flag_names("head must be", config.HeadPageConfig) == "head must be"


def test_config_errors_name_the_flag(tmp_path, capsys):
    assert cli.main(["observe", "--n-sequences", "1", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert _one_error(capsys).startswith("error: --n-sequences must be >= 2")


def test_warnings_print_as_one_line_and_the_formatter_is_restored(tmp_path, monkeypatch, capsys):
    def warn(cfg):
        warnings.warn("two\n  lines", UserWarning, stacklevel=1)
        raise SpectraError("the run stops here")

    monkeypatch.setattr(cli, "check_heads_early", warn)
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # what Python's own printer does (pytest records warnings in its place)
        monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno,
                            file=None, line=None: sys.stderr.write(
                                warnings.formatwarning(message, category, filename, lineno, line)))
        assert cli.main(["observe", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "warning: two lines" and err[1] == "error: the run stops here", err
    assert len(err) == 2
    assert warnings.formatwarning is before


def test_descriptions_are_not_indented(capsys):
    assert cli.main(["generate", "--help"]) == 0
    page = capsys.readouterr().out
    description = page.split("\n\n")[1].splitlines()
    assert len(description) > 1 and not any(line.startswith(" ") for line in description)
    assert "manifest" not in page.split("--seed N", 1)[1].split("--", 1)[0]


def test_third_party_bars_are_off_while_a_command_runs(monkeypatch):
    for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(k, raising=False)
    with cli.quiet_third_party(progress=True):
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert "TQDM_DISABLE" not in os.environ
    with cli.quiet_third_party(progress=False):
        assert os.environ["TQDM_DISABLE"] == "1"
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and "TQDM_DISABLE" not in os.environ


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the range check")

    monkeypatch.setattr(M, "load_model", refuse)
    monkeypatch.setattr(M, "load_hf", refuse)


@pytest.mark.parametrize("argv, says", [
    (["head", "L99H0"], "L99H0: no layer 99 in SmolLM2-135M-Instruct, which has 30 layers"),
    (["head", "L3H9"], "L3H9: no head 9 in SmolLM2-135M-Instruct, which has 9 heads per layer"),
    (["generate", "hi", "--scale", "L1H1=2", "L30H0=2"], "--scale L30H0=2: no layer 30"),
    (["intervene", "--target-layer", "31", "--target-head", "0"], "--target-layer/--target-head: no layer 31"),
    (["qk-control", "--target-layer", "3", "--target-head", "12"], "no head 12"),
])
def test_head_ranges_are_checked_before_loading(argv, says, no_loading, tmp_path, capsys):
    out = [] if argv[0] == "generate" else ["--out", str(tmp_path / "o")]
    assert cli.main([*argv, *out, "--no-progress"]) == 2
    assert says in _one_error(capsys)


def test_model_shape_reads_a_local_config(tmp_path):
    from spectra_lens.testing import tiny_hf_model

    tiny_hf_model("gpt2").config.save_pretrained(tmp_path)  # config.json only, no weights
    n_layers, n_heads = M.model_shape(str(tmp_path))
    assert (n_layers, n_heads) == (tiny_hf_model("gpt2").config.n_layer, tiny_hf_model("gpt2").config.n_head)
    with pytest.raises(M.SpectraError, match=f"no layer {n_layers} "):
        M.check_heads(str(tmp_path), [("L", n_layers, 0)])
    M.check_heads(str(tmp_path), [("L", n_layers - 1, n_heads - 1)])
    assert M.model_shape(str(tmp_path / "missing")) is None  # no config at hand: no check
    M.check_heads(str(tmp_path / "missing"), [("L", 99, 99)])


def _screen(err: str) -> list[str]:
    """What a terminal shows of `err`: each line as its last carriage-return segment."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n")]


def test_a_warning_during_a_live_bar_is_one_line_above_it(tmp_path, monkeypatch, capsys):
    """A warning while a bar is drawn clears the bar, prints its one line and draws the bar
    again, instead of being written into the middle of the bar's line."""
    from spectra_lens.present import display

    def work(cfg):
        bar = display.progress_bar(total=2, desc="work", unit="step", tick=None)
        bar.update(1)
        warnings.warn("two\n  lines", UserWarning, stacklevel=1)
        bar.update(1)
        bar.close()
        raise SpectraError("the run stops here")

    monkeypatch.setattr(cli, "check_heads_early", work)
    before = warnings.formatwarning, warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["observe", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.split("\n") if "two" in line]
    assert len(said) == 1 and said[0].rsplit("\r", 1)[-1] == "warning: two lines", repr(err)
    screen = [line for line in _screen(err) if line.strip()]
    assert screen[-2].startswith("work: 100%") and screen[-1] == "error: the run stops here", screen
    assert (warnings.formatwarning, warnings.showwarning) == before


def test_log_records_are_written_above_a_live_bar(capsys):
    import logging

    from spectra_lens.present import display

    handler = cli._BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    bar = display.progress_bar(total=1, desc="work", tick=None)
    handler.emit(logging.LogRecord("spectra_lens.x", logging.WARNING, __file__, 1, "shards differ",
                                   None, None))
    bar.close()
    err = capsys.readouterr().err
    said = [line for line in err.split("\n") if "shards differ" in line]
    assert [line.rsplit("\r", 1)[-1] for line in said] == ["WARNING spectra_lens.x: shards differ"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(model directory, corpus glob) of a tiny Llama (GQA) with a word tokenizer."""
    from spectra_lens.testing import tiny_hf_model, word_corpus, word_tokenizer

    root = tmp_path_factory.mktemp("bars")
    tiny_hf_model("llama_gqa").save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "corpus").mkdir()
    return root / "model", word_corpus(root / "corpus", 8, 60)


def test_every_step_of_observe_shows_a_bar_and_no_progress_shows_none(tiny_run, tmp_path,
                                                                        monkeypatch, capsys):
    """observe's steps each have a bar (the load's last stage is the layout probe, then the
    reference norm, the capture, the statistics, the outputs); --no-progress prints none of
    them, only the warnings."""
    monkeypatch.setenv("SPECTRA_NO_IMAGES", "1")
    model, corpus = tiny_run
    argv = ["observe", "--model", str(model), "--corpus", corpus, "--seq-len", "16",
            "--n-sequences", "8", "--shard-size", "4", "--n-boot", "50", "--fd-sequences", "2",
            "--no-images", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(tmp_path / "bars")]) == 0
    err = capsys.readouterr().err
    screen = _screen(err)
    bars = (f"load {model}", "reference norm", "capture", "α-curves", "statistics", "write outputs")
    for desc in bars:
        assert any(line.startswith(desc) and "100%" in line for line in screen), (desc, screen)
    assert "attention layout probe" in err  # the load's last stage
    # on screen: bars, one-line warnings, the import note; nothing torn
    said = ("warning: ", "observe: importing", *bars)
    assert all(line.startswith(said) for line in screen if line), screen

    assert cli.main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err, err
    assert all(line.startswith("warning: ") for line in err.splitlines()), err
