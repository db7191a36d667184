"""Several devices and processes: an explicit device map gives the metrics of no map; the
observational run under torchrun (gloo, CPU): 2 processes give the tables of 1 process, a
killed rank's shards are redone by the rerun, and the same command runs with 1 process.

Each torchrun launch starts fresh Python processes that import torch and transformers and load a
tiny model saved to disk (~5-10 s each on a loaded 2-core machine).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spectra_lens.distributed import Group, shard_indices
from spectra_lens.errors import SpectraError
from spectra_lens.hooks import METRIC_NAMES, capture_metrics
from spectra_lens.models import load_model, parse_device_map
from spectra_lens.testing import tiny_hf_model, word_corpus, word_tokenizer

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
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer saved as a Hugging Face directory."""
    tok = word_tokenizer()
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_model("llama_gqa").save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return word_corpus(tmp_path_factory.mktemp("corpus"), 6, 200)


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


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               SPECTRA_LENS_NO_TYPECHECK="1")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _torchrun(n: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
            "--standalone", "-m", "spectra_lens.cli", *args]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_csv(out / f"{t}.csv") for t in TABLES}


def _assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    for name in TABLES:
        x, y = ta[name], tb[name]
        assert list(x.columns) == list(y.columns), name
        num = x.select_dtypes("number").columns
        np.testing.assert_allclose(x[num].to_numpy(float), y[num].to_numpy(float), rtol=0, atol=1e-9,
                                   err_msg=name)
        other = [c for c in x.columns if c not in num]
        assert x[other].astype(str).equals(y[other].astype(str)), name


@pytest.fixture(scope="module")
def single(model_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _run([sys.executable, "-m", "spectra_lens.cli", *_args(model_dir, corpus, out)])
    return out


def test_two_processes_give_the_tables_of_one(model_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    _run(_torchrun(2, _args(model_dir, corpus, out)))
    _assert_same_tables(single, out)


def _rank_pids(parent: int, rank: int) -> list[int]:
    """Processes below `parent` whose environment says RANK=rank (torchrun's workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if f"RANK={rank}".encode() in env and ppid == parent:
            found.append(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find a rank's process")
def test_a_killed_rank_is_redone_on_resume_with_one_process(model_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(2, _args(model_dir, corpus, out)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            pids = _rank_pids(proc.pid, 1)
            if pids:  # kill rank 1 as soon as it exists: its shards are left to the rerun
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed and proc.returncode != 0
    assert not (out / "head_summary.csv").exists()
    # The same command with one process finishes the run: rank 1's shards are redone.
    _run(_torchrun(1, _args(model_dir, corpus, out)))
    _assert_same_tables(single, out)


def test_detached_shares_merged_give_the_tables_of_one_process(model_dir, corpus, single, tmp_path,
                                                               monkeypatch):
    """A SLURM array without a rendezvous: each task captures its share of prepared shards into
    its own run directory (SPECTRA_SHARD_RANK/WORLD), `spectra-lens merge` makes the tables."""
    shards = tmp_path / "shards"
    _run([sys.executable, "-m", "spectra_lens.cli", "prepare", "--model", str(model_dir),
          "--corpus", corpus, "--out", str(shards), "--seq-len", "24", "--n-sequences", "16",
          "--shard-size", "2"])
    parts = [tmp_path / f"part_{i}" for i in range(3)]
    for i, part in enumerate(parts):
        args = _args(model_dir, str(shards), part)
        proc = subprocess.run([sys.executable, "-m", "spectra_lens.cli", *args], capture_output=True,
                              text=True, timeout=600,
                              env=_env() | {"SPECTRA_SHARD_RANK": str(i), "SPECTRA_SHARD_WORLD": "3"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (part / "head_summary.csv").exists()  # a share makes no tables
        assert sorted(p.name for p in (part / "moments").iterdir()) == \
            [f"shard_{j:05d}.npz" for j in range(i, 8, 3)]
    from spectra_lens import cli

    monkeypatch.setenv("SPECTRA_NO_IMAGES", "1")
    # two of the three shares leave shards 2 and 5 out: refused, naming them
    assert cli.main(["merge", *map(str, parts[:2]), "--out", str(tmp_path / "bad")]) == 2
    out = tmp_path / "merged"
    assert cli.main(["merge", *map(str, parts), "--out", str(out), "--no-progress"]) == 0
    _assert_same_tables(single, out)


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
