"""The layer sweep: each point is the plain edit at that layer, the MLP row is the trace's, bad input is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from explorer.core.errors import InputError
from explorer.editing import EditOptions, make_request
from explorer.editing.edits import EditSession
from explorer.editing.statistics import StatsSpec
from explorer.studies.compare import Probes
from explorer.studies.sweep import parse_layers, sweep_layers
from explorer.testing import oracle
from explorer.tracing import TraceOptions
from tests.conftest import build_tiny, run_cli, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, SUBJECT = "{} is located in the city of", "The Eiffel Tower"
FAST = ["--stats-corpus", "identity", "--steps", "3"]
PROBES = ["--paraphrase", "Some text. The Eiffel Tower is in the city of", "--neighborhood", "The Louvre is located in the city of",
          "The Colosseum is located in the city of"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_each_point_equals_a_plain_edit_at_that_layer(tiny_folder, tmp_path):
    swept = run_cli("sweep", "--prompt", PROMPT, "--subject", SUBJECT, "--target", " Rome", "--layers", "1-2", *FAST, *PROBES,
                    "--samples", "2", "--model", str(tiny_folder), "--json", str(tmp_path / "sweep.json"), one_thread=True)
    assert swept.returncode == 0, swept.stderr
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [point["layer"] for point in sweep["layers"]] == [1, 2] and len(sweep["mlp_effect"]) == 4
    for point in sweep["layers"]:
        edited = run_cli("edit", "--prompt", PROMPT, "--subject", SUBJECT, "--target", " Rome", "--layer", str(point["layer"]),
                         *FAST, *PROBES, "--model", str(tiny_folder), "--json", str(tmp_path / "edit.json"), one_thread=True)
        assert edited.returncode == 0, edited.stderr
        edit = json.loads((tmp_path / "edit.json").read_text())
        assert point["new_prob"] == edit["after"]["target_new_prob"] and point["true_prob"] == edit["after"]["target_true_prob"]
        assert {key: point[key] for key in ("ES", "PS", "NS")} == {key: edit["metrics"]["after"][key] for key in ("ES", "PS", "NS")}
        assert point["delta_norm"] == pytest.approx(edit["delta_norm"], rel=1e-12)
    # Each layer's edit is made on the model's own weights: the two points differ (no edit stacked on another).
    assert sweep["layers"][0]["delta_norm"] != sweep["layers"][1]["delta_norm"]
    assert sweep["request"]["target_true"] and sweep["peak_layer"] == int(np.argmax(sweep["mlp_effect"]))
    assert sweep["best_layer"] == max(sweep["layers"], key=lambda point: point["score"])["layer"]


def test_mlp_row_is_the_traced_effect_and_points_stream_in_order():
    handle = build_tiny("llama")
    request = make_request(PROMPT, SUBJECT, " Rome")
    options = EditOptions(steps=2, prefixes=((3, 1),), stats=StatsSpec(corpus="identity"))
    seen = []
    result = sweep_layers(EditSession(handle), request, Probes(), [0, 2], options, on_point=seen.append,
                          trace_options=TraceOptions(samples=2, window=1, seed=4))
    expected = oracle.trace(handle.model, handle.tokenizer, request.filled, SUBJECT, kinds=("mlp",), samples=2, window_size=1,
                            noise=3.0, seed=4)
    last_subject = expected.subject_range[1] - 1
    np.testing.assert_allclose(result["mlp_effect"], expected.scores["mlp"][last_subject] - expected.low_score, atol=1e-5)
    assert np.ptp(result["mlp_effect"]) > 1e-4  # ten times the tolerance: the rows are not all alike
    assert seen[0] == {"mlp_effect": result["mlp_effect"]} and seen[1:] == result["layers"]
    assert [point["layer"] for point in result["layers"]] == [0, 2]
    assert all(point["PS"] is None and point["score"] == point["EM"] for point in result["layers"])


@pytest.mark.parametrize("text, layers", [(None, [0, 1, 2, 3]), ("", [0, 1, 2, 3]), ("0-3", [0, 1, 2, 3]), ("2", [2]),
                                          ("1-2,0", [1, 2, 0]), ("1,1,2", [1, 2]), (" 3 , 0 ", [3, 0])])
def test_layer_ranges(text, layers):
    assert parse_layers(text, 4) == layers


@pytest.mark.parametrize("text, message", [("4", "layer 4 does not exist"), ("2-1", "must look like"), ("a", "must look like"),
                                           ("1-2-3", "must look like"), ("-1", "must look like"), ("1,,2", "must look like")])
def test_bad_layer_ranges(text, message):
    with pytest.raises(InputError, match=message):
        parse_layers(text, 4)


@pytest.mark.parametrize("args, message", [
    (["--case", "0", "--prompt", PROMPT], "either --case or"),
    (["--case", "9999"], "no case '9999'"),
    (["--prompt", PROMPT, "--subject", SUBJECT], "give --prompt, --subject and --target"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--target", " Rome", "--layers", "0-40"], "layer 4 does not exist"),
])
def test_bad_sweep_input_is_one_line_and_exit_2(tiny_folder, args, message):
    out = run_cli("sweep", *args, *FAST, "--model", str(tiny_folder), one_thread=True)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()[-1]) < 200, out.stderr
