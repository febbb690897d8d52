"""The heatmaps: labels are escaped text, the subject is marked, the saved page runs no markup from the prompt."""
from explorer.app import plots
from tests.conftest import HOSTILE_MARKUP, hostile_trace_result


def test_heatmap_labels_are_escaped_text_and_subject_is_marked():
    figure = plots.heatmap(hostile_trace_result(), "mlp")
    ticks = list(figure.layout.yaxis.ticktext)
    assert ticks[1] == "&lt;img*" and ticks[4] == " is"
    serialised = figure.to_json()
    assert "<img" not in serialised and "</script>" not in serialised
    assert figure.data[0].zmin == 0.1 and figure.data[0].colorscale[0][1].startswith("rgb")
    page = plots.trace_html(hostile_trace_result())
    assert HOSTILE_MARKUP not in page and page.count("Plotly.newPlot") == 3
