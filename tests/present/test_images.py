"""Figures as image files: every experiment's figures also as PNG, under the original study's file
names, drawn by a real headless Chromium; the report as PDF; and what happens without a browser.

The browser tests need Chrome/Chromium (`scripts/install_chromium.sh`). Without one they are
skipped, unless SPECTRA_REQUIRE_BROWSER is set (CI sets it), in which case they fail. The four
tiny runs share one export (`deferred_images`): starting the browser is the slow part.
"""

import json
import logging
import os

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image
from spectra_lens.experiments import gain, intervention, observational, qk_control

from spectra_lens.config import GainConfig, InterventionConfig, ObservationalConfig, QKConfig
from spectra_lens.data.shards import write_shards
from spectra_lens.errors import SpectraError
from spectra_lens.present.figures.export import (
    BROWSER_ENV,
    NO_IMAGES_ENV,
    deferred_images,
    find_browser,
    image_formats,
    write_figures,
)

FAMILY = "llama_gqa"
_CAUSAL = {"seq_len": 16, "n_sequences": 4, "n_select": 2, "alphas": (0.5, 1.0, 2.0)}


def _browser() -> str:
    found = find_browser()
    if found:
        return found
    if os.environ.get("SPECTRA_REQUIRE_BROWSER"):
        pytest.fail("SPECTRA_REQUIRE_BROWSER is set but no Chrome/Chromium is found; "
                    "run scripts/install_chromium.sh")
    pytest.skip("no Chrome/Chromium: run scripts/install_chromium.sh to test the image export "
                "(CI sets SPECTRA_REQUIRE_BROWSER=1 and must have it)")


def _original_names(experiment: str, manifest: dict) -> set[str]:
    """The original study's PNG names for a run (its heads are in the manifest)."""
    if experiment == "observational":
        return set()  # the original's EXP0 plots had no fixed names; ours are checked below
    sel = manifest["selection"]
    (tl, th), control = sel["target"], sel.get("control")
    if experiment == "intervention":
        names = set()
        for l, h in (tuple(sel["target"]), tuple(control)):
            names |= {f"{stem}_L{l}_H{h}" for stem in
                      ("entropy_vs_scale", "max_attn_vs_scale", "keff_vs_scale", "intervention_combined")}
        return names
    if experiment == "gain":
        cl, ch = control
        return {f"gain_fit_L{tl}_H{th}_target", f"gain_fit_L{cl}_H{ch}_control", "gain_comparison"}
    if experiment == "qk_control":
        return {f"{stem}_L{tl}_H{th}" for stem in ("qk_entropy_comparison", "qk_delta_entropy",
                                                   "qk_max_attn_comparison", "qk_keff_comparison")}
    raise AssertionError(experiment)


@pytest.fixture(autouse=True)
def images_on(monkeypatch):
    monkeypatch.delenv(NO_IMAGES_ENV, raising=False)  # conftest turns images off for other tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    """The four experiments, tiny, with their default image export, which all share one browser."""
    _browser()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(NO_IMAGES_ENV, raising=False)
        return _run_all(tmp_path_factory, tiny)


def _run_all(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("image_runs")
    tokens = torch.randint(1, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    corpus = root / "shards"
    write_shards(tokens, corpus, shard_size=2, tokenizer_name="tiny-random", corpus="random ids")
    model, _ = tiny(FAMILY)
    with deferred_images() as export:
        observational.run(ObservationalConfig(out=str(root / "observational"), corpus=str(corpus),
                                              seq_len=16, n_sequences=8, shard_size=2,
                                              batch_size=4, n_boot=20, top_heads=2),
                          model=model, progress=False)
        for module, cls in ((intervention, InterventionConfig), (gain, GainConfig),
                            (qk_control, QKConfig)):
            name = module.__name__.rsplit(".", 1)[1]
            module.run(cls(out=str(root / name), corpus=str(corpus), **_CAUSAL), model=model,
                       progress=False)
    return root, export


@pytest.mark.parametrize("experiment", ["observational", "intervention", "gain", "qk_control"])
def test_every_figure_has_a_non_blank_png_under_the_original_name(runs, experiment):
    root, export = runs
    assert export.ok, (export.skipped, export.failed)
    run = root / experiment
    figures = run / "figures"
    html = {p.stem for p in figures.glob("*.html")}
    png = {p.stem for p in figures.glob("*.png")}
    assert html and png == html, f"figures without PNG: {sorted(html - png)}"
    manifest = json.loads((run / "manifest.json").read_text())
    missing = _original_names(experiment, manifest) - png
    assert not missing, f"the original's file names missing: {sorted(missing)}"
    for name in sorted(png):
        with Image.open(figures / f"{name}.png") as im:
            px = np.asarray(im.convert("RGB"))
        background = px[0, 0]
        differs = np.any(px != background, axis=-1).mean()
        assert differs > 0.005, f"{name}.png is blank: {differs:.2%} of pixels differ from the background"


def test_png_size_is_the_figure_size_at_twice_the_pixels(runs):
    root, _ = runs
    with Image.open(root / "observational" / "figures" / "heatmap_r_logq_entropy.png") as im:
        assert im.format == "PNG"
        assert im.size == (1800, 1200)  # 900 × 600 CSS pixels at scale 2
        assert im.mode in ("RGB", "RGBA")


def test_report_pdf(runs, tmp_path, capsys):
    from spectra_lens.experiments.cli import main

    root, _ = runs
    assert main(["report", str(root), "--out", str(tmp_path / "report.html"), "--pdf"]) == 0
    pdf = tmp_path / "report.pdf"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and len(data) > 20_000
    pages = data.count(b"/Type /Page") - data.count(b"/Type /Pages")
    assert pages >= 4, f"a report of four runs printed on {pages} page(s)"
    assert str(pdf) in capsys.readouterr().out


# --------------------------------------------------------------------------- without a browser


def _fig() -> go.Figure:
    return go.Figure(go.Bar(x=[1, 2, 3], y=[3, 1, 2]))


def test_no_browser_keeps_html_and_says_so_in_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(BROWSER_ENV, raising=False)
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_browser() is None
    with caplog.at_level(logging.WARNING):
        result = write_figures({"a": _fig(), "b": _fig()}, tmp_path / "figs")
    assert sorted(p.name for p in (tmp_path / "figs").glob("*.html")) == ["a.html", "b.html"]
    assert not list((tmp_path / "figs").glob("*.png"))
    assert result.skipped and "install_chromium.sh" in result.skipped
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "HTML only" in warnings[0].getMessage()


def test_a_browser_that_fails_to_start_keeps_html(tmp_path, monkeypatch, caplog):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv(BROWSER_ENV, str(fake))
    with caplog.at_level(logging.WARNING):
        result = write_figures({"a": _fig()}, tmp_path / "figs")
    assert (tmp_path / "figs" / "a.html").exists() and not (tmp_path / "figs" / "a.png").exists()
    assert result.skipped and str(fake) in result.skipped


def test_a_misnamed_browser_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv(BROWSER_ENV, str(tmp_path / "nope"))
    with pytest.raises(SpectraError, match=BROWSER_ENV):
        find_browser()
    result = write_figures({"a": _fig()}, tmp_path / "figs")
    assert BROWSER_ENV in result.skipped


def test_no_images_writes_html_only_and_starts_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(BROWSER_ENV, str(tmp_path / "nope"))  # would warn if it were looked up
    with caplog.at_level(logging.WARNING):
        result = write_figures({"a": _fig()}, tmp_path / "figs", images="none")
    assert [p.name for p in result.written] == ["a.html", "a.json"]
    assert not caplog.records


def test_no_images_env_turns_every_export_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(NO_IMAGES_ENV, "1")
    with caplog.at_level(logging.WARNING):
        result = write_figures({"a": _fig()}, tmp_path / "figs", images="png,svg")
    assert [p.name for p in result.written] == ["a.html", "a.json"] and NO_IMAGES_ENV in result.skipped
    assert not caplog.records


def test_image_formats():
    assert image_formats("png") == ("png",)
    assert image_formats("png,svg") == ("png", "svg")
    assert image_formats(["SVG", "svg"]) == ("svg",)
    assert image_formats("none") == image_formats("") == image_formats(None) == ()
    with pytest.raises(SpectraError, match="jpg"):
        image_formats("png,jpg")


def test_figure_names_must_be_plain(tmp_path):
    with pytest.raises(SpectraError, match="plain file name"):
        write_figures({"../escape": _fig()}, tmp_path, images=())


def _group_alive(pgid: int) -> list[int]:
    """Processes (not zombies) of process group `pgid`."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def test_ctrl_c_during_the_image_export_interrupts_the_run_and_leaves_no_browser(tmp_path):
    """A SIGINT sent while the browser draws (the export holds on a file until the signal is
    sent, so the phase is certain): exit 130 with one line, the run marked "interrupted", no
    hang, and neither the export process nor any Chromium process left."""
    import signal
    import subprocess
    import sys
    import time

    from spectra_lens.testing import tiny_hf_model, word_corpus, word_tokenizer

    browser = _browser()
    model = tmp_path / "model"
    tiny_hf_model("llama_gqa").save_pretrained(model)
    word_tokenizer(pad=True).save_pretrained(model)
    (tmp_path / "corpus").mkdir()
    corpus = word_corpus(tmp_path / "corpus", 4, 300)
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.mkdir()
    env = {k: v for k, v in os.environ.items() if k != NO_IMAGES_ENV}
    env |= {"PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1", BROWSER_ENV: browser,
            "SPECTRA_IMAGES_HOLD": str(hold), "SPECTRA_LENS_NO_TYPECHECK": "1",
            "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spectra_lens.experiments.cli", "observe", "--model", str(model), "--corpus", corpus,
         "--out", str(out), "--seq-len", "24", "--n-sequences", "8", "--shard-size", "4",
         "--batch-size", "4", "--n-boot", "50", "--top-heads", "2", "--no-progress", "--images", "png"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell that starts pytest in the background ignores SIGINT, which the child inherits
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = hold / "started"
    deadline = time.time() + 400
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not started.exists():
        proc.kill()
        pytest.fail("the export never started: " + proc.communicate()[1][-2000:])
    time.sleep(0.2)  # the file is written in one call; let it be read whole
    worker, browser_pid = (int(v) for v in started.read_text().split())
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    assert _group_alive(browser_pid)  # the browser runs now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # no hang
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    deadline = time.time() + 15
    while (_group_alive(browser_pid) or _group_alive(worker)) and time.time() < deadline:
        time.sleep(0.1)
    assert not _group_alive(browser_pid) and not _group_alive(worker)
    assert not list((out / "figures").glob("*.png"))
