"""The head page: built from real measurements (a planted induction head; the default model),
checked as HTML and, on the default model, rendered in a headless Chromium with every figure
holding data (screenshot in test-artifacts/head_page.png). Also: the report links each head in
its tables to its page when the page exists."""

import json
import re

import pandas as pd
import pytest
import torch

from spectra_lens.capture import count_hooks
from spectra_lens.errors import SpectraError
from spectra_lens.present.head_page import head_page, head_page_path
from spectra_lens.testing import PLANTED_INDUCTION_HEAD, planted_circuit_model

FIGURES = {"fig-pattern-text", "fig-pattern-repeated", "fig-pattern-prompt", "fig-qnorm-entropy",
           "fig-alpha-curve", "fig-slope-vs-gain", "fig-type-scores", "fig-generation-delta"}


def _specs(page: str) -> dict:
    blob = page.split('<script type="application/json" id="spectra-figure-data">', 1)[1]
    return json.loads(blob.split("</script>", 1)[0])


def _has_data(trace: dict) -> bool:
    return any(isinstance(trace.get(k), (list, dict)) and len(trace[k]) > 0 for k in ("x", "y", "z"))


@pytest.fixture(scope="module")
def planted():
    return planted_circuit_model()


@pytest.fixture(scope="module")
def text():
    return torch.randint(1, 97, (4, 40), generator=torch.Generator().manual_seed(5))


def test_head_page_of_a_planted_induction_head(planted, text, tmp_path):
    layer, head = PLANTED_INDUCTION_HEAD
    page = head_page(planted, layer, head, text=text, model_name="planted circuit", max_new_tokens=6)
    assert page.label == "induction" and set(page.generations) == {0.5, 2.0}
    est = page.estimates.set_index("estimate")
    assert (est["source"] == "computed").all() and len(est) == 3
    fitted, analytic = est["value"].iloc[1], est["value"].iloc[2]
    assert fitted < 0 and analytic < 0
    assert (est["ci_low"] <= est["value"]).all() and (est["value"] <= est["ci_high"]).all()
    # the α-curve falls: sharper attention at larger α
    curve = page.alpha_curve
    assert curve["mean_entropy"].is_monotonic_decreasing and 1.0 in set(curve["scale"])
    path = page.write(tmp_path / "heads")
    assert path == head_page_path(tmp_path / "heads", layer, head) and path.name == "L1H1.html"
    html = path.read_text()
    specs = _specs(html)
    assert set(specs) == FIGURES
    for fig_id, fig in specs.items():
        assert any(_has_data(t) for t in fig["data"]), fig_id
    assert "induction" in html and "Label rule" in html
    assert not re.search(r'<script[^>]+src=|<link[^>]+href="http', html)  # self-contained
    assert "<iframe" in page._repr_html_()
    assert count_hooks(planted) == 0


def test_head_page_reads_estimates_from_an_agreement_table(planted, text):
    layer, head = PLANTED_INDUCTION_HEAD
    # agreement.csv of stats.agreement: one row per head
    agreement = pd.DataFrame({"layer": [0, layer], "head": [0, head], "obs_slope": [0.0, -0.3],
                              "obs_slope_ci_low": [0.0, -0.4], "obs_slope_ci_high": [0.0, -0.2],
                              "gain_analytic": [0.0, -0.7], "gain_ci_low": [0.0, -0.8],
                              "gain_ci_high": [0.0, -0.6], "verdict": ["none", "agree"]})
    page = head_page(planted, layer, head, text=text, agreement=agreement, max_new_tokens=4)
    est = page.estimates
    assert list(est["source"]) == ["agreement table", "agreement table", "computed"]
    assert est["value"].iloc[0] == -0.3 and est["ci_high"].iloc[1] == -0.6
    assert page.agreement["verdict"] == "agree" and "agree" in page.html()
    other = head_page(planted, 0, 1, text=text, agreement=agreement, max_new_tokens=2)
    assert list(other.estimates["source"]) == ["computed"] * 3 and other.notes
    with pytest.raises(SpectraError, match="layer"):
        head_page(planted, 9, 0, text=text)
    with pytest.raises(SpectraError, match="two"):
        head_page(planted, layer, head, text=text, alphas=(2.0,))


def test_report_links_heads_to_their_pages(tmp_path):
    from spectra_lens.experiments.report import build_report

    run = tmp_path / "gain"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"experiment": "gain", "status": "complete"}))
    pd.DataFrame({"layer": [0, 1], "head": [1, 2], "gain_entropy": [-0.5, 0.1]}).to_csv(
        run / "gain_summary.csv", index=False)
    (tmp_path / "heads").mkdir()
    head_page_path(tmp_path / "heads", 0, 1).write_text("<html></html>")
    page = build_report(tmp_path)
    assert 'href="heads/L0H1.html"' in page
    assert "heads/L1H2.html" not in page  # no page, no link


# --------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """Head types of all 270 heads of the embedded default model and the page of its strongest
    induction head, on 4 sequences × 48 tokens of the default corpus (one model load)."""
    from spectra_lens.data.corpus import default_corpus, tokenize_documents
    from spectra_lens.head_types import diagnostic_inputs, head_type_scores
    from spectra_lens.models import load_model

    model = load_model()
    text = tokenize_documents(default_corpus(), model.tokenizer, seq_len=48, max_sequences=4,
                              prepend_bos=model.cfg.default_prepend_bos, packing="stream").tokens
    types = head_type_scores(model, diagnostic_inputs(model, text, n_repeated=4, half_len=24))
    layer, head = (int(v) for v in types.loc[types["induction_score"].idxmax(), ["layer", "head"]])
    page = head_page(model, layer, head, text=text, types=types, max_new_tokens=8,
                     model_name="SmolLM2-135M-Instruct")
    path = page.write(tmp_path_factory.mktemp("heads"))
    return types, page, path


def test_head_types_of_every_default_model_head(default_run):
    from spectra_lens.head_types import LABELS, SCORE_COLUMNS

    types, _, _ = default_run
    assert len(types) == 270 and set(types["label"]) <= set(LABELS)
    assert types[list(SCORE_COLUMNS)].notna().all().all()
    assert types[list(SCORE_COLUMNS)].ge(0).all().all() and types[list(SCORE_COLUMNS)].le(1 + 1e-6).all().all()
    # a trained model of this size has induction heads, previous-token heads and sinks
    assert {"induction", "previous-token", "sink"} <= set(types["label"])
    assert types["induction_score"].max() > 0.5


def test_default_model_head_page_renders_every_figure_in_a_headless_browser(default_run, tmp_path):
    from test_report import ARTIFACTS, _browse, _chromium, _parse  # the report's browser helpers

    binary = _chromium()
    _, page, path = default_run
    assert page.label == "induction"
    done = _browse(binary, path, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    dom = _parse(done.stdout)
    status = json.loads(dom.text["spectra-render-status"] or "{}")
    assert set(status) == FIGURES, "not every figure finished plotting"
    for fig_id, s in status.items():
        assert s["error"] is None, f"{fig_id}: {s['error']}"
        assert s["with_data"] >= 1 and s["rendered"] >= s["with_data"], f"{fig_id}: {s}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "head_page.png"
    done = _browse(binary, path, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,5200")
    assert done.returncode == 0 and shot.exists() and shot.stat().st_size > 50_000, done.stderr[-3000:]
