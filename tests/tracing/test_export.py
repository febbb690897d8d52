"""Saving a trace: the JSON reads back exactly, the CSV has every cell with its indirect effect."""
import csv
import io
import json

import numpy as np

from explorer.tracing import export
from tests.conftest import hostile_trace_result


def test_json_round_trip(tmp_path):
    result = hostile_trace_result()
    path = export.write_json(result, tmp_path / "t.json")
    back = export.trace_from_json(json.loads(path.read_text()))
    assert back.tokens == result.tokens and back.subject_range == result.subject_range
    for kind in result.scores:
        assert np.array_equal(back.scores[kind], result.scores[kind])


def test_csv_has_every_cell_with_its_indirect_effect():
    result = hostile_trace_result()
    rows = list(csv.DictReader(io.StringIO(export.trace_to_csv(result))))
    assert len(rows) == 3 * 6 * 3
    row = next(r for r in rows if r["kind"] == "mlp" and r["token_index"] == "2" and r["layer"] == "1")
    assert np.isclose(float(row["probability"]), result.scores["mlp"][2, 1])
    assert np.isclose(float(row["indirect_effect"]), result.scores["mlp"][2, 1] - 0.1)
    assert row["token"] == " src=x" and row["is_subject"] == "1"
