"""The app's handlers as plain functions on a tiny model: edits stay in their session, undo is exact."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny
from explorer import ui
from explorer.editing import EditOptions
from explorer.stats import StatsSpec


@pytest.fixture()
def tiny_app(monkeypatch):
    handle = build_tiny("llama")
    monkeypatch.setattr(ui, "shared_model", lambda name=ui.DEFAULT_MODEL: handle)
    fast = EditOptions(steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))
    monkeypatch.setattr(ui, "EDIT_OPTIONS", fast)
    return handle


def _edit(state, layer=1):
    return ui.run_edit("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris", str(layer), "rome",
                       "The Eiffel Tower is in the city of", "The Louvre is located in the city of",
                       "The Eiffel Tower is", state, progress=lambda *a, **k: None)


def test_edit_panel_compares_and_sessions_do_not_mix(tiny_app, monkeypatch):
    weight = tiny_app.arch.mlp_out_weight(1).detach().clone()
    rows, html, metrics, edits, session = _edit(None)
    assert [r[0] for r in rows] == ["edit", "paraphrase", "neighbour"]
    assert rows[0][3] != rows[0][2]  # P(new) changed
    assert "original model" in html and "edited model" in html
    assert "| before |" in metrics and "ES" in metrics and "NS" in metrics
    assert len(edits) == 1 and edits[0][1] == "The Eiffel Tower"
    assert torch.equal(tiny_app.arch.mlp_out_weight(1), weight), "the shared model must stay unedited between requests"
    trace_args = ("The Eiffel Tower is located in the city of", "The Eiffel Tower", ["hidden"], 2, 2, 3)
    edited = ui.run_trace(*trace_args, session, progress=lambda *a, **k: None)
    other = ui.run_trace(*trace_args, None, progress=lambda *a, **k: None)
    assert "edit(s) of yours" in edited[3] and "edit(s)" not in other[3]
    assert edited[3] != other[3]
    edits, session = ui.undo_edit("", session)  # an empty field: the last edit
    assert edits == []
    again = ui.run_trace(*trace_args, session, progress=lambda *a, **k: None)
    assert again[3] == other[3]  # after undo, the same trace as the unedited model
    with pytest.raises(Exception, match="no edit to undo"):
        ui.undo_edit(None, session)


def test_bad_edit_input_is_a_gradio_error_and_changes_nothing(tiny_app):
    import gradio as gr

    weight = tiny_app.arch.mlp_out_weight(1).detach().clone()
    with pytest.raises(gr.Error, match="does not occur"):
        ui.run_edit("Paris is nice", "Rome", " x", "", 1, "rome", "", "", "", None, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="out of range"):
        ui.run_edit("{} is in", "Paris", " Rome", "", "99", "rome", "", "", "", None, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="layer must be a whole number"):
        ui.run_edit("{} is in", "Paris", " Rome", "", "two", "rome", "", "", "", None, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="edit number must be a whole number"):
        ui.undo_edit("1.5", None)
    assert torch.equal(tiny_app.arch.mlp_out_weight(1), weight)


def test_example_cases_fill_the_edit_fields():
    labels = ui.sample_case_labels()
    assert len(labels) >= 40
    prompt, subject, new, true, paraphrases, neighbours, generate = ui.fill_from_case(labels[0])
    assert "{}" in prompt and subject and new.startswith(" ") and true.startswith(" ")
    assert len(paraphrases.splitlines()) >= 2 and neighbours and generate
