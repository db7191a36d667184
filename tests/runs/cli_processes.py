"""Helpers of the tests of runs: the CLI in this process (`run`, `one_error_line`, `manifest`:
tests/runs/test_run_safety.py and test_data_safety.py) and in fresh processes (`python -m
spectra_lens.experiments.cli`, torchrun with gloo on the CPU: test_distributed.py and
test_distributed_gain.py). The tiny model they all run is `tests/runs/conftest.py`'s `model_dir`.

Each launch starts Python processes that import torch and transformers and load a tiny model
saved to disk (~5-10 s each on a loaded 2-core machine).
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from spectra_lens.testing import tiny_hf_model, word_corpus, word_tokenizer


def save_tiny_llama(directory: Path) -> Path:
    """A tiny Llama (GQA; 2 layers, 4 heads, context 128) and the word-level tokenizer (with a
    pad token) saved as a Hugging Face directory, as `--model DIR` takes it."""
    tiny_hf_model("llama_gqa").save_pretrained(directory)
    word_tokenizer(pad=True).save_pretrained(directory)
    return directory


def run_here(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `spectra-lens argv` in this process."""
    from spectra_lens.experiments import cli

    code = cli.main(argv)
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The one `error: ...` line of stderr (progress bars of model loading aside)."""
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def manifest(out) -> dict:
    """The run directory's manifest.json."""
    import json

    return json.loads((Path(out) / "manifest.json").read_text())


def save_corpus(directory: Path) -> str:
    """Six random-word documents of 200 words, as `--corpus` takes them."""
    return word_corpus(directory, 6, 200)


def env() -> dict:
    """The environment of a launch: offline, one thread, no type checks, no torchrun variables
    inherited from the caller."""
    out = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               SPECTRA_LENS_NO_TYPECHECK="1")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(var, None)
    return out


def cli(args: list[str]) -> list[str]:
    """`spectra-lens ARGS` in one process."""
    return [sys.executable, "-m", "spectra_lens.experiments.cli", *args]


def torchrun(n: int, args: list[str]) -> list[str]:
    """`spectra-lens ARGS` under torchrun with `n` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
            "--standalone", "-m", "spectra_lens.experiments.cli", *args]


def run(cmd: list[str]) -> None:
    """Run `cmd` to the end; it must succeed (its output's tail is the assertion message)."""
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def one_process_run(tmp_path_factory, args: Callable[[Path], list[str]]) -> Path:
    """The run directory of `spectra-lens ARGS` in one process, `args(out)` the arguments for
    run directory `out`: the reference the multi-process runs are compared with."""
    out = tmp_path_factory.mktemp("single") / "run"
    run(cli(args(out)))
    return out


def rank_pids(parent: int, rank: int) -> list[int]:
    """Processes below `parent` whose environment says RANK=rank (torchrun's workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if f"RANK={rank}".encode() in environ and ppid == parent:
            found.append(int(d.name))
    return found


def run_killing_rank(cmd: list[str], rank: int, *, when: Callable[[], bool] | None = None,
                     poll: float = 0.05, timeout: float = 300) -> tuple[bool, int]:
    """Launch `cmd` (torchrun) and SIGKILL the worker of `rank`: as soon as it exists, or, with
    `when`, at the first poll where `when()` holds (once: a rank not found then is not killed).
    Returns (killed, the launcher's exit code)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if when is None or when():
                pids = rank_pids(proc.pid, rank)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed = bool(pids)
                if killed or when is not None:
                    break
            time.sleep(poll)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return killed, proc.returncode


def assert_same_tables(a: Path, b: Path, tables: Iterable[str]) -> None:
    """The CSV tables `tables` (file stems) of run directories `a` and `b` are the same: the same
    columns, numbers equal to 1e-9, everything else equal as text."""
    for name in tables:
        x, y = pd.read_csv(a / f"{name}.csv"), pd.read_csv(b / f"{name}.csv")
        assert list(x.columns) == list(y.columns), name
        num = x.select_dtypes("number").columns
        np.testing.assert_allclose(x[num].to_numpy(float), y[num].to_numpy(float), rtol=0, atol=1e-9,
                                   err_msg=name)
        other = [c for c in x.columns if c not in num]
        assert x[other].astype(str).equals(y[other].astype(str)), name
