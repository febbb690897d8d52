"""The app's handlers as plain functions on a tiny model: edits stay in their session, undo is exact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.app import ui
from explorer.app.caches import BoundedCache
from explorer.app.limits import AppLimits
from explorer.core.models import DEFAULT_MODEL
from explorer.editing import EditOptions
from explorer.editing.statistics import StatsSpec
from explorer.tracing import export
from tests.conftest import build_tiny, traced_scores


@pytest.fixture()
def tiny_app(monkeypatch):
    handle = build_tiny("llama")
    monkeypatch.setattr(ui.sessions, "shared_model", lambda name=DEFAULT_MODEL, progress=None: handle)
    fast = EditOptions(steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))
    monkeypatch.setattr(ui.config, "EDIT_OPTIONS", fast)
    monkeypatch.setattr(ui.config, "TRACE_CACHE", BoundedCache(32))  # the same tiny model in every test: no repeats across tests
    return handle


QUIET = {"progress": lambda *a, **k: None}


def traced(*args, **kwargs):
    """The trace handler's final outputs (it streams partial heatmaps before them)."""
    return list(ui.run_trace(*args, **kwargs))[-1]


def edited(*args, **kwargs):
    """The edit handler's final outputs (it fills the panel in stages before them)."""
    return list(ui.run_edit(*args, **kwargs))[-1]


def _edit(workspace, layer=1):
    return edited("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris", str(layer), "rome",
                       "The Eiffel Tower is in the city of", "The Louvre is located in the city of",
                       "The Eiffel Tower is", workspace, **QUIET)


def test_edit_panel_compares_and_sessions_do_not_mix(tiny_app, monkeypatch):
    weight = tiny_app.arch.mlp_out_weight(1).detach().clone()
    mine, other = ui.Workspace(), ui.Workspace()
    rows, bars, html, metrics, edits, mine, health = _edit(mine)
    assert [r[0] for r in rows] == ["edit", "paraphrase", "neighbour"]
    assert rows[0][3] != rows[0][2]  # P(new) changed
    assert [bar.name for bar in bars.data] == ["P(new) before", "P(new) after", "P(true) before", "P(true) after"]
    assert list(bars.data[1].y) == [r[3] for r in rows]
    assert "original model" in html and "edited model" in html
    assert "| before |" in metrics and "ES" in metrics and "NS" in metrics
    assert "decoded ES" in metrics and "decoded PS" in metrics and "decoded NS" in metrics  # beside teacher-forced
    assert len(edits) == 1 and edits[0][1:3] == ["on", "The Eiffel Tower"]
    assert "Model health" in health and "‖ΔW‖/‖W‖" in health
    assert torch.equal(tiny_app.arch.mlp_out_weight(1), weight), "the shared model must stay unedited between requests"
    trace_args = ("The Eiffel Tower is located in the city of", "The Eiffel Tower", ["hidden", "mlp"], 2, 2, 3)
    edited = traced(*trace_args, mine, **QUIET)
    unedited = traced(*trace_args, other, **QUIET)
    assert "edit(s) of yours" in edited[3] and "edit(s)" not in unedited[3]
    assert traced_scores(edited) != traced_scores(unedited)
    assert sorted(Path(p).suffix for p in edited[5]) == [".csv", ".json", ".npz", ".npz"]
    assert edited[6] == str(ui.peak_mlp_layer(export.trace_from_json(json.loads(Path(edited[5][0]).read_text()))))
    # original vs edited on the same noise: the original side equals the other session's unedited trace
    compared = ui.compare_traces("{} is located in the city of", "The Eiffel Tower", " Rome", ["hidden"], 2, 2, 3, mine, **QUIET)
    original_z, edited_z, unedited_z = (np.asarray(figure["value"].data[0].z) for figure in (compared[0], compared[3], unedited[0]))
    assert np.allclose(original_z, unedited_z, atol=1e-6) and not np.allclose(edited_z, original_z, atol=1e-6)
    assert compared[1]["visible"] is False and compared[4]["visible"] is False  # mlp was not asked for
    assert "1 edit(s) active" in ui.complete_prompts("The Eiffel Tower is", 30, mine)
    edits, mine = ui.undo_edit("", mine)  # an empty field: the last edit
    assert edits == []
    again = traced(*trace_args, mine, **QUIET)
    assert traced_scores(again) == traced_scores(unedited)  # after undo, the same trace as the unedited model
    with pytest.raises(Exception, match="no edit to undo"):
        ui.undo_edit(None, mine)
    with pytest.raises(Exception, match="no active edits"):
        ui.compare_traces("{} is in", "The Eiffel Tower", " Rome", ["hidden"], 2, 2, 3, mine, **QUIET)


def test_the_reference_choice_edits_with_every_reference_setting(tiny_app):
    weight = tiny_app.arch.mlp_out_weight(1).detach().clone()
    workspace = ui.Workspace()
    edited("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris", "1", "reference settings",
                "", "", "", workspace, **QUIET)
    edit = workspace.session.edits[-1]
    assert edit.method == "rome-original" and edit.stats["settings"] == "reference" and edit.stats["strengthen"] is False
    assert edit.stats["clamp_factor"] == 4.0 and len(edit.stats["value_losses"]) <= 20
    assert torch.equal(tiny_app.arch.mlp_out_weight(1), weight)


def test_bad_edit_input_is_a_gradio_error_and_changes_nothing(tiny_app, monkeypatch):
    import gradio as gr

    weight = tiny_app.arch.mlp_out_weight(1).detach().clone()
    workspace = ui.Workspace()
    bad_edits = [
        (("Paris is nice", "Rome", " x", "", 1, "rome", "", "", ""), "does not occur"),
        (("{} is in", "Paris", " Rome", "", "99", "rome", "", "", ""), "out of range"),
        (("{} is in", "Paris", " Rome", "", "two", "rome", "", "", ""), "layer must be a whole number"),
        (("{} is in", "Paris", " Rome", "", "", "rome", "a\n" * 21, "", ""), "21 paraphrases given, over the limit of 20"),
        (("{} is in", "Paris", " Rome", "", "", "rome", "", "word " * 200, ""), "over the limit of 64"),
        (("{} is in", "Paris", " Rome", "", "", "magic", "", "", ""), "method"),
    ]
    for args, message in bad_edits:
        with pytest.raises(gr.Error, match=message):
            edited(*args, workspace, **QUIET)
    with pytest.raises(gr.Error, match="edit number must be a whole number"):
        ui.undo_edit("1.5", workspace)
    bad_traces = [
        ((["hidden"], "0", 2, 3), "samples"),
        ((["hidden"], "1e6", 2, 3), "samples"),
        ((["mlp"], 2, "0", 3), "window"),
        ((["hidden"], 2, 2, "-1"), "noise"),
        ((["hidden"], "x", 2, 3), "samples must be a whole number"),
        (([], 2, 2, 3), "at least one kind"),
        ((["nonsense"], 2, 2, 3), "kind"),
    ]
    for (kinds, samples, window, noise), message in bad_traces:
        with pytest.raises(gr.Error, match=message):
            traced("The Eiffel Tower is in", "The Eiffel Tower", kinds, samples, window, noise, workspace, **QUIET)
    monkeypatch.setattr(ui.config, "LIMITS", AppLimits(max_edits=1))
    _edit(workspace)
    with pytest.raises(gr.Error, match="1 edits are active, the limit"):
        _edit(workspace)
    assert torch.equal(tiny_app.arch.mlp_out_weight(1), weight)


def test_cancel_stops_the_job_and_leaves_the_model_unedited(tiny_app):
    import gradio as gr

    workspace = ui.Workspace()
    _edit(workspace)
    weight = tiny_app.arch.mlp_out_weight(1).detach().clone()

    def press_cancel(*args, **kwargs):  # the user presses cancel while the first progress step is reported
        ui.cancel_job(workspace)

    with pytest.raises(gr.Error, match="cancelled"):
        traced("The Eiffel Tower is in", "The Eiffel Tower", ["hidden"], 2, 2, 3, workspace, progress=press_cancel)
    with pytest.raises(gr.Error, match="cancelled"):
        _edit_with_progress(workspace, press_cancel)
    assert torch.equal(tiny_app.arch.mlp_out_weight(1), weight)
    assert len(workspace.session.edits) == 1
    traced("The Eiffel Tower is in", "The Eiffel Tower", ["hidden"], 2, 2, 3, workspace, **QUIET)  # the flag is cleared


def _edit_with_progress(workspace, progress):
    return edited("{} is located in", "The Eiffel Tower", " Rome", " Paris", "1", "rome", "", "", "", workspace, progress=progress)


def test_average_and_severed_panels_draw_the_figures(tiny_app, tmp_path):
    import gradio as gr

    workspace = ui.Workspace()
    facts = [{"known_id": i, "subject": s, "attribute": "x", "template": "{} is in", "prediction": "x",
              "prompt": f"{s} is in", "relation_id": "P1"} for i, s in enumerate(["The Eiffel Tower", "The Louvre"])]
    upload = tmp_path / "facts.json"
    upload.write_text(json.dumps(facts))
    # Take the tiny model's own greedy answers as the facts' attributes, so that both are "known".
    from explorer.core.scoring import top_prediction

    for fact in facts:
        fact["attribute"] = tiny_app.tokenizer.decode([top_prediction(tiny_app, fact["prompt"])]).strip()
    upload.write_text(json.dumps(facts))
    trace_downloads = traced("The Eiffel Tower is located in the city of", "The Eiffel Tower", ["hidden"], 2, 2, 3,
                             workspace, **QUIET)[5]
    figure, summary, path = ui.run_average(str(upload), 2, ["hidden", "mlp"], 2, workspace, **QUIET)
    saved = json.loads(Path(path).read_text())
    assert saved["facts_total"] == 2 and "2 of 2" in summary
    assert {t.name.split(" (n=")[0] for t in figure.data if t.name} >= {"last subject token", "last token"}
    average_path = path
    figure, summary, path = ui.run_severed(str(upload), 2, 2, workspace, **QUIET)
    # The Trace tab's and the Average panel's links, still on the page, keep working (bug 2 of issue 27).
    assert all(Path(link).is_file() for link in [*trace_downloads, average_path, path])
    assert {t.name.split(" (n=")[0] for t in figure.data if t.name} == {"ordinary", "mlp severed", "attn severed"}
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(gr.Error, match="not valid UTF-8 JSON"):
        ui.run_average(str(tmp_path / "bad.json"), 2, ["hidden"], 2, workspace, **QUIET)
    with pytest.raises(gr.Error, match="between 1 and 100"):
        ui.run_average(None, 1000, ["hidden"], 2, workspace, **QUIET)


def test_limits_come_from_the_environment():
    from explorer.app.limits import AppLimits, documented_defaults

    assert AppLimits.from_env({"ROME_EXPLORER_MAX_SAMPLES": "7", "ROME_EXPLORER_QUEUE": "3"}) == AppLimits(max_samples=7, queue_size=3)
    assert AppLimits.from_env({}).trace.max_samples == 50
    with pytest.raises(ValueError, match="ROME_EXPLORER_MAX_FACTS must be a whole number"):
        AppLimits.from_env({"ROME_EXPLORER_MAX_FACTS": "-3"})
    documented = (Path(__file__).resolve().parents[3] / "SECURITY.md").read_text()
    for variable, default in documented_defaults().items():
        assert f"`{variable}` | {default:,} |" in documented, variable


def test_each_cap_is_read_from_its_own_variable():
    from dataclasses import fields, replace

    from explorer.app.limits import ENVIRONMENT, AppLimits

    assert sorted(ENVIRONMENT.values()) == sorted(f.name for f in fields(AppLimits))  # every cap has one variable
    for variable, name in ENVIRONMENT.items():
        assert AppLimits.from_env({variable: "7"}) == replace(AppLimits(), **{name: 7}), variable


def _over_the_cap(variable: str, tmp_path: Path, workspace):
    """The request just over the cap ``variable`` sets (to 3), run through the handlers."""
    prompt = "The Eiffel Tower is located in the city of"
    requests = {
        "ROME_EXPLORER_MAX_PROMPT_TOKENS": lambda: traced(prompt, "The Eiffel Tower", ["hidden"], 2, 2, 3, workspace, **QUIET),
        "ROME_EXPLORER_MAX_SAMPLES": lambda: traced(prompt, "The Eiffel Tower", ["hidden"], 4, 2, 3, workspace, **QUIET),
        "ROME_EXPLORER_MAX_WINDOW": lambda: traced(prompt, "The Eiffel Tower", ["mlp"], 2, 4, 3, workspace, **QUIET),
        "ROME_EXPLORER_MAX_PROMPTS": lambda: edited("{} is in", "The Eiffel Tower", " Rome", "", "1", "rome", "a\nb\nc\nd", "",
                                                    "", workspace, **QUIET),
        "ROME_EXPLORER_MAX_NEW_TOKENS": lambda: ui.complete_prompts("The Eiffel Tower is", 4, workspace),
        "ROME_EXPLORER_MAX_FACTS": lambda: ui.run_average(None, 4, ["hidden"], 2, workspace, **QUIET),
        "ROME_EXPLORER_MAX_UPLOAD_BYTES": lambda: ui.run_average(_upload(tmp_path), 1, ["hidden"], 2, workspace, **QUIET),
        "ROME_EXPLORER_MAX_EDITS": lambda: [_edit(workspace) for _ in range(4)],
    }
    return requests[variable]()


def _upload(tmp_path: Path) -> str:
    """A valid fact set of one fact (its cap is set to its size less one)."""
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([{"subject": "The Eiffel Tower", "prompt": "The Eiffel Tower is located in the city of",
                                 "attribute": " Paris"}]))
    return str(path)


# Each cap set to 3 through its variable, and the message the request just over it gets.
CAP_REQUESTS = {
    "ROME_EXPLORER_MAX_PROMPT_TOKENS": "over the limit of 3",
    "ROME_EXPLORER_MAX_SAMPLES": "samples",
    "ROME_EXPLORER_MAX_WINDOW": "window",
    "ROME_EXPLORER_MAX_PROMPTS": "4 paraphrases given, over the limit of 3",
    "ROME_EXPLORER_MAX_NEW_TOKENS": "new tokens must be between 1 and 3",
    "ROME_EXPLORER_MAX_FACTS": "between 1 and 3, got 4",
    "ROME_EXPLORER_MAX_UPLOAD_BYTES": "bytes, over the limit of",
    "ROME_EXPLORER_MAX_EDITS": "3 edits are active, the limit",
}


@pytest.mark.parametrize("variable", sorted(CAP_REQUESTS))
def test_each_request_cap_set_by_its_variable_refuses_the_request_just_over_it(variable, tiny_app, tmp_path, monkeypatch):
    import gradio as gr

    from explorer.app.limits import AppLimits

    workspace = ui.Workspace()
    value = "3"
    if variable == "ROME_EXPLORER_MAX_UPLOAD_BYTES":
        value = str(Path(_upload(tmp_path)).stat().st_size - 1)
    monkeypatch.setattr(ui.config, "LIMITS", AppLimits.from_env({variable: value}))
    weight = tiny_app.arch.mlp_out_weight(1).detach().clone()
    with pytest.raises(gr.Error, match=CAP_REQUESTS[variable]):
        _over_the_cap(variable, tmp_path, workspace)
    assert len(workspace.session.edits) == (3 if variable == "ROME_EXPLORER_MAX_EDITS" else 0)
    assert torch.equal(tiny_app.arch.mlp_out_weight(1), weight)


def test_the_queue_running_and_upload_caps_reach_gradio(tiny_app, monkeypatch):
    from explorer.app.limits import AppLimits

    monkeypatch.setattr(ui.config, "LIMITS", AppLimits.from_env({"ROME_EXPLORER_QUEUE": "5", "ROME_EXPLORER_MAX_RUNNING": "3",
                                                                 "ROME_EXPLORER_MAX_UPLOAD_BYTES": "1234"}))
    demo = ui.queued_app()
    assert demo._queue.max_size == 5
    model_jobs = [fn for fn in demo.fns.values() if fn.concurrency_id == "model-jobs"]
    assert {fn.api_name for fn in model_jobs} == {"trace", "inspect", "edit", "toggle", "sweep", "compare", "complete",
                                                  "average", "severed"}
    assert {fn.concurrency_limit for fn in model_jobs} == {3}
    assert ui.launch_settings() == {"max_file_size": 1234}


def test_example_cases_fill_the_edit_fields():
    labels = ui.sample_case_labels()
    assert len(labels) >= 40
    prompt, subject, new, true, paraphrases, neighbours, generate = ui.fill_from_case(labels[0])
    assert "{}" in prompt and subject and new.startswith(" ") and true.startswith(" ")
    assert len(paraphrases.splitlines()) >= 2 and neighbours and generate


def _resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _live_tensor_bytes() -> int:
    """Bytes held by every tensor the garbage collector can reach (each storage counted once)."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # tensors without storage (sparse, freed weak proxies)
            continue
    return sum(storages.values())


CYCLES = 50


@pytest.mark.parametrize("leak", [False, True], ids=["as-is", "leaking-a-copy-per-cycle"])
def test_memory_stays_flat_over_many_trace_edit_undo_cycles(tiny_app, leak):
    """50 trace + edit + cancelled trace + undo cycles keep no tensors alive, nor grow resident memory.

    Both bounds are a fraction of the model's own size (the allocator keeps some slack in resident memory,
    hence its looser bound). With ``leak``, each cycle keeps one copy of the model's weights, and both bounds
    must catch it: that is the leak SECURITY.md says they catch.
    """
    import gradio as gr

    workspace = ui.Workspace()
    weight = tiny_app.arch.mlp_out_weight(1).detach().clone()
    model_bytes = sum(p.numel() * p.element_size() for p in tiny_app.model.parameters())

    leaked = []

    def cycle():
        traced("The Eiffel Tower is located in", "The Eiffel Tower", ["hidden", "mlp"], 3, 2, 3, workspace, **QUIET)
        _edit(workspace)
        if leak:
            leaked.append([p.detach().clone() for p in tiny_app.model.parameters()])
        with pytest.raises(gr.Error, match="cancelled"):
            traced("The Eiffel Tower is in", "The Eiffel Tower", ["attn"], 3, 2, 3, workspace,
                         progress=lambda *a, **k: ui.cancel_job(workspace))
        ui.undo_edit("", workspace)

    for _ in range(5):  # warm-up: caches, allocator pools and lazily imported modules settle
        cycle()
    tensors, resident = _live_tensor_bytes(), _resident_mb()
    for _ in range(CYCLES):
        cycle()
    tensor_growth, resident_growth = _live_tensor_bytes() - tensors, _resident_mb() - resident
    print(f"over {CYCLES} cycles, model {model_bytes / 2**20:.2f} MB: live tensors {tensor_growth / 2**20:+.2f} MB, "
          f"resident {resident_growth:+.1f} MB")
    if leak:
        assert tensor_growth >= 0.5 * model_bytes and resident_growth * 2**20 >= 20 * model_bytes
        leaked.clear()
    else:
        assert tensor_growth < 0.5 * model_bytes, f"live tensors grew by {tensor_growth / 2**20:.2f} MB"
        assert resident_growth * 2**20 < 20 * model_bytes, f"resident memory grew by {resident_growth:.1f} MB"
    assert torch.equal(tiny_app.arch.mlp_out_weight(1), weight) and workspace.session.edits == []


def test_model_field_loads_a_folder_and_failures_say_why(tmp_path, monkeypatch):
    """The real loader behind the model field: a local folder loads, a missing one is a clear error, nothing breaks."""
    import gradio as gr

    from tests.conftest import build_tiny

    tiny = build_tiny("gpt2")
    tiny.model.save_pretrained(tmp_path / "gpt2")
    tiny.tokenizer.save_pretrained(tmp_path / "gpt2")
    monkeypatch.setattr(ui.sessions, "_models", type(ui.sessions._models)())
    workspace = ui.Workspace()
    status, edits, workspace, _poll = ui.load_session_model(str(tmp_path / "gpt2"), workspace, **QUIET)
    assert "gpt2, 4 layers" in status and edits == [] and workspace.session.handle.arch.model_type == "gpt2"
    assert ui.sessions._preparations[str(tmp_path / "gpt2")].wait(120).running is False
    status, poll = ui.status_line(workspace)  # the loaded model's first edit is prepared in the background
    # A random model knows no fact to choose its edit layer from: the line says so, and the poll stops.
    assert "gpt2, 4 layers" in status and "could not prepare: the model completes none" in status, status
    assert poll.active is False, "the status poll stops once the preparation is done"
    with pytest.raises(gr.Error, match="could not find model"):
        ui.load_session_model(str(tmp_path / "missing"), workspace, **QUIET)
    assert workspace.session.handle.arch.model_type == "gpt2"  # still on the model it had
    monkeypatch.setenv("ROME_EXPLORER_MODELS", "gpt2")
    with pytest.raises(gr.Error, match="only loads"):
        ui.load_session_model(str(tmp_path / "gpt2"), workspace, **QUIET)


HOSTILE_TRACES = [
    ("", "", "prompt is empty"),
    ("   \n\t ", "", "prompt is empty"),
    ("The Eiffel Tower is located in", "The Louvre", "does not occur"),
    ("The Eiffel Tower", "The Eiffel Tower", "the subject is the whole prompt"),
    ("the tower is tall and located in", "", "could not guess the subject"),
    ("The Eiffel Tower is located in " + "the city of " * 40, "The Eiffel Tower", "over the limit of 64"),
    ("The Eiffel\x00 Tower is in", "The Eiffel\x00 Tower", "control characters"),
    ("The Eiffel Tower\x1b[31m is in", "The Eiffel Tower", "control characters"),
]
FRIENDLY_TRACES = [  # unusual but legitimate text: traced, shown as text
    ("Der Eiffelturm 🗼 steht in", "Der Eiffelturm 🗼"),
    ("برج إيفل يقع في", "برج إيفل"),
    ("The \u202eEiffel Tower is in", "\u202eEiffel Tower"),
    ("The <img src=x onerror=alert(1)> is in", "<img src=x onerror=alert(1)>"),
]


@pytest.mark.parametrize("prompt, subject, message", HOSTILE_TRACES)
def test_hostile_prompts_are_one_line_errors(tiny_app, prompt, subject, message):
    import gradio as gr

    workspace = ui.Workspace()
    with pytest.raises(gr.Error, match=message) as error:
        traced(prompt, subject, ["hidden"], 2, 2, 3, workspace, **QUIET)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("prompt, subject", FRIENDLY_TRACES)
def test_unicode_prompts_trace_and_their_labels_are_escaped(tiny_app, prompt, subject):
    workspace = ui.Workspace()
    figures = traced(prompt, subject, ["hidden"], 2, 2, 3, workspace, **QUIET)
    figure = figures[0]["value"]
    labels = "".join(figure.layout.yaxis.ticktext)
    assert "<img" not in labels and "<" not in "".join(str(t) for row in figure.data[0].text for t in row).replace("<br>", "")


def test_the_model_context_caps_the_prompt(tiny_app, monkeypatch):
    import gradio as gr

    monkeypatch.setattr(ui.config, "LIMITS", AppLimits(max_prompt_tokens=10_000))
    monkeypatch.setattr(tiny_app.model.config, "max_position_embeddings", 12)
    with pytest.raises(gr.Error, match="over the limit of 12"):
        traced("The Eiffel Tower is located in the city of Paris in France", "The Eiffel Tower", ["hidden"], 2, 2, 3,
                     ui.Workspace(), **QUIET)


def test_trace_streams_its_heatmaps_and_repeats_come_from_the_cache(tiny_app, monkeypatch):
    from explorer.tracing import scheduling

    monkeypatch.setattr(ui.config, "STREAM_SECONDS", 0.0)  # every partial result reaches the page
    monkeypatch.setattr(scheduling, "STREAM_ROWS", 8)  # where score_cells reads it
    workspace = ui.Workspace()
    args = ("The Eiffel Tower is located in the city of", "The Eiffel Tower", ["hidden", "mlp", "attn"], 2, 3, 3)
    updates = list(ui.run_trace(*args, workspace, **QUIET))
    assert len(updates) >= 4
    # First the attribution-patching estimate, on its own scale, while the last trace's exact maps are cleared.
    estimates = [update for update in updates if update[0].get("visible") is False]
    assert estimates == updates[: len(estimates)] and len(estimates) == 2
    for estimate in estimates:
        assert estimate[3].endswith("computing the exact trace") and "Estimate" in estimate[11]
        assert all("ESTIMATE" in figure["value"].layout.title.text for figure in estimate[8:11])
    # The cheaper estimate comes first: MLP's (integrated-2 on total gradients, 2 passes; ties broken by name) before
    # hidden and attention's (one-step, with attention's window members cut: 1 + one pass per window end).
    mlp_estimates = [np.asarray(estimate[9]["value"].data[0].z, dtype=float) for estimate in estimates]
    assert not np.isnan(mlp_estimates[0]).any() and not np.isnan(mlp_estimates[1]).any()
    hidden_estimates = [np.asarray(estimate[8]["value"].data[0].z, dtype=float) for estimate in estimates]
    assert np.isnan(hidden_estimates[0]).all() and not np.isnan(hidden_estimates[1]).any()
    exact = updates[len(estimates)]
    first = np.asarray(exact[1]["value"].data[0].z, dtype=float)  # then the exact MLP heatmap, first cells
    assert np.isnan(first).any() and not np.isnan(first).all(), "cells not computed yet are drawn empty, computed ones drawn"
    assert "computing:" in exact[3] and exact[5] == {"__type__": "update"} and exact[8] == {"__type__": "update"}
    final = updates[-1]
    assert "Estimate vs exact trace" in final[11] and final[11].count("| hidden |") == 1
    expected = traced_scores(final)  # read now: the session's next result replaces its download folder
    assert "computing" not in final[3]
    assert not any(np.isnan(np.asarray(figure["value"].data[0].z, dtype=float)).any() for figure in final[:3])
    # The same trace again, from another session on the same unedited model: from the cache, not the engine.
    monkeypatch.setattr(ui.trace_handlers, "trace", lambda *a, **k: (_ for _ in ()).throw(AssertionError("traced again")))
    again = list(ui.run_trace(*args, ui.Workspace(), **QUIET))
    assert len(again) == 1 and traced_scores(again[0]) == expected
    _edit(workspace)  # the session's edit is part of the key: its model is another one
    with pytest.raises(AssertionError, match="traced again"):
        list(ui.run_trace(*args, workspace, **QUIET))
    other_options = (*args[:3], 3, 3, 3)
    with pytest.raises(AssertionError, match="traced again"):
        list(ui.run_trace(*other_options, ui.Workspace(), **QUIET))
    ui.undo_edit("", workspace)
    assert traced_scores(list(ui.run_trace(*args, workspace, **QUIET))[-1]) == expected


def test_an_edit_switched_off_is_kept_but_not_applied_and_health_follows(tiny_app):
    workspace = ui.Workspace()
    trace_args = ("The Eiffel Tower is located in the city of", "The Eiffel Tower", ["mlp"], 2, 2, 3)
    # Each result's download folder replaces the last one: its scores are read at once.
    unedited = traced_scores(traced(*trace_args, workspace, **QUIET))
    *_, health_on = _edit(workspace)
    edited = traced_scores(traced(*trace_args, workspace, **QUIET))
    rows, health_off, workspace = ui.toggle_edit("1", workspace)
    assert rows[0][1] == "off" and len(rows) == 1
    off = traced(*trace_args, workspace, **QUIET)
    assert traced_scores(off) == unedited != edited and "edit(s) of yours" not in off[3]
    assert health_off.endswith("‖ΔW‖/‖W‖ 0") and not health_on.split("\n")[0].endswith("‖ΔW‖/‖W‖ 0")
    with pytest.raises(Exception, match="no active edits"):
        ui.compare_traces("{} is located in the city of", "The Eiffel Tower", " Rome", ["mlp"], 2, 2, 3, workspace, **QUIET)
    rows, _health, workspace = ui.toggle_edit("", workspace)  # empty: the last edit, switched on again
    assert rows[0][1] == "on" and traced_scores(traced(*trace_args, workspace, **QUIET)) == edited
    with pytest.raises(Exception, match="no edit number"):
        ui.toggle_edit("3", workspace)


def test_layer_sweep_streams_its_points_and_ends_with_every_layer(tiny_app):
    from explorer.app.ui import sweep_handlers

    updates = list(sweep_handlers.run_sweep("{} is located in the city of", "The Eiffel Tower", " Rome", "", "",
                                            "The Louvre is located in the city of", "rome", "1-3", 2, ui.Workspace(), **QUIET))
    figure, rows, summary = updates[-1]
    assert [row[0] for row in rows] == [1, 2, 3] and "Traced MLP peak" in summary and "Best edit" in summary
    assert len(figure.data[0].y) == tiny_app.num_layers and list(figure.data[1].x) == [1, 2, 3]
    with pytest.raises(Exception, match="layer 9 does not exist"):
        list(sweep_handlers.run_sweep("{} is in", "The Eiffel Tower", " Rome", "", "", "", "rome", "9", 2, ui.Workspace(), **QUIET))


def test_the_sweep_traces_under_the_caps_the_operator_set(tiny_app, monkeypatch):
    """Caps raised by the operator hold for the sweep's trace too, not only for its handler's check (bug 6 of issue 27):
    60 samples pass where the default cap is 50, and a cap set lower is what the refusal quotes."""
    from explorer.app.ui import sweep_handlers

    def sweep(samples):
        return list(sweep_handlers.run_sweep("{} is located in the city of", "The Eiffel Tower", " Rome", "", "", "", "rome",
                                             "1", samples, ui.Workspace(), **QUIET))[-1]

    monkeypatch.setattr(ui.config, "LIMITS", AppLimits(max_samples=60))
    _figure, rows, _summary = sweep(60)
    assert [row[0] for row in rows] == [1]
    monkeypatch.setattr(ui.config, "LIMITS", AppLimits(max_samples=5))
    with pytest.raises(Exception, match="between 1 and 5") as refused:
        sweep(6)
    assert "50" not in str(refused.value)


def test_cancel_stops_a_sweep_even_after_another_job_started(tiny_app, monkeypatch):
    """Cancel stops every running job of the session: a trace started during a sweep (it waits for the sweep, its
    visitor's jobs run in order) does not take the sweep's cancel flag away, so the sweep's worker stops editing
    (bug 1 of issue 27), and the waiting trace is cancelled too; the next trace runs."""
    import threading
    import time

    from explorer.app.ui import sweep_handlers
    from explorer.studies import sweep as sweep_study

    started, gate = [], threading.Event()
    original = sweep_study.sweep_point

    def slow_point(*args, **kwargs):
        started.append(args[3].layer)
        gate.wait(10)  # the first point waits until the test has started a trace and pressed Cancel
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep_study, "sweep_point", slow_point)
    workspace, outcome = ui.Workspace(), []

    def run() -> None:
        try:
            list(sweep_handlers.run_sweep("{} is located in the city of", "The Eiffel Tower", " Rome", "", "", "", "rome",
                                          "0-3", 2, workspace, **QUIET))
            outcome.append("finished")
        except Exception as error:  # noqa: BLE001 - the handler reports the cancel as a Gradio error
            outcome.append(str(error))

    sweeping = threading.Thread(target=run, daemon=True)
    sweeping.start()
    deadline = time.monotonic() + 30
    while not started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started == [0]
    places, trace_outcome = [], []

    def trace_meanwhile() -> None:
        try:
            traced("The Eiffel Tower is located in the city of", "The Eiffel Tower", ["hidden"], 2, 2, 3, workspace,
                   progress=lambda fraction, desc="": places.append(desc))
            trace_outcome.append("finished")
        except Exception as error:  # noqa: BLE001
            trace_outcome.append(str(error))

    tracing = threading.Thread(target=trace_meanwhile, daemon=True)
    tracing.start()
    while not places and time.monotonic() < deadline:
        time.sleep(0.02)
    assert places[:1] == ["waiting: 1 job ahead of yours"]  # its own visitor's sweep goes first
    ui.cancel_job(workspace)
    gate.set()
    sweeping.join(30)
    tracing.join(30)
    assert len(outcome) == 1 and "cancelled" in outcome[0]
    assert len(trace_outcome) == 1 and "cancelled" in trace_outcome[0]
    time.sleep(1.0)  # long enough for a worker that was not stopped to start the next layers
    assert started == [0], "the sweep's worker went on editing after Cancel"
    traced("The Eiffel Tower is located in the city of", "The Eiffel Tower", ["hidden"], 2, 2, 3, workspace, **QUIET)


def test_a_slow_load_does_not_stall_other_sessions_and_a_held_model_is_never_loaded_twice(monkeypatch):
    """Loading one model does not hold up sessions of another; a model dropped from the registry while a session
    holds it is reused, not loaded again; a copy loaded again after it was dropped is prepared again (bug 3)."""
    import gc
    import threading

    from explorer.app.ui import sessions

    loads, slow_gate, planned = [], threading.Event(), []

    def load(name, progress=None):
        loads.append(name)
        if name == "slow":
            slow_gate.wait(30)
        return build_tiny("llama")

    monkeypatch.setattr(sessions, "load_model", load)
    monkeypatch.setattr(sessions, "_models", type(sessions._models)())
    monkeypatch.setattr(sessions, "_retired", __import__("weakref").WeakValueDictionary(), raising=False)
    monkeypatch.setattr(sessions, "_loading", {}, raising=False)
    monkeypatch.setattr(sessions, "_preparations", {})
    monkeypatch.setattr(ui.config, "MAX_LOADED_MODELS", 1)
    monkeypatch.setattr(ui.config, "EDIT_OPTIONS", EditOptions(steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="identity")))
    from explorer.app import preparation

    plan = preparation.plan_edit
    monkeypatch.setattr(preparation, "plan_edit", lambda handle, *a, **k: planned.append(handle) or plan(handle, *a, **k))

    first = sessions.shared_model("a")
    slow = threading.Thread(target=sessions.shared_model, args=("slow",), daemon=True)
    slow.start()
    while "slow" not in loads:
        threading.Event().wait(0.01)
    other = []
    quick = threading.Thread(target=lambda: other.append(sessions.shared_model("a")), daemon=True)
    quick.start()
    quick.join(5)
    assert other == [first], "a session of model a waited for the load of another model"
    slow_gate.set()
    slow.join(30)
    # "a" was dropped for "slow" (one model kept), but this test still holds it: asked again, the same copy.
    assert sessions.shared_model("a") is first and loads == ["a", "slow"]
    sessions.start_preparation("a").wait(60)
    assert planned == [first]
    del first
    other.clear()
    planned.clear()
    sessions.shared_model("slow")  # drops "a" again; nothing holds it now
    gc.collect()
    again = sessions.shared_model("a")
    assert loads[-1] == "a" and loads.count("a") == 2  # loaded again: no session held it
    assert "a" in sessions._preparations, "the copy loaded again was never prepared"
    sessions._preparations["a"].wait(60)
    assert planned == [again]
