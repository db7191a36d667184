"""Tests for spectra_lens.runs.rundir: the lock, atomic writes, the manifest and its outputs, and the
refuse / resume / replace rules."""

import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectra_lens.errors import SpectraError, run_command
from spectra_lens.io import atomic_write, is_temporary
from spectra_lens.runs.rundir import LOCK, RunDir, package_versions


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cfg:
    seq_len: int = 8
    out: str = "x"
    device: str | None = None
    overwrite: bool = False


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def no_temp_files(path: Path) -> bool:
    return not [p for p in path.rglob("*") if is_temporary(p.name) or p.name.startswith(".tmp-")]


def started(path, cfg=Cfg(), experiment="exp", **kw) -> RunDir:
    """A run that checked, locked and started (the lock stays held until close())."""
    rd = RunDir(path, experiment)
    rd.check(cfg, overwrite=kw.get("overwrite", False))
    rd.lock()
    rd.start(cfg, **kw)
    return rd


def finished(path, cfg=Cfg(), experiment="exp", files=("a.csv",), **kw) -> RunDir:
    rd = started(path, cfg, experiment, **kw)
    for name in files:
        rd.write_csv(name, pd.DataFrame({"x": [1]}))
    rd.finish()
    rd.close()
    return rd


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    assert atomic_write(target, lambda tmp: Path(tmp).write_text("one")) == target
    atomic_write(target, lambda tmp: Path(tmp).write_text("two"))
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.csv"
    target.write_text("old")

    def half(tmp):
        Path(tmp).write_text("half-written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_atomic_write_under_a_file_is_a_spectra_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpectraError, match="cannot write .*f/sub/a.txt"):
        atomic_write(tmp_path / "f" / "sub" / "a.txt", lambda tmp: Path(tmp).write_text("x"))


def test_a_run_lists_every_output_in_its_manifest_before_writing_it(tmp_path):
    rd = started(tmp_path / "run")
    m = manifest(rd.path)
    assert m["status"] == "running" and m["experiment"] == "exp" and m["outputs"] == []
    assert m["config"] == {"seq_len": 8, "out": "x", "device": None, "overwrite": False}
    assert {"python", "torch", "pandas", "transformer-lens"} <= set(m["versions"])
    path = rd.output("figures/a.html")
    assert not path.exists() and manifest(rd.path)["outputs"] == ["figures/a.html"]
    rd.write_csv("t.csv", pd.DataFrame({"x": [1]}))
    rd.timed("stage_s", 1.5)
    rd.timed("stage_s", 1.0)
    rd.finish(n_tokens=np.int64(7), where=Path("a/b"), shape=(1, 2))
    rd.close()
    m = manifest(rd.path)
    assert m["status"] == "complete" and m["outputs"] == ["figures/a.html", "t.csv"]
    assert m["timings"]["stage_s"] == 2.5 and "total_s" in m["timings"]
    assert (m["n_tokens"], m["where"], m["shape"]) == (7, "a/b", [1, 2])
    assert no_temp_files(rd.path)
    for bad in ("/etc/passwd", "../x.csv", "a/../../x", "manifest.json", LOCK):
        with pytest.raises(SpectraError):
            RunDir(rd.path, "exp").output(bad)


def test_no_manifest_before_start_and_a_failed_start_leaves_nothing(tmp_path):
    """Case 4: a start that fails before the model loads writes nothing at all."""
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError, match="model failed to load"):
        with RunDir(out, "exp") as rd:
            rd.check(Cfg())
            assert (out / LOCK).exists() and not (out / "manifest.json").exists()
            raise RuntimeError("model failed to load")
    assert not out.exists()
    existing = tmp_path / "empty"
    existing.mkdir()
    with pytest.raises(SpectraError):
        with RunDir(existing, "exp"):
            raise SpectraError("bad head")
    assert existing.is_dir() and not any(existing.iterdir())


def test_a_failure_after_start_marks_the_run_failed_and_a_corrected_rerun_replaces_it(tmp_path):
    """Case 4: the corrected command is accepted without --overwrite."""
    with pytest.raises(SpectraError, match=r"head 9\sout of range"):
        with RunDir(tmp_path, "exp") as rd:
            rd.start(Cfg(seq_len=8))
            rd.write_csv("old.csv", pd.DataFrame({"x": [1]}))
            raise SpectraError("head 9\nout of range")
    m = manifest(tmp_path)
    assert m["status"] == "failed" and m["error"] == "head 9 out of range"
    with RunDir(tmp_path, "exp") as rd:
        rd.check(Cfg(seq_len=9))
        assert rd.start(Cfg(seq_len=9)) is False
        assert not (tmp_path / "old.csv").exists()  # the failed run's outputs are gone
        rd.finish()
    assert manifest(tmp_path)["status"] == "complete"


def test_interrupt_marks_the_run_interrupted_and_it_resumes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunDir(tmp_path, "exp") as rd:
            rd.start(Cfg())
            rd.write_csv("records/shard_00000.csv", pd.DataFrame({"x": [1]}))
            raise KeyboardInterrupt
    assert manifest(tmp_path)["status"] == "interrupted"
    with RunDir(tmp_path, "exp") as rd:
        assert rd.start(Cfg()) is True
        assert (tmp_path / "records" / "shard_00000.csv").exists()
        assert rd.outputs == ["records/shard_00000.csv"]


def test_resume_ignores_fields_that_do_not_change_results_and_accumulates_timings(tmp_path):
    """Case 4 (a moved unfinished run resumes) and case 8 (timings cover every session)."""
    rd = started(tmp_path, Cfg(out="a", device="cpu"))
    rd.timed("capture_s", 2.0)
    rd._write_manifest("running")
    rd.close()
    first_total = manifest(tmp_path)["timings"]["total_s"]
    rd = started(tmp_path, Cfg(out="b", device="cuda", overwrite=False))
    assert rd.outputs == [] and rd._sessions == 2
    rd.timed("capture_s", 1.0)
    rd.finish()
    rd.close()
    m = manifest(tmp_path)
    assert m["timings"]["capture_s"] == 3.0 and m["timings"]["total_s"] >= first_total
    assert m["sessions"] == 2 and m["config"]["out"] == "b"


@pytest.mark.parametrize("experiment, config", [("exp", Cfg(seq_len=9)), ("other", Cfg())])
def test_refuses_an_unfinished_run_of_another_config_or_experiment(tmp_path, experiment, config):
    started(tmp_path).close()
    with pytest.raises(SpectraError, match="unfinished exp run .*seq_len=8 there, 9 now|unfinished exp run"):
        RunDir(tmp_path, experiment).check(config)
    assert manifest(tmp_path)["config"]["seq_len"] == 8  # untouched
    rd = started(tmp_path, config, experiment, overwrite=True)
    assert manifest(tmp_path)["experiment"] == experiment
    rd.close()


def test_refuses_a_finished_run_unless_overwrite(tmp_path):
    finished(tmp_path)
    for cfg in (Cfg(), Cfg(seq_len=9)):
        with pytest.raises(SpectraError, match="already holds a finished exp run.*--overwrite"):
            RunDir(tmp_path, "exp").check(cfg)
    assert manifest(tmp_path)["status"] == "complete"
    rd = started(tmp_path, overwrite=True)
    assert manifest(tmp_path)["status"] == "running" and not (tmp_path / "a.csv").exists()
    rd.close()


def test_finished_is_a_complete_run_of_the_same_experiment_and_config(tmp_path):
    """What the study reads back instead of running again: fields that do not change results aside."""
    assert not RunDir(tmp_path / "none", "exp").finished(Cfg())
    started(tmp_path / "running").close()
    assert not RunDir(tmp_path / "running", "exp").finished(Cfg())
    finished(tmp_path / "done")
    assert RunDir(tmp_path / "done", "exp").finished(Cfg())
    assert RunDir(tmp_path / "done", "exp").finished(Cfg(out="elsewhere", overwrite=True))
    assert not RunDir(tmp_path / "done", "exp").finished(Cfg(seq_len=9))
    assert not RunDir(tmp_path / "done", "other").finished(Cfg())


def test_overwrite_removes_only_the_listed_outputs(tmp_path):
    """Case 3: the previous run's CSVs and figures are gone before the new run writes."""
    finished(tmp_path, files=("q_L15_target.csv", "figures/L15.html", "records/shard_00000.csv"))
    (tmp_path / "figures" / "mine.txt").write_text("user file")
    own = f".spectra-lens-tmp-1-{'ab' * 16}.html"
    (tmp_path / "figures" / own).write_text("half-written by a killed run")
    # files of the user's that merely look temporary are not the run's: they stay
    users = (".tmp-1-abc.html", ".notes.tmp", ".spectra-lens-tmp-notes.html")
    for name in users:
        (tmp_path / "figures" / name).write_text("user file")
    rd = started(tmp_path, Cfg(seq_len=3), overwrite=True)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == sorted([LOCK, "figures", "figures/mine.txt", "manifest.json",
                           *(f"figures/{n}" for n in users)])
    rd.close()


def test_overwrite_never_follows_a_symbolic_link(tmp_path):
    """Case 2: a `records` symlink to a directory outside the run is refused, nothing deleted."""
    outside = tmp_path / "v"
    outside.mkdir()
    (outside / "shard_00000.parquet").write_text("precious")
    run = tmp_path / "o"
    finished(run, files=("records/shard_00000.parquet",))
    (run / "records" / "shard_00000.parquet").unlink()
    (run / "records").rmdir()
    (run / "records").symlink_to(outside)
    with RunDir(run, "exp") as rd:
        with pytest.raises(SpectraError, match="records is a symbolic link"):
            rd.start(Cfg(), overwrite=True)
    assert (outside / "shard_00000.parquet").read_text() == "precious"
    # Nor does a new run write through one.
    rd = started(tmp_path / "p")
    (tmp_path / "p" / "records").symlink_to(outside)
    with pytest.raises(SpectraError, match="symbolic link"):
        rd.write_csv("records/x.csv", pd.DataFrame({"x": [1]}))
    assert sorted(p.name for p in outside.iterdir()) == ["shard_00000.parquet"]
    rd.close()


def test_refuses_a_directory_that_is_not_a_run_even_with_overwrite(tmp_path):
    """Case 2: a directory that was never a run is never emptied."""
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "x.parquet").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(SpectraError, match="not a spectra_lens run directory.*not even with --overwrite"):
            RunDir(tmp_path, "exp").check(Cfg(), overwrite=overwrite)
    assert (tmp_path / "records" / "x.parquet").read_text() == "mine"
    assert not (tmp_path / "manifest.json").exists()


def test_refuses_files_broken_manifests_and_shard_directories(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpectraError, match="is a file"):
        RunDir(tmp_path / "f", "exp").check(Cfg())
    with pytest.raises(SpectraError, match="lies under .*f, which is a file"):
        RunDir(tmp_path / "f" / "run", "exp").check(Cfg())
    run = tmp_path / "run"
    run.mkdir()
    for text, match in (("{not json", "not valid JSON"), ("[1, 2]", "expected a run manifest"),
                        ('{"format": "spectra_lens.shards"}', "prepared shard directory"),
                        ('{"a": 1}', "not a spectra_lens run manifest")):
        (run / "manifest.json").write_text(text)
        for overwrite in (False, True):
            with pytest.raises(SpectraError, match=match):
                RunDir(run, "exp").check(Cfg(), overwrite=overwrite)
        assert (run / "manifest.json").read_text() == text


def test_unwritable_locations_are_spectra_errors(tmp_path):
    """Case 6: an out path that cannot be created is one clear error."""
    if os.path.isdir("/sys") and not os.access("/proc/sys", os.W_OK):
        with pytest.raises(SpectraError, match="cannot create the run directory /sys/spectra"):
            with RunDir("/sys/spectra-lens-test-run", "exp"):
                pass
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(SpectraError, match="permission denied"):
                RunDir(ro / "run", "exp").check(Cfg())
        finally:
            ro.chmod(0o700)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    rd = started(tmp_path)
    with pytest.raises(SpectraError, match=rf"in use by another run \(pid {os.getpid()} on host "
                                           rf"{socket.gethostname()}, started 20"):
        with RunDir(tmp_path, "exp"):
            pass
    rd.close()
    with RunDir(tmp_path, "exp") as again:
        assert again.start(Cfg()) is True


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pandas as pd
    from spectra_lens.errors import run_command
    from spectra_lens.runs.rundir import RunDir

    def main(argv):
        out, go, hold = argv
        while not Path(go).exists():
            time.sleep(0.01)
        rd = RunDir(out, "exp")
        rd.check({"seq_len": 8})
        with rd:
            rd.start({"seq_len": 8})
            print("running", flush=True)
            for i in range(3):
                rd.write_csv(f"records/{i}.csv", pd.DataFrame({"writer": [sys.argv[0]]}))
                time.sleep(float(hold))
            rd.finish()
        return 0

    sys.exit(run_command(main, sys.argv[1:]))
""")


def test_two_processes_on_one_run_directory(tmp_path):
    """Case 1: exactly one of two simultaneous starts runs; the other exits 2 naming the holder.
    A killed holder's lock is taken over by the next start."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    out, go = tmp_path / "run", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(go), "0.5"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(0.5)
    go.write_text("")
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    winner = next(p for p, r in zip(procs, results) if r[0] == 0)
    refused = next(r for r in results if r[0] == 2)
    assert refused[2].count("\n") == 1 and "Traceback" not in refused[2]
    assert f"in use by another run (pid {winner.pid} on host {socket.gethostname()}" in refused[2]
    assert manifest(out)["status"] == "complete" and len(manifest(out)["outputs"]) == 3

    # A holder killed with SIGKILL cannot clean up; the kernel drops its flock.
    killed = tmp_path / "killed"
    holder = subprocess.Popen([sys.executable, str(script), str(killed), str(go), "60"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "running"
    assert f'"pid": {holder.pid}' in (killed / LOCK).read_text()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert manifest(killed)["status"] == "running"  # it never finished
    with RunDir(killed, "exp") as rd:
        assert rd.start({"seq_len": 8}) is True  # the same config resumes
        assert f'"pid": {os.getpid()}' in (killed / LOCK).read_text()


def test_run_command_prints_one_line_and_sets_the_exit_status(capsys):
    def user_error(argv):
        raise SpectraError("bad\nthing")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_command(user_error, []) == 2
    assert capsys.readouterr().err == "error: bad thing\n"
    assert run_command(interrupted, []) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err
    assert run_command(lambda argv: None, []) == 0


def test_table_writers_round_trip(tmp_path):
    rd = started(tmp_path)
    frame = pd.DataFrame({"layer": [0, 1], "r": [0.5, -0.25], "significant": [True, False]})
    pd.testing.assert_frame_equal(pd.read_csv(rd.write_csv("t.csv", frame)), frame)
    pd.testing.assert_frame_equal(pd.read_parquet(rd.write_parquet("r/t.parquet", frame)), frame)
    assert json.loads(rd.write_json("x.json", {"a": np.float32(0.5)}).read_text()) == {"a": 0.5}
    assert no_temp_files(tmp_path)
    rd.close()


def test_package_versions_names_python_and_the_stack():
    versions = package_versions()
    assert versions["python"].count(".") == 2
    assert versions["torch"] != "not installed" and versions["pandas"] != "not installed"


@pytest.mark.parametrize("edit", ["rm", "sed -i", "truncate"])
def test_the_lock_cannot_be_taken_by_removing_or_replacing_its_file(tmp_path, edit):
    """The lock is the directory's: removing or rewriting the holder file lets no one in."""
    rd = started(tmp_path)
    lock = tmp_path / LOCK
    if edit == "rm":
        lock.unlink()
    elif edit == "sed -i":  # a new file renamed onto the old name: a new inode
        replacement = tmp_path / "edited"
        replacement.write_text(lock.read_text().replace(str(os.getpid()), "1"))
        os.replace(replacement, lock)
    else:
        lock.write_text("")
    for _ in range(2):  # as a user would: try, then try again
        with pytest.raises(SpectraError, match="in use by another run"):
            with RunDir(tmp_path, "exp"):
                pass
    assert manifest(tmp_path)["status"] == "running"
    rd.finish()
    rd.close()
    assert not lock.exists() or edit != "rm"  # the holder removes only its own description
    with RunDir(tmp_path, "exp") as again:  # released: the next run gets in
        with pytest.raises(SpectraError, match="already holds a finished"):
            again.start(Cfg())
    assert not (tmp_path / LOCK).exists()  # a finished run leaves nothing to delete
