"""Several devices and processes: an explicit device map gives the metrics of no map; the
observational run under torchrun (gloo, CPU): 2 processes give the tables of 1 process, a
killed rank's shards are redone by the rerun, and the same command runs with 1 process.

The launches and the table comparison are in tests/runs/cli_processes.py.
"""

import dataclasses
import json
import subprocess
from pathlib import Path

import cli_processes as procs
import pytest
import torch

from spectra_lens.capture import METRIC_NAMES, capture_metrics
from spectra_lens.errors import SpectraError
from spectra_lens.models import load_model, parse_device_map
from spectra_lens.reference import ReferenceNorm
from spectra_lens.runs.distributed import Group, shard_indices

TABLES = ("head_summary", "layer_statistics", "significant_heads", "consistent_heads")


def test_shard_indices_are_a_partition():
    for world in (1, 2, 3, 5):
        got = sorted(i for r in range(world) for i in shard_indices(11, r, world))
        assert got == list(range(11))
    with pytest.raises(SpectraError, match="rank must be in"):
        shard_indices(4, 2, 2)


def test_single_process_group_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    g = Group.from_env()
    assert (g.rank, g.world, g.is_main, g.distributed) == (0, 1, True, False)
    assert g.shards(3) == [0, 1, 2]
    g.barrier()  # a no-op
    g.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return procs.save_corpus(tmp_path_factory.mktemp("corpus"))


def test_an_explicit_device_map_across_layers_gives_the_metrics_of_no_map(model_dir):
    """Every module placed by name (here all on the CPU, the only device of the test machine):
    loading goes through accelerate's device map, hooks and metrics run where each layer is."""
    plain = load_model(model_dir)
    layout_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    import json

    mapped = load_model(model_dir, device_map=json.dumps(layout_map))
    tokens = torch.randint(3, 60, (2, 20), generator=torch.Generator().manual_seed(0))
    a, b = capture_metrics(plain, tokens), capture_metrics(mapped, tokens)
    for name in METRIC_NAMES:
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0, equal_nan=True)
    assert parse_device_map("auto") == "auto"
    with pytest.raises(SpectraError, match="device_map must be"):
        parse_device_map("everywhere")


def _args(model_dir, corpus, out) -> list[str]:
    return ["observe", "--model", str(model_dir), "--corpus", corpus, "--out", str(out),
            "--seq-len", "24", "--n-sequences", "16", "--shard-size", "2", "--batch-size", "2",
            "--n-boot", "50", "--top-heads", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def single(model_dir, corpus, tmp_path_factory) -> Path:
    return procs.one_process_run(tmp_path_factory, lambda out: _args(model_dir, corpus, out))


def test_two_processes_give_the_tables_of_one(model_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    procs.run(procs.torchrun(2, _args(model_dir, corpus, out)))
    procs.assert_same_tables(single, out, TABLES)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find a rank's process")
def test_a_killed_rank_is_redone_on_resume_with_one_process(model_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    # kill rank 1 as soon as it exists: its shards are left to the rerun
    killed, returncode = procs.run_killing_rank(procs.torchrun(2, _args(model_dir, corpus, out)), 1)
    assert killed and returncode != 0
    assert not (out / "head_summary.csv").exists()
    # The same command with one process finishes the run: rank 1's shards are redone.
    procs.run(procs.torchrun(1, _args(model_dir, corpus, out)))
    procs.assert_same_tables(single, out, TABLES)


def test_detached_shares_merged_give_the_tables_of_one_process(model_dir, corpus, single, tmp_path,
                                                               monkeypatch, capsys):
    """A SLURM array without a rendezvous: each task captures its share of prepared shards into
    its own run directory (SPECTRA_SHARD_RANK/WORLD), `spectra-lens merge` makes the tables."""
    shards = tmp_path / "shards"
    procs.run(procs.cli(["prepare", "--model", str(model_dir), "--corpus", corpus, "--out", str(shards),
                   "--seq-len", "24", "--n-sequences", "16", "--shard-size", "2"]))
    parts = [tmp_path / f"part_{i}" for i in range(3)]
    for i, part in enumerate(parts):
        args = _args(model_dir, str(shards), part)
        proc = subprocess.run(procs.cli(args), capture_output=True, text=True, timeout=600,
                              env=procs.env() | {"SPECTRA_SHARD_RANK": str(i), "SPECTRA_SHARD_WORLD": "3"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (part / "head_summary.csv").exists()  # a share makes no tables
        assert sorted(p.name for p in (part / "moments").iterdir()) == sorted(
            f"{kind}_{j:05d}.npz" for j in range(i, 8, 3) for kind in ("shard", "counterfactual"))
    from spectra_lens.experiments import cli

    monkeypatch.setenv("SPECTRA_NO_IMAGES", "1")
    # two of the three shares leave shards 2 and 5 out: refused, naming them
    assert cli.main(["merge", *map(str, parts[:2]), "--out", str(tmp_path / "bad")]) == 2
    out = tmp_path / "merged"
    assert cli.main(["merge", *map(str, parts), "--out", str(out), "--no-progress"]) == 0
    # agreement holds the norm share: the counterfactual moments of every share, merged
    procs.assert_same_tables(single, out, (*TABLES, "agreement"))
    assert (out / "reference_norm.npz").read_bytes() == (parts[0] / "reference_norm.npz").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["counterfactual"]["computed"] is True

    # a share whose reference norm differs (another device, other tokens): its counterfactual
    # moments cannot be merged with the others'; refused in one line, nothing written
    ref = ReferenceNorm.load(parts[2] / "reference_norm.npz")
    dataclasses.replace(ref, log_norm=ref.log_norm + 1e-3).save(parts[2] / "reference_norm.npz")
    assert cli.main(["merge", *map(str, parts), "--out", str(tmp_path / "mixed"), "--no-progress"]) == 2
    assert "another reference norm" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()


def test_shard_share_environment(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SPECTRA_SHARD_RANK", "1")
    monkeypatch.setenv("SPECTRA_SHARD_WORLD", "3")
    g = Group.from_env()
    assert (g.rank, g.world, g.detached, g.distributed) == (1, 3, True, False)
    assert g.shards(8) == [1, 4, 7]
    g.barrier()  # no process group: a no-op
    monkeypatch.setenv("SPECTRA_SHARD_RANK", "3")
    with pytest.raises(SpectraError, match="rank must be in"):
        Group.from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SpectraError, match="exclude each other"):
        Group.from_env()
