"""Runs that cannot mix corpora, lose a record or hang, as a user meets them on the command line:
each case is repeated as a user would, and is refused (or recovered) with one line and exit 2,
with nothing mixed, lost or deleted.

The model is a tiny random-init Llama saved as a Hugging Face directory with an offline word-level
tokenizer, so every command runs end to end through `spectra-lens ...` in a second or two.
"""

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from cli_processes import manifest, one_error_line
from cli_processes import run_here as run

from spectra_lens.data.shards import read_manifest as read_shards
from spectra_lens.runs.rundir import LOCK, _Lock
from spectra_lens.stats.moments import DocumentMoments
from spectra_lens.testing import word_corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[str, str]:
    """Two different corpora of the same shape."""
    return (word_corpus(tmp_path_factory.mktemp("a"), 4, 300, seed=0),
            word_corpus(tmp_path_factory.mktemp("b"), 4, 300, seed=1))


@pytest.fixture(autouse=True)
def _no_images(monkeypatch):
    monkeypatch.setenv("SPECTRA_NO_IMAGES", "1")


def prepare(model_dir, corpus, out, *extra) -> list[str]:
    return ["prepare", "--model", str(model_dir), "--corpus", corpus, "--out", str(out),
            "--seq-len", "24", "--n-sequences", "8", "--shard-size", "2", *extra]


def observe(model_dir, corpus, out, *extra) -> list[str]:
    return ["observe", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out),
            "--seq-len", "24", "--n-sequences", "8", "--shard-size", "2", "--batch-size", "2",
            "--n-boot", "20", "--top-heads", "2", "--fd-sequences", "0", "--no-progress", *extra]


def snapshot(out) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}


def interrupt_after(monkeypatch, n_saves: int) -> None:
    """Ctrl-C arrives while the (n_saves + 1)-th moment file is being saved."""
    real, calls = DocumentMoments.save, []

    def save(self, path):
        calls.append(path)
        if len(calls) > n_saves:
            raise KeyboardInterrupt
        real(self, path)

    monkeypatch.setattr(DocumentMoments, "save", save)


# --------------------------------------------------------------------------- provenance


def test_a_resumed_observe_refuses_moments_of_re_prepared_shards(model_dir, corpora, tmp_path,
                                                                 capsys, monkeypatch):
    a, b = corpora
    shards, out = tmp_path / "shards", tmp_path / "run"
    assert run(prepare(model_dir, a, shards), capsys)[0] == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 4)  # each shard saves its counterfactual moments, then its moments
        assert run(observe(model_dir, shards, out), capsys)[0] == 130
    assert manifest(out)["status"] == "interrupted"
    done = sorted(p.name for p in (out / "moments").iterdir())
    assert done == ["counterfactual_00000.npz", "counterfactual_00001.npz", "shard_00000.npz", "shard_00001.npz"]
    old_sha = [s.sha256 for s in read_shards(shards).shards]
    assert DocumentMoments.load(out / "moments/shard_00000.npz").meta["shard_sha256"] == old_sha[0]

    assert run(prepare(model_dir, b, shards, "--overwrite"), capsys)[0] == 0
    assert [s.sha256 for s in read_shards(shards).shards][0] != old_sha[0]
    kept = {n: (out / "moments" / n).read_bytes() for n in done}
    for _ in range(2):  # refused, and refused again
        code, err = run(observe(model_dir, shards, out), capsys)
        line = one_error_line(err)
        # the first file the resume reads: the reference norm, estimated from the old shards
        assert code == 2 and "reference_norm.npz was computed from" in line, line
        assert "re-prepared" in line and "--overwrite" in line
        assert {n: (out / "moments" / n).read_bytes() for n in done} == kept  # nothing mixed
        assert sorted(p.name for p in (out / "moments").iterdir()) == done
        assert "head_summary.csv" not in manifest(out)["outputs"] or not (out / "head_summary.csv").exists()
        assert manifest(out)["status"] == "failed"
    # the user's way out: --overwrite computes every shard from the shards as they are now
    assert run(observe(model_dir, shards, out, "--overwrite"), capsys)[0] == 0
    now = read_shards(shards)
    assert manifest(out)["status"] == "complete" and manifest(out)["corpus"] == now.corpus
    for i, s in enumerate(now.shards):
        assert DocumentMoments.load(out / f"moments/shard_{i:05d}.npz").meta["shard_sha256"] == s.sha256


def test_merge_refuses_shares_of_re_prepared_shards_and_another_dtype(model_dir, corpora, tmp_path,
                                                                      capsys, monkeypatch):
    a, b = corpora
    shards = tmp_path / "shards"
    assert run(prepare(model_dir, a, shards), capsys)[0] == 0

    def share(rank, out, *extra):
        monkeypatch.setenv("SPECTRA_SHARD_RANK", str(rank))
        monkeypatch.setenv("SPECTRA_SHARD_WORLD", "2")
        try:
            return run(observe(model_dir, shards, out, *extra), capsys)[0]
        finally:
            monkeypatch.delenv("SPECTRA_SHARD_RANK")
            monkeypatch.delenv("SPECTRA_SHARD_WORLD")

    assert share(0, tmp_path / "s0") == 0
    assert share(1, tmp_path / "s1_half", "--dtype", "bfloat16") == 0
    for _ in range(2):
        code, err = run(["merge", str(tmp_path / "s0"), str(tmp_path / "s1_half"), "--out",
                         str(tmp_path / "m_dtype"), "--no-progress"], capsys)
        assert code == 2 and "dtype" in one_error_line(err)
        assert not (tmp_path / "m_dtype").exists()

    assert run(prepare(model_dir, b, shards, "--overwrite"), capsys)[0] == 0
    assert share(1, tmp_path / "s1") == 0  # captured from the new shards
    for _ in range(2):
        code, err = run(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                         str(tmp_path / "merged"), "--no-progress"], capsys)
        line = one_error_line(err)
        assert code == 2 and "captured shard 0 with sha256" in line and "re-prepared" in line, line
        assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------- kinds of directory


def test_prepare_refuses_a_run_directory_and_a_run_refuses_a_shard_directory(model_dir, corpora,
                                                                             tmp_path, capsys):
    a, b = corpora
    out = tmp_path / "run"
    assert run(observe(model_dir, a, out), capsys)[0] == 0
    before = snapshot(out)
    for extra in ((), ("--overwrite",), ("--overwrite",)):
        code, err = run(prepare(model_dir, b, out, *extra), capsys)
        assert code == 2 and "is a run directory" in one_error_line(err)
        assert snapshot(out) == before  # the run's manifest and outputs are untouched
    shards = tmp_path / "shards"
    assert run(prepare(model_dir, a, shards), capsys)[0] == 0
    before = snapshot(shards)
    for extra in ((), ("--overwrite",)):
        code, err = run(observe(model_dir, b, shards, *extra), capsys)
        assert code == 2 and "prepared shard directory" in one_error_line(err)
        assert snapshot(shards) == before


def test_prepare_takes_the_lock_of_its_directory(model_dir, corpora, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    holder = _Lock(shards)
    holder.acquire()
    try:
        for _ in range(2):
            code, err = run(prepare(model_dir, corpora[0], shards), capsys)
            assert code == 2 and "in use by another run" in one_error_line(err)
        assert sorted(p.name for p in shards.iterdir()) == [LOCK]
    finally:
        holder.release(remove=True)
    assert run(prepare(model_dir, corpora[0], shards), capsys)[0] == 0
    assert LOCK not in os.listdir(shards)  # a finished prepare leaves nothing to delete


def test_generate_csv_refuses_an_existing_file_unless_overwrite(model_dir, tmp_path, capsys):
    csv = tmp_path / "tokens.csv"
    csv.write_text("mine\n")
    argv = ["generate", "alpha beta gamma", "--model", str(model_dir), "--scale", "L0H0=2",
            "--max-new-tokens", "2", "--mode", "greedy", "--csv", str(csv)]
    for _ in range(2):
        code, err = run(argv, capsys)
        assert code == 2 and "already exists; pass --overwrite" in one_error_line(err)
        assert csv.read_text() == "mine\n"
    run_manifest = tmp_path / "manifest.json"
    run_manifest.write_text("{}")
    code, err = run([*argv[:-1], str(run_manifest), "--overwrite"], capsys)
    assert code == 2 and "never replaced" in one_error_line(err)
    assert run([*argv, "--overwrite"], capsys)[0] == 0
    assert csv.read_text().startswith("step") or "step" in csv.read_text().splitlines()[0]


# --------------------------------------------------------------------------- operating-system errors


def test_a_full_disk_while_saving_moments_is_one_line_and_the_run_is_failed(model_dir, corpora,
                                                                            tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "run"
    real = Path.write_bytes

    def full(self, data):  # the disk fills up once the reference norm is written, at the moments
        if self.suffix == ".npz" and self.parent.name == "moments":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    for _ in range(2):
        code, err = run(observe(model_dir, corpora[0], out), capsys)
        line = one_error_line(err)
        # the first moment file of a shard is its counterfactual one (collect saves it first)
        assert code == 2 and "No space left on device" in line and "moments/counterfactual_00000.npz" in line, line
        assert manifest(out)["status"] == "failed" and "No space left" in manifest(out)["error"]
        assert not (out / "moments").exists() or not any((out / "moments").iterdir())


_LIMITED = """
import resource, sys
from spectra_lens.experiments import cli
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no file-size limit here")
def test_a_file_size_limit_is_one_line_and_the_run_is_failed(model_dir, corpora, tmp_path):
    """EFBIG (a file larger than RLIMIT_FSIZE): the records file is larger than the limit, the
    manifest smaller."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "SPECTRA_NO_IMAGES": "1"}
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _LIMITED, str(48 * 1024),
                               *observe(model_dir, corpora[0], out)],
                              capture_output=True, text=True, env=env, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "File too large" in lines[0], lines[0]
        assert manifest(out)["status"] == "failed"


def test_an_unreachable_hugging_face_dataset_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for _ in range(2):
        code, err = run(prepare(model_dir, "hf:no-such-user/no-such-dataset", tmp_path / "s"), capsys)
        line = one_error_line(err)
        assert code == 2 and "cannot read the Hugging Face dataset" in line and "offline" in line, line
        assert len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------- permissions


def test_outputs_follow_the_umask(model_dir, corpora, tmp_path, capsys):
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert run(observe(model_dir, corpora[0], out), capsys)[0] == 0
        assert run(["report", str(out)], capsys)[0] == 0
    finally:
        os.umask(old)
    for name in ("moments/shard_00000.npz", "head_summary.csv", "manifest.json", "report.html"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
