"""The command line as a user meets it (issue 11): runs that cannot mix, lose or delete data, and
one clear line for every user error. Each test names the numbered case it reproduces.

The model is a tiny random-init Llama saved as a Hugging Face directory with an offline word-level
tokenizer, so every command runs end to end through `spectra-lens ...` in a second or two.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_processes import manifest, one_error_line
from cli_processes import run_here as run

from spectra_lens.runs.rundir import LOCK, RunDir
from spectra_lens.testing import tiny_hf_model, word_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    # 8 documents: intervene holds out 2 to choose heads and measures 4 others
    # (causal.MIN_SELECT_DOCUMENTS, causal.MIN_MEASURE_DOCUMENTS)
    return word_corpus(tmp_path_factory.mktemp("corpus"), 8, 300)


def observe(model_dir, corpus, out, *extra) -> list[str]:
    return ["observe", "--model", str(model_dir), "--corpus", corpus, "--out", str(out),
            "--seq-len", "24", "--n-sequences", "8", "--shard-size", "4", "--batch-size", "4",
            "--n-boot", "50", "--top-heads", "2", "--records", "--no-progress", *extra]


def intervene(model_dir, corpus, out, *extra) -> list[str]:
    return ["intervene", "--model", str(model_dir), "--corpus", corpus, "--out", str(out),
            "--seq-len", "16", "--n-sequences", "4", "--n-select", "2", "--alphas", "0.5,1,2",
            # 4 measured sequences, one from each of 4 documents; a named control: 2 selection
            # sequences cannot give the r-based rule a finite interval
            "--control-layer", "0", "--control-head", "2", "--no-progress", *extra]


def files_in(out) -> set[str]:
    return {p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- case 1


def test_case1_a_second_writer_is_refused_and_the_first_run_is_untouched(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "D"
    holder = RunDir(out, "observational")
    holder.lock()  # a run in progress in this directory
    try:
        code, err = run(observe(model_dir, corpus, out, "--overwrite", "--seq-len", "48"), capsys)
        assert code == 2
        line = one_error_line(err)
        assert f"in use by another run (pid {os.getpid()} on host {socket.gethostname()}, started" in line
        assert files_in(out) == {LOCK}  # nothing deleted, nothing written
    finally:
        holder.close()
    assert run(observe(model_dir, corpus, out), capsys)[0] == 0
    assert manifest(out)["status"] == "complete"


# --------------------------------------------------------------------------- case 2


def test_case2_overwrite_never_deletes_through_a_symlink_or_outside_a_run(model_dir, corpus, tmp_path, capsys):
    outside = tmp_path / "v"
    outside.mkdir()
    (outside / "x.parquet").write_text("precious")
    o = tmp_path / "o"
    o.mkdir()
    (o / "records").symlink_to(outside)
    code, err = run(observe(model_dir, corpus, o, "--overwrite"), capsys)
    assert code == 2 and "not a spectra_lens run directory" in one_error_line(err)
    assert (outside / "x.parquet").read_text() == "precious"

    # A finished run whose records/ was replaced by a link: --overwrite refuses, deletes nothing.
    run_dir = tmp_path / "run"
    assert run(observe(model_dir, corpus, run_dir), capsys)[0] == 0
    for p in (run_dir / "records").iterdir():
        p.unlink()
    (run_dir / "records").rmdir()
    (run_dir / "records").symlink_to(outside)
    before = files_in(run_dir)
    code, err = run(observe(model_dir, corpus, run_dir, "--overwrite"), capsys)
    assert code == 2 and "records is a symbolic link" in one_error_line(err)
    assert (outside / "x.parquet").read_text() == "precious" and files_in(run_dir) == before


# --------------------------------------------------------------------------- case 3


def test_case3_overwrite_of_a_causal_run_leaves_only_the_new_outputs(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "int"
    assert run(intervene(model_dir, corpus, out, "--target-layer", "1", "--target-head", "0"), capsys)[0] == 0
    first = files_in(out)
    assert any("_L1_H0_" in f for f in first)
    assert run(intervene(model_dir, corpus, out, "--target-layer", "0", "--target-head", "1",
                         "--overwrite"), capsys)[0] == 0
    m = manifest(out)
    listed = {o for o in m["outputs"] if (out / o).exists()} | {"manifest.json"}
    assert files_in(out) == listed  # every file there is the new run's, and listed
    assert not any("_L1_H0_" in f for f in files_in(out)), files_in(out)


# --------------------------------------------------------------------------- case 4


@pytest.mark.parametrize("bad, match", [
    (["--model", "/nonexistent/model"], "no such directory"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--target-head", "7"], "--target-head: no head 7"),
    (["--target-layer", "1", "--target-head", "0", "--control-layer", "1", "--control-head", "0"],
     "control head must differ"),
    (["--corpus", "/nonexistent/corpus.txt"], "not found"),
    (["--seq-len", "500"], "exceed the model's context of 128"),
])
def test_case4_a_failed_start_writes_nothing_and_the_corrected_command_runs(
        model_dir, corpus, tmp_path, capsys, bad, match):
    if "cuda" in bad and __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "run"
    code, err = run(intervene(model_dir, corpus, out) + bad, capsys)
    assert code == 2 and match in one_error_line(err)
    assert not out.exists()
    assert run(intervene(model_dir, corpus, out), capsys)[0] == 0
    assert manifest(out)["status"] == "complete"


def test_case4_a_moved_unfinished_run_resumes(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "a"
    assert run(observe(model_dir, corpus, out), capsys)[0] == 0
    m = manifest(out)
    m["status"] = "interrupted"  # as a run killed during its figures leaves it
    (out / "manifest.json").write_text(json.dumps(m))
    moved = tmp_path / "b"
    out.rename(moved)
    assert run(observe(model_dir, corpus, moved, "--device", "cpu"), capsys)[0] == 0
    m = manifest(moved)
    assert m["status"] == "complete" and m["resumed"] is True and m["sessions"] == 2


# --------------------------------------------------------------------------- case 6


def test_case6_environment_errors_are_one_line(model_dir, corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run(observe(model_dir, corpus, tmp_path / "file" / "run"), capsys)
    assert code == 2 and "which is a file" in one_error_line(err)
    if os.path.isdir("/sys") and not os.access("/proc/sys", os.W_OK):
        code, err = run(observe(model_dir, corpus, "/sys/spectra-lens-run"), capsys)
        assert code == 2 and "cannot create the run directory" in one_error_line(err)
    code, err = run(observe(model_dir, corpus, tmp_path / "r", "--device", "meta"), capsys)
    assert code == 2 and "device" in one_error_line(err)


def test_case6_model_folders_that_cannot_load_are_one_line(model_dir, corpus, tmp_path, capsys):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    config = json.loads((model_dir / "config.json").read_text()) | {"model_type": "no_such_model"}
    (unknown / "config.json").write_text(json.dumps(config))
    code, err = run(observe(unknown, corpus, tmp_path / "r"), capsys)
    assert code == 2 and "no_such_model" in one_error_line(err)
    assert not (tmp_path / "r").exists()
    no_tok = tmp_path / "no_tok"
    tiny_hf_model("llama_gqa").save_pretrained(no_tok)
    code, err = run(["prepare", "--model", str(no_tok), "--corpus", corpus, "--out",
                     str(tmp_path / "shards")], capsys)
    assert code == 2 and "tokenizer" in one_error_line(err)


def test_case6_report_on_a_read_only_run_directory(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(observe(model_dir, corpus, out), capsys)[0] == 0
    code, err = run(["report", str(out), "--out", str(tmp_path / "run" / "manifest.json" / "r.html")], capsys)
    assert code == 2 and "cannot write" in one_error_line(err)
    if os.geteuid() != 0:
        out.chmod(0o500)
        try:
            code, err = run(["report", str(out)], capsys)
            assert code == 2 and "cannot write" in one_error_line(err)
        finally:
            out.chmod(0o700)


def test_case6_ctrl_c_prints_one_line_and_exits_130(model_dir, corpus, tmp_path):
    out = tmp_path / "run"
    argv = observe(model_dir, corpus, out)
    argv[argv.index("--n-sequences") + 1] = "48"
    argv[argv.index("--shard-size") + 1] = "1"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "spectra_lens.experiments.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell that starts pytest in the background ignores SIGINT, and
                            # the child would inherit that: the signal would do nothing
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "records").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    assert manifest(out)["status"] == "interrupted"


# --------------------------------------------------------------------------- case 7


def test_case7_meaningless_inputs_are_refused_before_anything_is_written(model_dir, corpus, tmp_path, capsys):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\0" * 5000)
    code, err = run(observe(model_dir, str(nul), tmp_path / "a"), capsys)
    assert code == 2 and "control characters" in one_error_line(err)
    code, err = run(observe(model_dir, corpus, tmp_path / "b", "--n-sequences", "1"), capsys)
    assert code == 2 and "--n-sequences" in one_error_line(err) and not (tmp_path / "b").exists()
    code, err = run(intervene(model_dir, corpus, tmp_path / "c", "--alphas", "1e-46,1,2"), capsys)
    assert code == 2 and "float32" in one_error_line(err) and not (tmp_path / "c").exists()

    shards = tmp_path / "shards"
    assert run(["prepare", "--model", str(model_dir), "--corpus", corpus, "--out", str(shards),
                "--seq-len", "24", "--n-sequences", "8", "--shard-size", "4"], capsys)[0] == 0
    before = (shards / "manifest.json").read_bytes()
    code, err = run(observe(model_dir, str(shards), shards, "--overwrite"), capsys)
    assert code == 2 and "which this run reads" in one_error_line(err)
    assert (shards / "manifest.json").read_bytes() == before


# --------------------------------------------------------------------------- case 8


def test_case8_messages(tmp_path, capsys, model_dir, corpus):
    code, err = run(observe(model_dir, corpus, tmp_path / "a", "--consistency-threshold", "1.5"), capsys)
    assert code == 2 and "(0, 1]" in one_error_line(err)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "unterminated}\n')
    code, err = run(observe(model_dir, str(bad), tmp_path / "b"), capsys)
    line = one_error_line(err)
    assert code == 2 and "at at" not in line and "bad.jsonl:1" in line
