"""EXP2 (gain) in several processes: under torchrun (gloo, CPU) 2 processes write the tables of
1 process, a killed rank's parts (and only those) are redone by the rerun with 1 process, and
detached shares joined by `spectra-lens merge` give the same tables. In one process: a sweep
measured part by part, saved and loaded, is the sweep of all sequences.

The launches and the table comparison are in tests/runs/cli_processes.py.
"""

import subprocess
from pathlib import Path

import cli_processes as procs
import pandas as pd
import pytest
import torch
from spectra_lens.experiments import gain

from spectra_lens.config import GainConfig
from spectra_lens.errors import SpectraError
from spectra_lens.metrics import SWEEP_METRICS
from spectra_lens.runs.distributed import Group, Steps
from spectra_lens.sweep import HeadSweep, head_curves

TABLES = ("gain_summary", "gain_curves")
N_SEQUENCES, BATCH = 12, 2  # 6 parts: rank 0 takes parts 0, 2, 4 and rank 1 parts 1, 3, 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return procs.save_corpus(tmp_path_factory.mktemp("corpus"))


def _args(model_dir, corpus, out) -> list[str]:
    # --n-select 8: the selection holds 2 of the 6 documents (the control rule needs >= 2,
    # causal.MIN_SELECT_DOCUMENTS), the 12 measured sequences come from the other 4
    return ["gain", "--model", str(model_dir), "--corpus", corpus, "--out", str(out),
            "--seq-len", "24", "--n-sequences", str(N_SEQUENCES), "--n-select", "8",
            "--batch-size", str(BATCH), "--n-boot", "100", "--device", "cpu", "--no-images",
            "--no-progress"]


def _parts(out: Path) -> dict[str, tuple[int, int]]:
    """{part file: (inode, mtime_ns)}: a rewritten part (atomic rename) gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "parts").glob("part_*.npz"))}


@pytest.fixture(scope="module")
def single(model_dir, corpus, tmp_path_factory) -> Path:
    return procs.one_process_run(tmp_path_factory, lambda out: _args(model_dir, corpus, out))


def test_two_processes_give_the_gain_tables_of_one(model_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    procs.run(procs.torchrun(2, _args(model_dir, corpus, out)))
    procs.assert_same_tables(single, out, TABLES)
    assert sorted(_parts(out)) == [f"part_{i:05d}.npz" for i in range(N_SEQUENCES // BATCH)]
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["parts"]["processes"] == 2
    assert all(f"parts/part_{i:05d}.npz" in manifest["outputs"] for i in range(N_SEQUENCES // BATCH))


def test_when_rank_0_refuses_the_run_the_other_rank_stops_too(model_dir, corpus, single):
    """Rank 0 refuses --out (a finished run, no --overwrite): rank 1, waiting at the first
    checkpoint, learns it there and exits instead of waiting for the group's timeout."""
    before = (single / "manifest.json").read_text()
    proc = subprocess.run(procs.torchrun(2, _args(model_dir, corpus, single)), env=procs.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "already holds a finished gain run" in proc.stdout + proc.stderr
    assert (single / "manifest.json").read_text() == before


def test_steps_without_a_process_group():
    steps = Steps(Group(), 2)
    assert steps.step() and steps.step()
    with pytest.raises(SpectraError, match="more checkpoints"):
        steps.step()
    Steps(Group(), 2).abort()  # nothing to tell: a no-op


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find a rank's process")
def test_a_killed_rank_has_only_its_missing_parts_redone(model_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    # kill rank 1 as soon as it has written its first part: its later parts are left
    killed, returncode = procs.run_killing_rank(
        procs.torchrun(2, _args(model_dir, corpus, out)), 1,
        when=(out / "parts" / "part_00001.npz").exists, poll=0.001)
    assert killed and returncode != 0
    assert not (out / "gain_summary.csv").exists()
    before = _parts(out)
    all_parts = [f"part_{i:05d}.npz" for i in range(N_SEQUENCES // BATCH)]
    assert "part_00001.npz" in before and set(before) != set(all_parts)
    # The same command with one process finishes the run: only the missing parts are computed.
    procs.run(procs.torchrun(1, _args(model_dir, corpus, out)))
    after = _parts(out)
    assert sorted(after) == all_parts
    assert {name: after[name] for name in before} == before  # the parts written before: untouched
    procs.assert_same_tables(single, out, TABLES)


def test_detached_gain_shares_merged_give_the_tables_of_one_process(model_dir, corpus, single, tmp_path,
                                                                    monkeypatch):
    from spectra_lens.experiments import cli

    monkeypatch.setenv("SPECTRA_NO_IMAGES", "1")
    shares = [tmp_path / f"share_{i}" for i in range(2)]
    for i, share in enumerate(shares):  # each share as its own job would run it (here in this process)
        monkeypatch.setenv("SPECTRA_SHARD_RANK", str(i))
        monkeypatch.setenv("SPECTRA_SHARD_WORLD", "2")
        assert cli.main(_args(model_dir, corpus, share)) == 0
        assert not (share / "gain_summary.csv").exists()  # a share makes no tables
        assert sorted(_parts(share)) == [f"part_{j:05d}.npz" for j in range(i, N_SEQUENCES // BATCH, 2)]
    monkeypatch.delenv("SPECTRA_SHARD_RANK")
    monkeypatch.delenv("SPECTRA_SHARD_WORLD")
    # without share 1 its parts are missing: refused, naming them
    assert cli.main(["merge", str(shares[0]), "--out", str(tmp_path / "bad")]) == 2
    out = tmp_path / "merged"
    assert cli.main(["merge", *map(str, shares), "--out", str(out), "--no-progress"]) == 0
    procs.assert_same_tables(single, out, TABLES)
    s = pd.read_csv(out / "gain_summary.csv", keep_default_na=False)
    assert sorted(s["head_type"]) == sorted(["target", "control"] + [""] * (len(s) - 2))


# --------------------------------------------------------------------------- in one process


def test_a_sweep_measured_in_parts_is_the_sweep_of_all_sequences(tiny, tmp_path):
    model, _ = tiny("llama_gqa")
    toks = torch.randint(1, 97, (6, 12), generator=torch.Generator().manual_seed(3))
    cfg = GainConfig(alphas=(0.5, 1.0, 2.0), batch_size=2)
    whole = head_curves(model, toks, cfg.alphas, batch_size=2)
    gain.write_parts(cfg, model, toks, tmp_path, [2, 0, 1])
    joined = gain.read_parts(cfg, len(toks), gain.part_digests(cfg, toks), [tmp_path])
    for name in SWEEP_METRICS:  # the same forward batches: bit for bit
        assert torch.equal(joined.metrics.metric(name), whole.metrics.metric(name)), name
    assert torch.equal(joined.local_gain, whole.local_gain)
    assert (joined.alphas, joined.layers, joined.method) == (whole.alphas, whole.layers, whole.method)
    loaded = HeadSweep.load(tmp_path / gain.part_name(1))
    assert HeadSweep.read_meta(tmp_path / gain.part_name(1))["start"] == 2
    assert torch.equal(loaded.metrics.entropy, whole.metrics.entropy[:, 2:4])
    # a part of other tokens is not reused: reading it is refused, naming the part
    other = toks.clone()
    other[3, 5] = (other[3, 5] % 90) + 1
    with pytest.raises(SpectraError, match=r"parts \[1\] of 3 are missing"):
        gain.read_parts(cfg, len(other), gain.part_digests(cfg, other), [tmp_path])
    with pytest.raises(SpectraError, match="differ"):
        HeadSweep.concat([whole, head_curves(model, toks, (0.5, 1.0), batch_size=2)])
