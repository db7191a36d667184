"""Tests for spectra_lens.runs: atomic writes, the run manifest, the refuse / resume rule."""

import dataclasses
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectra_lens.errors import SpectraError
from spectra_lens.runs import RunDir, atomic_write, package_versions


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cfg:
    seq_len: int = 8
    out: str = "x"
    overwrite: bool = False


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def no_temp_files(path: Path) -> bool:
    return not [p for p in path.rglob("*") if p.name.startswith(".tmp-")]


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


def test_new_run_writes_a_running_manifest_then_complete(tmp_path):
    rd = RunDir(tmp_path / "run", "exp")
    assert rd.start(Cfg(), resumable_keys=("overwrite",)) is False
    m = manifest(rd.path)
    assert m["status"] == "running" and m["experiment"] == "exp"
    assert m["config"] == {"seq_len": 8, "out": "x", "overwrite": False}
    assert {"python", "torch", "pandas", "transformer-lens"} <= set(m["versions"])
    rd.timed("stage_s", 1.5)
    rd.timed("stage_s", 1.0)
    rd.finish(n_tokens=np.int64(7), where=Path("a/b"), shape=(1, 2))
    m = manifest(rd.path)
    assert m["status"] == "complete"
    assert m["timings"]["stage_s"] == 2.5 and "total_s" in m["timings"]
    assert (m["n_tokens"], m["where"], m["shape"]) == (7, "a/b", [1, 2])
    assert no_temp_files(rd.path)


def test_refuses_a_non_empty_directory_without_manifest(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SpectraError, match="not empty and has no manifest.json"):
        RunDir(tmp_path, "exp").start(Cfg())
    assert not (tmp_path / "manifest.json").exists()
    assert RunDir(tmp_path, "exp").start(Cfg(), overwrite=True) is False
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_refuses_a_file_and_a_broken_manifest(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpectraError, match="is a file"):
        RunDir(tmp_path / "f", "exp").start(Cfg())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(SpectraError, match="not valid JSON"):
        RunDir(tmp_path / "run", "exp").start(Cfg())
    (tmp_path / "run" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(SpectraError, match="expected a run manifest"):
        RunDir(tmp_path / "run", "exp").start(Cfg())


def test_resumes_an_unfinished_run_of_the_same_config(tmp_path):
    RunDir(tmp_path, "exp").start(Cfg(), resumable_keys=("overwrite",))
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "shard_00000.parquet").write_text("kept")
    assert RunDir(tmp_path, "exp").start(Cfg(), resumable_keys=("overwrite",)) is True
    # The resumable key may differ, and then an overwrite starts afresh instead of resuming.
    assert RunDir(tmp_path, "exp").start(Cfg(overwrite=True), overwrite=True,
                                         resumable_keys=("overwrite",)) is False
    assert (tmp_path / "records" / "shard_00000.parquet").read_text() == "kept"


@pytest.mark.parametrize("experiment, config", [("exp", Cfg(seq_len=9)), ("other", Cfg())])
def test_refuses_an_unfinished_run_of_another_config_or_experiment(tmp_path, experiment, config):
    RunDir(tmp_path, "exp").start(Cfg())
    with pytest.raises(SpectraError, match="unfinished run with a different experiment or config"):
        RunDir(tmp_path, experiment).start(config)
    assert manifest(tmp_path)["config"]["seq_len"] == 8  # untouched
    assert RunDir(tmp_path, experiment).start(config, overwrite=True) is False
    assert manifest(tmp_path)["experiment"] == experiment


def test_refuses_a_finished_run_unless_overwrite(tmp_path):
    rd = RunDir(tmp_path, "exp")
    rd.start(Cfg())
    rd.finish()
    for cfg in (Cfg(), Cfg(seq_len=9)):
        with pytest.raises(SpectraError, match="already holds a finished exp run.*--overwrite"):
            RunDir(tmp_path, "exp").start(cfg)
    assert manifest(tmp_path)["status"] == "complete"
    assert RunDir(tmp_path, "exp").start(Cfg(), overwrite=True) is False
    assert manifest(tmp_path)["status"] == "running"


def test_table_writers_round_trip(tmp_path):
    rd = RunDir(tmp_path, "exp")
    frame = pd.DataFrame({"layer": [0, 1], "r": [0.5, -0.25], "significant": [True, False]})
    pd.testing.assert_frame_equal(pd.read_csv(rd.write_csv("t.csv", frame)), frame)
    pd.testing.assert_frame_equal(pd.read_parquet(rd.write_parquet("r/t.parquet", frame)), frame)
    assert json.loads(rd.write_json("x.json", {"a": np.float32(0.5)}).read_text()) == {"a": 0.5}
    assert no_temp_files(tmp_path)


def test_package_versions_names_python_and_the_stack():
    versions = package_versions()
    assert versions["python"].count(".") == 2
    assert versions["torch"] != "not installed" and versions["pandas"] != "not installed"
