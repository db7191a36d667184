"""Tests for spectra_lens.plots: every figure function on a small hand-made table, save_figure."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from spectra_lens.errors import SpectraError
from spectra_lens.present import figures as figs
from spectra_lens.present.page import plotlyjs_loader, shared_plotlyjs_candidates


def figure_json(html: Path) -> tuple[list[dict], dict]:
    """(traces, layout) of the one figure in a plotly HTML page, parsed from `Plotly.newPlot`."""
    text = html.read_text(encoding="utf-8")
    start = text.index("Plotly.newPlot(") + len("Plotly.newPlot(")
    decoder = json.JSONDecoder()
    rest = text[start:].lstrip()
    _, end = decoder.raw_decode(rest)  # the div id
    rest = rest[end:].lstrip()[1:].lstrip()  # skip ","
    traces, end = decoder.raw_decode(rest)
    rest = rest[end:].lstrip()[1:].lstrip()
    layout, _ = decoder.raw_decode(rest)
    return traces, layout


def _filled(value) -> bool:
    """A trace array holds data: a non-empty list, or plotly's typed array with non-empty bytes."""
    if isinstance(value, dict):  # {"dtype": "f8", "bdata": "..."} (plotly >= 6)
        return bool(value.get("bdata"))
    return value is not None and len(value) > 0


def traces_have_data(traces: list[dict]) -> bool:
    return bool(traces) and all(
        any(_filled(t.get(axis)) for axis in ("x", "y", "z")) for t in traces
    )


@pytest.fixture
def summary() -> pd.DataFrame:
    """Two layers of three heads; head (1, 2) is strong and significant."""
    return pd.DataFrame({
        "layer": [0, 0, 0, 1, 1, 1],
        "head": [0, 1, 2, 0, 1, 2],
        "r_entropy": [-0.1, 0.05, -0.3, 0.0, -0.2, -0.8],
        "partial_r_entropy": [-0.05, 0.02, -0.2, 0.01, -0.1, -0.7],
        "significant": [False, False, True, False, False, True],
    })


@pytest.fixture
def layer_stats() -> pd.DataFrame:
    return pd.DataFrame({"layer": [0, 1], "mean_abs_r": [0.15, 0.33], "std_r": [0.18, 0.4],
                         "frac_significant": [1 / 3, 1 / 3]})


@pytest.fixture
def records() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 200
    frames = []
    for layer, head in [(0, 0), (1, 2)]:
        frames.append(pd.DataFrame({
            "layer": layer, "head": head, "position": np.arange(n) % 20,
            "q_norm": np.exp(rng.standard_normal(n)), "entropy": rng.random(n) * 3,
        }))
    return pd.concat(frames, ignore_index=True)


def test_head_heatmap_puts_each_head_in_its_cell_and_marks_significant(summary):
    fig = figs.head_heatmap(summary, "r_entropy", mark="significant", title="t")
    assert isinstance(fig, go.Figure)
    heat, marks = fig.data
    np.testing.assert_array_equal(np.asarray(heat.z), [[-0.1, 0.05, -0.3], [0.0, -0.2, -0.8]])
    assert list(heat.x) == [0, 1, 2] and list(heat.y) == [0, 1]
    assert sorted(zip(marks.y, marks.x)) == [(0, 2), (1, 2)]
    assert fig.layout.title.text == "t"


def test_head_heatmap_without_mark_and_with_missing_column(summary):
    fig = figs.head_heatmap(summary, "partial_r_entropy")
    assert len(fig.data) == 1 and fig.layout.title.text == "partial_r_entropy"
    with pytest.raises(SpectraError, match="'nope'"):
        figs.head_heatmap(summary, "nope")


def test_r_distribution_has_one_histogram_per_column(summary):
    fig = figs.r_distribution(summary, {"r_entropy": "raw", "partial_r_entropy": "partial"},
                               title="d")
    assert [t.name for t in fig.data] == ["raw", "partial"]
    np.testing.assert_array_equal(np.asarray(fig.data[0].x), summary["r_entropy"])
    with pytest.raises(SpectraError, match="missing"):
        figs.r_distribution(summary, {"missing": "m"}, title="d")


def test_layer_summary_bars(layer_stats):
    fig = figs.layer_summary(layer_stats, title="layers")
    mean_bar, frac_bar = fig.data
    np.testing.assert_allclose(np.asarray(mean_bar.y), [0.15, 0.33])
    np.testing.assert_allclose(np.asarray(mean_bar.error_y.array), [0.18, 0.4])
    np.testing.assert_allclose(np.asarray(frac_bar.y), [1 / 3, 1 / 3])
    # Without the optional spread column there are no error bars, and no error.
    bare = figs.layer_summary(layer_stats.drop(columns="std_r"), title="x")
    assert bare.data[0].error_y.array is None
    with pytest.raises(SpectraError, match="frac_significant"):
        figs.layer_summary(layer_stats.drop(columns="frac_significant"), title="x")


def test_norm_entropy_scatter_one_panel_per_head_and_subsamples(records):
    fig = figs.norm_entropy_scatter(records, [(0, 0), (1, 2)], max_points=50, seed=1)
    assert len(fig.data) == 2
    assert [a.text for a in fig.layout.annotations] == ["L0H0", "L1H2"]
    for trace in fig.data:
        assert len(trace.x) == len(trace.y) == 50
    sub = records[(records["layer"] == 1) & (records["head"] == 2)]
    assert set(np.asarray(fig.data[1].x)) <= set(sub["q_norm"])
    full = figs.norm_entropy_scatter(records, [(0, 0)], y="entropy")
    assert len(full.data[0].x) == 200
    with pytest.raises(SpectraError, match="at least one"):
        figs.norm_entropy_scatter(records, [])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_figure_writes_html_and_plotlyjs_atomically(tmp_path, summary):
    fig = figs.head_heatmap(summary, "r_entropy", mark="significant")
    written = figs.save_figure(fig, tmp_path / "figs" / "heat")
    html = tmp_path / "figs" / "heat.html"
    assert written == [html, html.with_suffix(".json")]
    assert json.loads(html.with_suffix(".json").read_text())["data"][0]["type"] == "heatmap"
    bundle = tmp_path / "figs" / "plotly.min.js"
    assert bundle.stat().st_size > 1_000_000  # the whole plotly.js bundle, for offline viewing
    # the page loads the bundle beside it, else the results tree's one copy above it
    assert plotlyjs_loader(shared_plotlyjs_candidates()) in html.read_text()
    assert shared_plotlyjs_candidates()[0] == "plotly.min.js"
    assert sorted(p.name for p in html.parent.iterdir()) == ["heat.html", "heat.json", "plotly.min.js"]
    traces, layout = figure_json(html)
    assert traces_have_data(traces) and [t["type"] for t in traces] == ["heatmap", "scatter"]
    # Results are readable like any file the user writes (mkstemp would make them 0600).
    assert stat.S_IMODE(html.stat().st_mode) == 0o666 & ~_umask()

    # A second figure reuses the bundle rather than rewriting it.
    before = bundle.stat().st_mtime_ns
    figs.save_figure(figs.r_distribution(summary, {"r_entropy": "r"}, title="r"),
                     tmp_path / "figs" / "dist")
    assert bundle.stat().st_mtime_ns == before
    assert traces_have_data(figure_json(tmp_path / "figs" / "dist.html")[0])


def test_save_figure_writes_html_only_unless_images_are_asked(tmp_path, summary):
    written = figs.save_figure(figs.head_heatmap(summary, "r_entropy"), tmp_path / "h")
    assert written == [tmp_path / "h.html", tmp_path / "h.json"]
    assert all(p.exists() for p in written)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_failed_write_keeps_the_old_figure_and_leaves_no_temp_file(tmp_path, summary, monkeypatch):
    fig = figs.head_heatmap(summary, "r_entropy")
    figs.save_figure(fig, tmp_path / "h")
    old = (tmp_path / "h.html").read_text()

    real = Path.write_text

    def broken(self, data, *args, **kw):  # dies half way through writing the page
        real(self, data[: len(data) // 2], *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(KeyboardInterrupt):
        figs.save_figure(figs.head_heatmap(summary, "partial_r_entropy"), tmp_path / "h")
    assert (tmp_path / "h.html").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.html", "h.json", "plotly.min.js"]


def test_a_dot_in_a_figure_name_is_part_of_the_name(tmp_path):
    """figures named by a scale (kl_alpha_0.5, kl_alpha_0.25) keep their whole name: neither
    loses its tail to a suffix nor overwrites the other; a path's own .html suffix is replaced."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    written = figs.write_figures({"kl_alpha_0.5": fig, "kl_alpha_0.25": fig}, tmp_path, images="none")
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".html", ".json"))
    assert names == ["kl_alpha_0.25.html", "kl_alpha_0.25.json", "kl_alpha_0.5.html", "kl_alpha_0.5.json"]
    assert {p.name for p in written.written} >= set(names)
    assert sorted(p.name for p in figs.save_figure(fig, tmp_path / "one.html", bundle=False)) == [
        "one.html", "one.json"]
