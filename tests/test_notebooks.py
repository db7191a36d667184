"""Every notebook runs top to bottom, headless, and is stored without outputs.

The notebooks run on the embedded default model with their small settings
(`SPECTRA_NB_SMALL=1`); set `SPECTRA_NB_SMALL=0` in the environment to run them at full size.
The kernel is this interpreter: a kernelspec written for the test session (on JUPYTER_PATH)
runs `sys.executable -m ipykernel_launcher`, so no user- or system-level kernelspec can swap in
another Python.
"""

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
KERNEL = "spectra-lens-test"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec running this interpreter, found first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "spectra_lens tests", "language": "python",
    }))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), old]))
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def test_notebooks_exist():
    names = {p.name for p in PATHS}
    for expected in ("01_quickstart.ipynb", "02_observational.ipynb",
                     "03_intervention_and_gain.ipynb", "04_qk_control.ipynb"):
        assert expected in names, f"notebooks/{expected} is missing; found {sorted(names)}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; clear "
                       f"them (jupyter nbconvert --clear-output --inplace {path.name})")


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("SPECTRA_NB_SMALL", os.environ.get("SPECTRA_NB_SMALL", "1"))
    monkeypatch.setenv("SPECTRA_NB_OUT", str(tmp_path / "results"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # The kernel must import this checkout's spectra_lens and experiments, whatever its cwd.
    root = str(NOTEBOOKS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name, allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.time()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed in a cell:\n{e}", pytrace=False)
    elapsed = time.time() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    print(f"{path.name}: {elapsed:.1f} s; slowest cells: {_slowest(nb)}")


def _slowest(nb, n: int = 3) -> str:
    """The n slowest code cells, from the timing nbclient records in each cell's metadata."""
    times = []
    for i, cell in enumerate(nb.cells):
        ex = cell.get("metadata", {}).get("execution", {})
        start, end = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if cell.cell_type == "code" and start and end:
            seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
            times.append((seconds, i))
    return ", ".join(f"cell {i} {t:.1f} s" for t, i in sorted(times, reverse=True)[:n])
