"""The one HTML page builder of the report and the head page (`spectra_lens.present.page`)."""

import json

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from spectra_lens.present.page import SVG_POINTS, Figures, document, figure_title, script_json


def _data(page: str) -> dict:
    return json.loads(page.split('id="spectra-figure-data">', 1)[1].split("</script>", 1)[0])


def test_script_json_cannot_close_the_script():
    text = script_json({"a": "</script><!-- & x"})
    assert "</" not in text and "<!--" not in text and "&" not in text
    assert json.loads(text) == {"a": "</script><!-- & x"}


def test_figure_ids_are_unique_and_small_webgl_scatters_become_svg():
    figs = Figures()
    small = go.Figure(go.Scattergl(x=np.arange(10.0), y=np.arange(10.0)))
    large = go.Figure(go.Scattergl(x=np.zeros(SVG_POINTS + 1), y=np.zeros(SVG_POINTS + 1)))
    first = figs.div(small, "fig-a", "small")
    second = figs.div(json.loads(large.to_json()), "fig-a", "large")
    assert 'id="fig-a"' in first and 'id="fig-a-2"' in second
    assert figs.specs["fig-a"]["data"][0]["type"] == "scatter"
    assert figs.specs["fig-a-2"]["data"][0]["type"] == "scattergl"


def test_several_panels_span_the_row_and_titles_lose_markup():
    from plotly.subplots import make_subplots

    two = make_subplots(rows=1, cols=2)
    two.add_trace(go.Scatter(y=[1, 2]), row=1, col=1)
    two.add_trace(go.Scatter(y=[2, 1]), row=1, col=2)
    figs = Figures()
    assert figs.div(two, "two", "c").startswith('<figure class="wide">')
    assert figs.div(go.Figure(go.Scatter(y=[1])), "one", "c").startswith("<figure><div")
    assert figure_title({"layout": {"title": {"text": "a<br>b"}}}, "d") == "a b"
    assert figure_title({"layout": {}}, "d") == "d"


def test_document_holds_every_figure_plotlyjs_once_and_the_render_status():
    figs = Figures()
    body = figs.div(go.Figure(go.Bar(y=[1, 2])), "fig-bar", "bars")
    page = document("t <1>", body, figs, css=".x{color:red}")
    assert "<title>t &lt;1&gt;</title>" in page and ".x{color:red}</style>" in page
    assert page.count(get_plotlyjs()[:200]) == 1
    assert '<div id="spectra-render-status"></div>' in page and "spectra-render-status" in page.split("<script>")[-1]
    assert list(_data(page)) == ["fig-bar"]
    linked = document("t", body, figs, plotlyjs="plotly.min.js")
    assert '<script src="plotly.min.js"></script>' in linked and get_plotlyjs()[:200] not in linked


def test_long_titles_are_wrapped_to_the_figure_width_and_get_room():
    title = "r(ln‖q‖, entropy) per head (dots: significant, document-clustered test)"
    figs = Figures()
    figs.div(go.Figure(go.Heatmap(z=[[1, 2]]), layout=dict(title=title)), "long", "c")
    layout = figs.specs["long"]["layout"]
    lines = layout["title"]["text"].split("<br>")
    assert len(lines) == 2 and " ".join(lines) == title
    assert all(len(line) <= 52 for line in lines) and layout["margin"]["t"] >= 50 + 22 * 2
    figs.div(go.Figure(go.Heatmap(z=[[1, 2]]), layout=dict(title="short")), "short", "c")
    assert figs.specs["short"]["layout"]["title"]["text"] == "short"
    assert "margin" not in figs.specs["short"]["layout"] or "t" not in figs.specs["short"]["layout"]["margin"]
