"""The HTML report: built from real (tiny-model) runs, checked as HTML and in a real browser.

The browser test needs a headless Chromium (`scripts/install_chromium.sh`). Without one it is
skipped, unless SPECTRA_REQUIRE_BROWSER is set (CI sets it), in which case it fails. It saves a
screenshot of the rendered page to `test-artifacts/report.png`.
"""

import base64
import importlib
import json
import os
import re
import shutil
import subprocess
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from plotly.offline import get_plotlyjs
from spectra_lens.experiments import cli
from spectra_lens.experiments.report import (
    EXPERIMENTS,
    build_report,
    find_runs,
    run_figures,
    write_report,
)

from spectra_lens.data.shards import write_shards
from spectra_lens.errors import SpectraError
from spectra_lens.present.page import PLOTLYJS_FILE
from spectra_lens.present.report import _slug

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FAMILY = "llama_gqa"  # grouped keys: the default model's architecture, in miniature


def main(argv):
    """`spectra-lens report ARGV`."""
    return cli.main(["report", *argv])


# --------------------------------------------------------------------------- real tiny runs


def _shards(root: Path) -> Path:
    """A prepared shard set for the tiny models (they have no tokenizer): 8 sequences × 16."""
    tokens = torch.randint(1, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    out = root / "tiny_shards"
    write_shards(tokens, out, shard_size=2, tokenizer_name="tiny-random", corpus="random ids",
                 documents=torch.arange(8))  # a document per sequence
    return out


# Causal experiments: 2 sequences choose the heads, 4 are measured, 3 scales.
_CAUSAL = {"seq_len": 16, "n_sequences": 4, "n_select": 2, "alphas": (0.5, 1.0, 2.0)}


def _run_observational(out: Path, model, corpus: Path) -> None:
    from spectra_lens.experiments.observational import run

    from spectra_lens.config import ObservationalConfig

    run(ObservationalConfig(out=str(out), corpus=str(corpus), seq_len=16, n_sequences=8,
                            shard_size=2, batch_size=4, n_boot=20, top_heads=2),
        model=model, progress=False)


def _run_intervention(out: Path, model, corpus: Path) -> None:
    from spectra_lens.experiments.intervention import run

    from spectra_lens.config import InterventionConfig

    run(InterventionConfig(out=str(out), corpus=str(corpus), **_CAUSAL), model=model, progress=False)


def _run_gain(out: Path, model, corpus: Path) -> None:
    from spectra_lens.experiments.gain import run

    from spectra_lens.config import GainConfig

    run(GainConfig(out=str(out), corpus=str(corpus), **_CAUSAL), model=model, progress=False)


def _run_qk_control(out: Path, model, corpus: Path) -> None:
    from spectra_lens.experiments.qk_control import run

    from spectra_lens.config import QKConfig

    run(QKConfig(out=str(out), corpus=str(corpus), **_CAUSAL), model=model, progress=False)


def _run_head_types(out: Path, model, corpus: Path) -> None:
    from spectra_lens.experiments.head_types import run

    from spectra_lens.config import HeadTypesConfig

    run(HeadTypesConfig(out=str(out), corpus=str(corpus), seq_len=16, n_sequences=4, n_repeated=4,
                        half_len=8), model=model, progress=False)


def _run_ablate_norm(out: Path, model, corpus: Path) -> None:
    from spectra_lens.experiments.ablate_norm import run

    from spectra_lens.config import AblateNormConfig

    run(AblateNormConfig(out=str(out), corpus=str(corpus), seq_len=16, n_sequences=4, n_select=2,
                         n_boot=100), model=model, progress=False)


def _run_causal_map(out: Path, model, corpus: Path) -> None:
    from spectra_lens.experiments.causal_map import run

    from spectra_lens.config import CausalMapConfig

    run(CausalMapConfig(out=str(out), corpus=str(corpus), seq_len=16, n_sequences=4, n_select=2,
                        n_boot=100), model=model, progress=False)


def _run_length(out: Path, model, corpus: Path) -> None:
    """The length study reads whole documents: the same tiny architecture with a word tokenizer."""
    from spectra_lens.experiments.length import run

    from spectra_lens.config import LengthConfig
    from spectra_lens.models import bridge_from_hf
    from spectra_lens.testing import tiny_hf_model, word_corpus, word_tokenizer

    (corpus.parent / "length_corpus").mkdir()
    words = word_corpus(corpus.parent / "length_corpus", 4, 60)
    run(LengthConfig(out=str(out), corpus=words, seq_len=32, n_documents=4),
        model=bridge_from_hf(tiny_hf_model(FAMILY), word_tokenizer()), progress=False)


# experiment -> (module, function running it small into `out` on `model`)
RUNNERS = {
    "observational": ("spectra_lens.experiments.observational", _run_observational),
    "intervention": ("spectra_lens.experiments.intervention", _run_intervention),
    "gain": ("spectra_lens.experiments.gain", _run_gain),
    "qk_control": ("spectra_lens.experiments.qk_control", _run_qk_control),
    "head_types": ("spectra_lens.experiments.head_types", _run_head_types),
    "ablate_norm": ("spectra_lens.experiments.ablate_norm", _run_ablate_norm),
    "causal_map": ("spectra_lens.experiments.causal_map", _run_causal_map),
    "length": ("spectra_lens.experiments.length", _run_length),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny) -> Path:
    """Real small runs of the four experiments on a tiny model, one subdirectory each."""
    root = tmp_path_factory.mktemp("results")
    corpus = _shards(tmp_path_factory.mktemp("corpus"))
    model, _ = tiny(FAMILY)
    for name, (_, run) in RUNNERS.items():
        run(root / name, model, corpus)
    return root


def _subset(results: Path, root: Path, names) -> Path:
    for name in names:
        shutil.copytree(results / name, root / name)
    return root


@pytest.fixture(scope="module")
def with_unfinished(results, tmp_path_factory) -> Path:
    """`results` plus, under group/, a copy of every run that did not finish and has no figures."""
    root = _subset(results, tmp_path_factory.mktemp("mixed"), RUNNERS)
    for name in RUNNERS:
        unfinished = root / "group" / f"{name}_unfinished"
        shutil.copytree(results / name, unfinished)
        shutil.rmtree(unfinished / "figures")
        manifest = json.loads((unfinished / "manifest.json").read_text())
        manifest["status"] = "running"
        (unfinished / "manifest.json").write_text(json.dumps(manifest))
    return root


# --------------------------------------------------------------------------- the page as HTML


class _Page(HTMLParser):
    """Tags, external references and element ids of a page (script bodies are not parsed)."""

    def __init__(self):
        super().__init__()
        self.external: list[str] = []
        self.script_srcs: list[str] = []
        self.ids: dict[str, str] = {}
        self._in: str | None = None
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and "src" in a:
            self.script_srcs.append(a["src"])
        for key in ("src", "href"):
            v = a.get(key) or ""
            if tag in ("script", "link", "img", "iframe", "embed", "source") and v and not v.startswith(("data:", "#")):
                self.external.append(f"<{tag} {key}={v}>")
        if "id" in a:
            self.ids[a["id"]] = tag
            self._in = a["id"]
            self.text[a["id"]] = ""

    def handle_data(self, d):
        if self._in is not None:
            self.text[self._in] += d

    def handle_endtag(self, tag):
        self._in = None


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


def _figure_ids(page: str) -> list[str]:
    return list(json.loads(_parse(page).text["spectra-figure-data"]))


def _missing_block(page: str) -> str:
    return page.split('<div id="not-in-directory">', 1)[1].split("</div>", 1)[0]


def test_find_runs_finds_each_run_once_and_ignores_other_manifests(with_unfinished):
    runs = find_runs(with_unfinished)
    names = sorted(str(r.path.relative_to(with_unfinished)) for r in runs)
    expected = sorted([*RUNNERS, *(f"group/{n}_unfinished" for n in RUNNERS)])
    assert names == expected  # observational/shards/manifest.json (token shards) is not a run
    assert [r.experiment for r in runs] == [n for n in EXPERIMENTS for _ in range(2)]


@pytest.mark.parametrize("present", [("observational",), ("intervention", "gain"),
                                     ("qk_control",), ("head_types",)], ids="+".join)
def test_report_names_the_missing_experiments(results, tmp_path, present):
    page = build_report(_subset(results, tmp_path, present))
    block = _missing_block(page)
    assert block.count("<li>") == len(EXPERIMENTS) - len(present)
    for name, module in EXPERIMENTS.items():
        spec = importlib.import_module(module).OUTPUTS
        named = escape(spec.title) in block and f"{spec.command} --out" in block
        assert named == (name not in present), name
    assert page.count("<section ") == len(present)


def test_report_of_one_run_directory_names_the_others(results):
    assert _missing_block(build_report(results / "gain")).count("<li>") == len(EXPERIMENTS) - 1


def test_report_of_every_experiment_has_no_missing_list(results):
    page = build_report(results)
    assert 'id="not-in-directory"' not in page
    assert page.count("<section ") == len(EXPERIMENTS) == len(RUNNERS)


def test_report_shows_manifest_tables_and_figures_of_every_run(results):
    page = build_report(results)
    for key in ("config", "timings", "versions", "model"):
        assert page.count(f"<h4>{key}</h4>") == len(RUNNERS), key
    tables = ["head_summary.csv", "significant_heads.csv", "consistent_heads.csv",
              "layer_statistics.csv", "gain_summary.csv", "qk_comparison_results.csv",
              "sensitivity_summary.csv"]
    tables += [p.name for p in (results / "intervention").glob("*.csv")]
    for table in tables:
        assert f"<code>{table}</code>" in page, table
    assert "not found in this run" not in page
    ids = _figure_ids(page)
    for name in RUNNERS:
        saved = list((results / name / "figures").glob("*.html"))
        assert saved, f"the {name} run saved no figure"
        assert len([i for i in ids if i.startswith(f"fig-{_slug(name)}-")]) == len(saved), name
    assert 'id="incomplete-runs"' not in page and "did not finish" not in page


def test_unfinished_runs_are_flagged_and_their_figures_rebuilt(with_unfinished):
    page = build_report(with_unfinished)
    flagged = page.split('id="incomplete-runs"', 1)[1].split("</div>", 1)[0]
    ids = _figure_ids(page)
    for name in RUNNERS:
        assert f"{name}_unfinished" in flagged
        sid = _slug(f"{name}-group/{name}_unfinished")
        section = page.split(f'<section id="{sid}">', 1)[1].split("</section>", 1)[0]
        assert "did not finish" in section and 'class="badge incomplete"' in section
        assert "could not be built" not in section
        assert [i for i in ids if i.startswith(f"fig-{sid}-")], f"no figure rebuilt for {name}"


def _decoded(obj):
    """Plotly's typed arrays ({"dtype", "bdata"[, "shape"]}) as rounded float lists."""
    if isinstance(obj, dict) and "bdata" in obj:
        a = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"]).astype(float)
        return np.round(a, 9).tolist()
    if isinstance(obj, dict):
        return {k: _decoded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decoded(v) for v in obj]
    return obj


def test_report_rebuilds_exactly_the_figures_each_run_wrote(results, tmp_path):
    """The report builds figures with the experiment's own figures(tables), from the CSVs: with the
    saved figures deleted, it gives the same figures (names, traces, data, marked heads)."""
    root = _subset(results, tmp_path / "r", RUNNERS)
    saved = {}
    for name in RUNNERS:
        files = sorted((root / name / "figures").glob("*.json"))
        assert files, f"the {name} run saved no figure JSON"
        saved[name] = {f.stem: json.loads(f.read_text()) for f in files}
        shutil.rmtree(root / name / "figures")
    for run in find_runs(root):
        rebuilt = {n: json.loads(f.to_json()) for n, f in run_figures(run).items()}
        assert sorted(rebuilt) == sorted(saved[run.experiment]), run.experiment
        for n, fig in rebuilt.items():
            # CSVs read back as int64/float64 where the run held int32: compare values, not dtypes
            assert _decoded(fig["data"]) == _decoded(saved[run.experiment][n]["data"]), f"{run.experiment}/{n}"
            assert fig["layout"].get("title") == saved[run.experiment][n]["layout"].get("title")


def test_report_can_reference_plotlyjs_instead_of_inlining_it(results):
    page = build_report(results / "gain", plotlyjs="plotly.min.js")
    assert _parse(page).script_srcs == ["plotly.min.js"]
    assert get_plotlyjs()[:200] not in page


def test_page_is_self_contained(results):
    page = build_report(results)
    parsed = _parse(page)
    assert parsed.external == [], parsed.external
    assert parsed.script_srcs == []
    assert page.count(get_plotlyjs()[:200]) == 1  # plotly.js inline, once


def test_write_report_is_atomic_and_cli_defaults_to_results_dir(results, tmp_path, capsys):
    assert main([str(results)]) == 0
    default = results / "report.html"
    assert default.exists() and default.stat().st_size < 1_000_000
    assert "EXP3 qk_control (complete)" in capsys.readouterr().out
    # plotly.js once, beside the page, loaded by relative path
    assert _parse(default.read_text()).script_srcs == [PLOTLYJS_FILE]
    assert (results / PLOTLYJS_FILE).read_text() == get_plotlyjs()
    # the default page is the report's own: a second report replaces it without --overwrite
    assert main([str(results)]) == 0
    # A second report does not pick up the first as a figure file.
    out = write_report(results, tmp_path / "sub" / "r.html")
    assert out == tmp_path / "sub" / "r.html" and out.exists()
    assert (tmp_path / "sub" / PLOTLYJS_FILE).exists()
    assert not list((tmp_path / "sub").glob(".tmp-*"))
    assert _figure_ids(out.read_text()) == _figure_ids(default.read_text())
    inline = write_report(results, tmp_path / "inline.html", plotlyjs="inline")
    assert _parse(inline.read_text()).script_srcs == [] and not (tmp_path / PLOTLYJS_FILE).exists()
    default.unlink()
    (results / PLOTLYJS_FILE).unlink()


def test_report_refuses_an_existing_out_file_unless_overwrite(results, tmp_path, capsys):
    """`report R --out R/manifest.json` must not destroy the run's record."""
    run = tmp_path / "gain"
    shutil.copytree(results / "gain", run)
    manifest = run / "manifest.json"
    before = manifest.read_bytes()
    assert main([str(run), "--out", str(manifest)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "manifest.json" in err, err
    assert manifest.read_bytes() == before
    assert not (run / PLOTLYJS_FILE).exists()  # nothing written
    # an explicit --out that exists is refused even when it is a report page
    page = tmp_path / "r.html"
    assert main([str(run), "--out", str(page)]) == 0
    first = page.read_bytes()
    assert main([str(run), "--out", str(page)]) == 2 and page.read_bytes() == first
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(run), "--out", str(page), "--overwrite"]) == 0
    # the default location is replaced only when it holds a report page
    (run / "report.html").write_text("my notes")
    assert main([str(run)]) == 2 and (run / "report.html").read_text() == "my notes"
    with pytest.raises(SpectraError, match="is a directory"):
        write_report(run, tmp_path)


def test_errors_name_the_directory(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SpectraError, match="no run directory"):
        build_report(tmp_path)


def test_corrupt_csv_and_manifest_do_not_break_the_page(results, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(results / "observational", root / "observational")
    (root / "observational" / "layer_statistics.csv").write_text("")
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{not json")
    page = build_report(root)
    assert "layer_statistics.csv is unreadable" in page
    assert len(find_runs(root)) == 1


# --------------------------------------------------------------------------- in a real browser


def _chromium() -> str | None:
    for name in (os.environ.get("SPECTRA_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    if os.environ.get("SPECTRA_REQUIRE_BROWSER"):
        pytest.fail("SPECTRA_REQUIRE_BROWSER is set but no chromium is on PATH; "
                    "run scripts/install_chromium.sh")
    pytest.skip("no chromium on PATH: run scripts/install_chromium.sh to render the report in a "
                "headless browser (CI sets SPECTRA_REQUIRE_BROWSER=1 and must have it)")


def _browse(binary: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args, page.as_uri()]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)


def test_report_renders_every_figure_in_a_headless_browser(with_unfinished, tmp_path):
    binary = _chromium()
    page = write_report(with_unfinished, tmp_path / "report.html")
    expected = _figure_ids(page.read_text())
    assert expected

    done = _browse(binary, page, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    dom = _parse(done.stdout)
    assert "spectra-render-status" in dom.ids, "the page's script did not run"
    status = json.loads(dom.text["spectra-render-status"] or "{}")
    assert sorted(status) == sorted(expected), "not every figure finished plotting"
    for fig_id, s in status.items():
        assert s["error"] is None, f"{fig_id}: {s['error']}"
        assert s["with_data"] >= 1, f"{fig_id} has no trace with data: {s}"
        assert s["rendered"] >= s["with_data"], f"{fig_id} drew fewer traces than hold data: {s}"
    # every figure div holds a drawn plot
    assert done.stdout.count('class="plot-container plotly"') == len(expected)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    height = 1200 + 700 * len(expected)
    done = _browse(binary, page, tmp_path / "profile", f"--screenshot={shot}",
                   f"--window-size=1280,{min(height, 16000)}")
    assert done.returncode == 0 and shot.exists() and shot.stat().st_size > 50_000, done.stderr[-3000:]


# Appended to a copy of the page: where the findings, the first verdict counts and the first
# manifest are laid out at a 1280 × 900 window, written into the DOM for --dump-dom to read.
_LAYOUT_PROBE = """<script>
window.addEventListener("load", function () {
  function box(sel) {
    var el = document.querySelector(sel);
    if (!el) return null;
    var r = el.getBoundingClientRect();
    return {top: r.top + window.scrollY, bottom: r.bottom + window.scrollY, height: r.height,
            text: el.textContent.slice(0, 200), open: el.open === undefined ? null : el.open,
            visible: el.checkVisibility ? el.checkVisibility() : null};
  }
  var out = document.createElement("pre");
  out.id = "layout-probe";
  out.textContent = JSON.stringify({
    findings: box("#findings h2"), counts: box("#findings .counts"), heads: box("#findings .heads"),
    manifest: box("details.manifest-details"), manifest_table: box("div.manifest"),
    files: box("details.files"), first_section: box("section"), viewport: window.innerHeight});
  document.body.appendChild(out);
});
</script>"""


def test_first_screen_shows_the_findings_not_the_manifest(results, tmp_path):
    """In headless Chromium at 1280 × 900, the report of a small run shows the findings heading,
    the verdict counts and the strongest heads above the fold; the manifest and file list come
    after the figures and tables, folded."""
    binary = _chromium()
    root = _subset(results, tmp_path / "r", ["observational"])
    page = write_report(root, tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _LAYOUT_PROBE + "</body>"))
    done = _browse(binary, probe, tmp_path / "profile", "--dump-dom", "--window-size=1280,900")
    assert done.returncode == 0, done.stderr[-3000:]
    box = json.loads(_parse(done.stdout).text["layout-probe"])
    fold = 900
    assert box["findings"]["text"] == "Findings" and box["findings"]["bottom"] < fold / 3
    counts = box["counts"]
    assert counts["bottom"] < fold, counts
    summary = pd.read_csv(root / "observational" / "agreement_summary.csv").set_index("layer").loc["all"]
    for verdict in ("equivalent_to_a_temperature", "differs", "undetermined"):  # the run's own counts
        assert f"{verdict.replace('_', ' ')}{int(summary[f'n_{verdict}'])}" in counts["text"], counts["text"]
    assert box["heads"]["top"] < fold, box["heads"]
    # the manifest: folded (closed, its table not laid out), after the section's content
    assert box["manifest"]["open"] is False and box["manifest_table"]["visible"] is False
    assert box["files"]["open"] is False
    assert box["manifest"]["top"] > box["first_section"]["top"] + fold
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_first_screen.png"
    done = _browse(binary, page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,900")
    assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-3000:]


def test_run_figure_pages_load_the_one_plotlyjs_beside_the_report(results, tmp_path):
    """A run writes no plotly.js of its own; its figure pages draw once the report has written
    the results tree's copy, and say where to get it before that."""
    binary = _chromium()
    root = _subset(results, tmp_path / "r", ["gain"])
    assert not list(root.rglob("*.js"))
    figure = next((root / "gain" / "figures").glob("*.html"))
    done = _browse(binary, figure, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0 and 'id="spectra-no-plotly"' in done.stdout
    assert 'class="plot-container plotly"' not in done.stdout
    write_report(root)
    assert [p.name for p in root.rglob("*.js")] == [PLOTLYJS_FILE]
    done = _browse(binary, figure, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0 and 'class="plot-container plotly"' in done.stdout, done.stderr[-2000:]
    assert 'id="spectra-no-plotly"' not in done.stdout


def _pdf_outline(data: bytes) -> list[str]:
    """The titles of a PDF's entries (the document outline Chromium writes from the headings)."""
    import re

    out = []
    for m in re.finditer(rb"/Title\s*(\((?:\\.|[^\\)])*\)|<[0-9A-Fa-f]+>)", data):
        t = m.group(1)
        if t.startswith(b"<"):
            raw = bytes.fromhex(t[1:-1].decode())
            out.append(raw[2:].decode("utf-16-be") if raw[:2] == b"\xfe\xff" else raw.decode("latin-1"))
        else:
            out.append(re.sub(rb"\\(.)", rb"\1", t[1:-1]).decode("latin-1"))
    return out


def test_pdf_has_every_run_under_its_own_heading(results, tmp_path, capsys):
    _chromium()
    root = _subset(results, tmp_path / "r", RUNNERS)
    second = root / "again" / "gain"  # a second run of one experiment: a heading of its own
    shutil.copytree(results / "gain", second)
    assert main([str(root), "--out", str(tmp_path / "report.html"), "--pdf"]) == 0
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-")
    runs = find_runs(root)
    assert len(runs) == len(RUNNERS) + 1
    headings = [f"{r.outputs.label} {r.outputs.title} — {r.path.relative_to(root).as_posix()}" for r in runs]
    assert len(set(headings)) == len(headings)
    outline = _pdf_outline(pdf)
    def squeezed(text):  # a heading wrapped over two lines loses the space at the break
        return "".join(text.split())

    for h in headings:  # each section's heading (the findings cards repeat it: at least twice)
        assert sum(squeezed(t).startswith(squeezed(h)) for t in outline) >= 2, (h, outline)
    # --out exists now, and so does the PDF: both refused without --overwrite, untouched
    assert main([str(root), "--out", str(tmp_path / "report.html"), "--pdf"]) == 2
    assert (tmp_path / "report.pdf").read_bytes() == pdf
    assert "--overwrite" in capsys.readouterr().err


def test_every_file_and_figure_of_real_runs_is_in_the_data_dictionary(results):
    from test_data_dictionary import DICTIONARY, covered, dictionary_patterns

    patterns, text = dictionary_patterns(), DICTIONARY.read_text(encoding="utf-8")
    for run in find_runs(results):
        listed = run.manifest["outputs"]
        assert any(f.startswith("figures/") for f in listed), run.experiment
        for name in listed:
            assert covered(name, patterns), f"{run.experiment}: {name} is not in {DICTIONARY.name}"
        for fig in (results / run.path.name / "figures").glob("*.json"):
            stem = re.sub(r"alpha_[\d.]+$", "alpha_{α}", re.sub(r"L\d+(_H\d+)?$|L\d+_H\d+", lambda m: (
                "L{l}_H{h}" if "_H" in m.group(0) else "L{l}"), fig.stem))
            assert f"`{stem}`" in text, f"{run.experiment}: figure {stem} is not in {DICTIONARY.name}"


def test_tables_are_sorted_by_an_informative_key_with_the_measured_columns_first(results, tmp_path):
    from spectra_lens.experiments.report import VIEWS

    from spectra_lens.present.report import _one_table, _view

    run = next(r for r in find_runs(results) if r.experiment == "observational")
    # consistent heads all have frac_significant_same_sign = 1: the strongest must come first
    rng = np.random.default_rng(0)
    r = rng.uniform(-0.9, 0.9, (20, 4))
    frame = {"layer": np.arange(20), "head": np.zeros(20, int), "n_folds": 4, "frac_same_sign": 1.0,
             "frac_significant_same_sign": 1.0, "consistent": True}
    frame.update({f"r_fold_{k}": r[:, k] for k in range(4)})
    path = tmp_path / "consistent_heads.csv"
    pd.DataFrame(frame).to_csv(path, index=False)
    declared = next(t for t in run.outputs.tables if t.pattern == "consistent_heads.csv")
    spec, derive = _view(run, declared)
    html = _one_table(path, spec, "t", None, derive)
    layers = [int(v) for v in re.findall(r"<tr>\s*<td>([^<]*)</td>", html)]  # first column: layer
    assert len(layers) == spec.rows
    assert layers == list(np.argsort(-np.abs(r).mean(1))[: len(layers)])
    assert "mean_abs_r_folds" in html
    # significant heads: layer, head and the measured r first, the original study's columns later
    sig = _view(run, next(t for t in run.outputs.tables if t.pattern == "significant_heads.csv"))[0]
    assert sig.columns[:3] == ("layer", "head", "r_logq_entropy")
    assert set(VIEWS) <= set(EXPERIMENTS)
