import csv
import io
import json

import numpy as np

from explorer.app import plots
from explorer.tracing import TraceResult, export

HOSTILE = "<img src=x onerror=alert(1)>"


def _result():
    rng = np.random.default_rng(0)
    return TraceResult(
        model="m", prompt=f"{HOSTILE} is in", subject=HOSTILE, subject_guessed=False,
        tokens=["<bos>", "<img", " src=x", " onerror=alert(1)>", " is", " in"], subject_range=(1, 4),
        answer=" </script>", answer_id=7, high_score=0.8, low_score=0.1,
        scores={k: rng.uniform(0.1, 0.8, (6, 3)) for k in ("hidden", "mlp", "attn")},
        noise=3.0, noise_std=3.09, samples=10, window=10, seed=1, seconds=1.5, num_layers=3,
    )


def test_json_round_trip(tmp_path):
    result = _result()
    path = export.write_json(result, tmp_path / "t.json")
    back = export.trace_from_json(json.loads(path.read_text()))
    assert back.tokens == result.tokens and back.subject_range == result.subject_range
    for kind in result.scores:
        assert np.array_equal(back.scores[kind], result.scores[kind])


def test_csv_has_every_cell_with_its_indirect_effect():
    result = _result()
    rows = list(csv.DictReader(io.StringIO(export.trace_to_csv(result))))
    assert len(rows) == 3 * 6 * 3
    row = next(r for r in rows if r["kind"] == "mlp" and r["token_index"] == "2" and r["layer"] == "1")
    assert np.isclose(float(row["probability"]), result.scores["mlp"][2, 1])
    assert np.isclose(float(row["indirect_effect"]), result.scores["mlp"][2, 1] - 0.1)
    assert row["token"] == " src=x" and row["is_subject"] == "1"


def test_heatmap_labels_are_escaped_text_and_subject_is_marked():
    figure = plots.heatmap(_result(), "mlp")
    ticks = list(figure.layout.yaxis.ticktext)
    assert ticks[1] == "&lt;img*" and ticks[4] == " is"
    serialised = figure.to_json()
    assert "<img" not in serialised and "</script>" not in serialised
    assert figure.data[0].zmin == 0.1 and figure.data[0].colorscale[0][1].startswith("rgb")
    page = plots.trace_html(_result())
    assert HOSTILE not in page and page.count("Plotly.newPlot") == 3
