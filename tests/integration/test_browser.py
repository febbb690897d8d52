"""The app in a real browser: `python app.py` on a free loopback port, driven by Debian's headless Chromium."""
from __future__ import annotations

from pathlib import Path

import pytest

from explorer.testing.page import (
    EDIT_COUNT,
    PROMPT,
    SUBJECT,
    SWEEP_DONE,
    TIMEOUT_MS,
    caption,
    edit,
    edit_count,
    fill,
    set_samples,
    sweep,
    tick_labels,
    trace,
    type_as_it_appears,
    wait_for_health,
    wait_until_idle,
)
from tests.app_server import CHROMIUM, launch_browser, running_app
from tests.app_server import tiny_app as serving_tiny

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")

HOSTILE = "<img src=x onerror=alert(1)>"


LONG_PROMPT = "In the heart of the old town, next to the river and the market square, The Eiffel Tower is located in the city of"
SLOW_SAMPLES = 1000  # a trace of LONG_PROMPT this many samples deep runs 1-3 minutes on the tiny model: long enough to cancel


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    """(url, model folder) of the app serving a tiny random Llama (its samples limit raised for a trace worth cancelling)."""
    with serving_tiny(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("cache"),
                      ROME_EXPLORER_MAX_SAMPLES=str(SLOW_SAMPLES)) as served:
        yield served


@pytest.fixture()
def browser(tmp_path):
    """A function opening one browser session (its own Chromium profile) per call; each records dialogs it saw."""
    from playwright.sync_api import sync_playwright

    contexts = []
    with sync_playwright() as playwright:
        def open_page(url: str):
            context = launch_browser(playwright, tmp_path / f"profile-{len(contexts)}")
            contexts.append(context)
            page = context.new_page()
            page.dialogs = []
            page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(url)
            page.get_by_text("ROME Explorer").first.wait_for()
            return page

        yield open_page
        for context in contexts:
            context.close()


def expected_labels(folder_or_tokenizer, prompt: str, subject: str) -> list[str]:
    from explorer.core.prompts import tokenize_prompt

    tokenized = tokenize_prompt(folder_or_tokenizer, prompt, subject)
    start, end = tokenized.subject_range
    return [token + ("*" if start <= i < end else "") for i, token in enumerate(tokenized.tokens)]




def test_trace_edit_undo_and_sessions_in_the_browser(tiny_app, browser):
    from transformers import AutoTokenizer

    url, folder = tiny_app
    a = browser(url)
    unedited = trace(a, PROMPT, SUBJECT)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    labels = [label.strip() for label in expected_labels(tokenizer, PROMPT, SUBJECT)]
    assert [[t.strip() for t in kind] for kind in tick_labels(a)] == [labels] * 3
    assert caption(a).startswith("answer ")

    edit(a, " Rome")
    panel = a.locator("#edit-generations table.side-by-side")
    assert panel.locator("th").all_inner_texts() == ["prompt", "original model", "edited model"]
    cells = panel.locator("tr").nth(1).locator("td")
    assert cells.count() == 3 and all(cells.nth(i).inner_text().strip() for i in (1, 2))
    assert a.locator("#edit-bars .js-plotly-plot").count() == 1
    assert edit_count(a) == 1 and "Eiffel" in a.locator("#edit-list").inner_text()

    a.get_by_role("tab", name="Trace").click()
    edited = trace(a)
    assert "edit(s) of yours" in caption(a) and edited != unedited

    # Another browser session sees the unedited model and none of A's edits, while A's edit is active.
    b = browser(url)
    assert trace(b, PROMPT, SUBJECT) == unedited
    b.get_by_role("tab", name="Edit").click()
    assert edit_count(b) == 0

    a.get_by_role("tab", name="Edit").click()
    a.locator("#undo-button").click()
    a.wait_for_function(f"{EDIT_COUNT} === 0", timeout=TIMEOUT_MS)
    a.get_by_role("tab", name="Trace").click()
    assert trace(a) == unedited
    assert a.dialogs == [] and b.dialogs == []


def test_reset_all_drops_every_edit_in_the_browser(tiny_app, browser):
    page = browser(tiny_app[0])
    unedited = trace(page, PROMPT, SUBJECT)
    edit(page, " Rome", layer="1")
    edit(page, " Berlin", layer="2")
    assert edit_count(page) == 2
    page.get_by_role("tab", name="Trace").click()
    # Other settings than the unedited trace's, so that each trace below draws maps unlike the ones shown before it.
    set_samples(page, 3)
    trace(page)
    assert "2 edit(s) of yours" in caption(page)
    page.get_by_role("tab", name="Edit").click()
    page.locator("#reset-button").click()
    page.wait_for_function(f"{EDIT_COUNT} === 0", timeout=60_000)
    assert "Rome" not in page.locator("#edit-list").inner_text()
    page.get_by_role("tab", name="Trace").click()
    set_samples(page, 10)
    assert trace(page) == unedited and "edit(s) of yours" not in caption(page)
    assert page.dialogs == []


def start_slow_trace(page) -> str:
    """Click Trace on a trace that runs a minute or more; its caption once its first result is drawn."""
    wait_until_idle(page)
    before = caption(page)
    set_samples(page, SLOW_SAMPLES)
    fill(page, "trace-prompt", LONG_PROMPT)
    fill(page, "trace-subject", SUBJECT)
    page.locator("#trace-button").click()
    page.wait_for_function("before => document.querySelector('#trace-caption textarea').value !== before", arg=before,
                           timeout=TIMEOUT_MS)
    return caption(page)


def test_cancel_stops_a_running_trace_and_the_next_one_runs(tiny_app, browser):
    page = browser(tiny_app[0])
    # Running: its estimate is drawn, the exact maps fill in.
    assert "computing" in start_slow_trace(page)
    page.locator("#trace-cancel").click()
    # The page says so at once, where the answer line would have appeared; the server stops the trace at its next step.
    page.wait_for_function("(document.querySelector('#trace-caption textarea') || document.querySelector('#trace-caption input')).value.startsWith('cancelled')", timeout=30_000)
    # The app stays usable at once: a click on Trace right away starts a small trace, which runs (its own cancel
    # flag leaves the cancelled trace's set). Gradio drops clicks on a button whose job still counts as pending,
    # so the handler must hand the page back without waiting for the engine's next check of its flag.
    set_samples(page, 2)
    trace(page, "The Colosseum is located in the city of", "The Colosseum", timeout_ms=60_000)
    assert caption(page).startswith("answer ") and "2 samples" in caption(page), caption(page)
    # The cancelled trace never ran to its end: asked again, it is computed afresh rather than answered from
    # the cache of finished traces at once.
    assert "computing" in start_slow_trace(page)
    page.locator("#trace-cancel").click()  # it stops at its next step; later tests use sessions of their own
    assert page.dialogs == []


def test_script_in_inputs_is_shown_as_text(tiny_app, browser):
    page = browser(tiny_app[0])
    hostile_prompt = f"The {HOSTILE} is located in the city of"
    trace(page, hostile_prompt, HOSTILE)
    text = "".join(label.removesuffix("*") for label in tick_labels(page)[0])
    assert f"The {HOSTILE} is located" in text  # the tag's tokens, shown as text on the heatmap's axis
    edit_fields = {"edit-prompt": "{} is located in the city of", "edit-subject": HOSTILE}
    page.get_by_role("tab", name="Edit").click()
    for elem_id, text in edit_fields.items():
        fill(page, elem_id, text)
    edit(page, "</script>" + HOSTILE)
    assert HOSTILE in page.locator("#edit-list").inner_text()
    assert "</script>" in page.locator("#edit-list").inner_text()
    # An error message that repeats the hostile subject is shown as text too.
    page.get_by_role("tab", name="Trace").click()
    fill(page, "trace-prompt", "Paris is nice")
    fill(page, "trace-subject", HOSTILE)
    page.locator("#trace-button").click()
    page.get_by_text("does not occur").first.wait_for(timeout=TIMEOUT_MS)
    assert page.locator("img[src='x']").count() == 0
    assert page.dialogs == []



def test_default_model_traces_in_the_browser(browser, default_model):
    """`python app.py` as a user runs it: the embedded model, three heatmaps over its own tokens, the answer Paris."""
    with running_app() as (url, _seconds):
        page = browser(url)
        set_samples(page, 2)
        trace(page, PROMPT, SUBJECT)
        labels = [label.strip() for label in expected_labels(default_model.tokenizer, PROMPT, SUBJECT)]
        assert [[t.strip() for t in kind] for kind in tick_labels(page)] == [labels] * 3
        assert labels[:4] == ["<bos>", "The*", "Eiffel*", "Tower*"]
        assert caption(page).startswith("answer ' Paris'") and "2 samples" in caption(page)
        # The start-up preparation of the first edit shows in the status line above the tabs, and finishes.
        status = page.locator("#model-status")
        page.wait_for_function("() => document.querySelector('#model-status').innerText.includes('ready to edit')",
                               timeout=TIMEOUT_MS)
        assert "gemma3_text, 18 layers" in status.inner_text()
        assert "ready to edit (default layer 1; C from 100,010 keys of wikipedia)" in status.inner_text()


def test_a_click_on_a_heatmap_cell_shows_what_is_inside_it(tiny_app, browser):
    page = browser(tiny_app[0])
    trace(page, PROMPT, SUBJECT)
    # The attribution-patching estimate is drawn too, below the exact maps, labelled as an estimate.
    assert page.locator("#trace-estimate-plots-mlp .js-plotly-plot").count() == 1
    assert "ESTIMATE" in page.locator("#trace-estimate-plots-mlp").inner_text()
    page.get_by_text("Estimate vs exact trace").first.wait_for(timeout=TIMEOUT_MS)
    drag_layer = page.locator("#trace-plots-mlp .nsewdrag").first  # where plotly takes the map's clicks
    box = drag_layer.bounding_box()
    # The lowest row of the map is the prompt's last token; its cells are computed in every trace.
    drag_layer.click(position={"x": box["width"] * 0.6, "y": box["height"] - 4})
    page.wait_for_function("() => document.querySelector('#inspect-result').innerText.includes('mlp cell: token')",
                           timeout=TIMEOUT_MS)
    text = page.locator("#inspect-result").inner_text()
    assert "with this cell restored" in text and "logit lens" in text
    cell = page.locator("#inspect-cell textarea, #inspect-cell input").first.input_value()
    kind, token, layer = cell.split(",")
    assert kind == "mlp" and int(token) == len(tick_labels(page)[1]) - 1 and 0 <= int(layer) < 4
    assert page.dialogs == []


COLUMN = "([id, col]) => Array.from(document.querySelectorAll(`#${id} [role=gridcell][data-col='${col}']`)).map(c => c.innerText.trim())"


def table_column(page, elem_id: str, column: int) -> list[str]:
    """One column of a table (a Gradio Dataframe) on the page, top to bottom."""
    return page.evaluate(COLUMN, [elem_id, column])


def test_text_typed_the_moment_a_late_panel_opens_is_kept_and_sent(tiny_app, browser):
    """Bug 7 of issue 27: Gradio draws a later tab's and a closed accordion's fields only when they open, and a
    frame later set them back to their initial values, so a sweep typed as "0-1" right then ran every layer."""
    page = browser(tiny_app[0])
    type_as_it_appears(page, "edit-target-new", " Paris")  # in a tab not shown at first
    page.get_by_role("tab", name="Edit").click()
    type_as_it_appears(page, "sweep-layers", "0-1")  # in a closed accordion
    page.get_by_text("Layer sweep: does the traced layer edit best?").click()
    page.wait_for_timeout(1500)  # well past the frame after which Gradio set the fields again
    for elem_id, typed in (("edit-target-new", " Paris"), ("sweep-layers", "0-1")):
        assert page.locator(f"#{elem_id} textarea").input_value() == typed, elem_id
    page.locator("#sweep-button").click()
    page.wait_for_function(SWEEP_DONE, timeout=2 * TIMEOUT_MS)
    assert table_column(page, "sweep-table", 0) == ["0", "1"]


def test_switching_an_edit_off_and_on_and_the_layer_sweep_in_the_browser(tiny_app, browser):
    page = browser(tiny_app[0])
    unedited = trace(page, PROMPT, SUBJECT)
    edit(page, " Rome")
    health = page.locator("#edit-health")
    assert "fluency" in wait_for_health(page) and "‖ΔW‖/‖W‖" in health.inner_text()
    page.get_by_role("tab", name="Trace").click()
    edited = trace(page)
    assert edited != unedited

    # Switched off, the edit stays listed but the model traces as the unedited one; switched on, as the edited one.
    page.get_by_role("tab", name="Edit").click()
    assert table_column(page, "edit-list", 1) == ["on"]
    for state, expected in (("off", unedited), ("on", edited)):
        page.locator("#toggle-button").click()
        page.wait_for_function(f"state => ({COLUMN})(['edit-list', 1]).join() === state", arg=state, timeout=TIMEOUT_MS)
        assert edit_count(page) == 1 and "‖ΔW‖/‖W‖" in health.inner_text()
        page.get_by_role("tab", name="Trace").click()
        assert trace(page) == expected, state  # the maps shown before are the other state's: a redraw is seen
        page.get_by_role("tab", name="Edit").click()

    # The sweep, over two layers: one table row per layer, the plot, and a summary naming the traced peak.
    sweep(page, "0-1")
    assert table_column(page, "sweep-table", 0) == ["0", "1"]
    assert "Traced MLP peak" in page.locator("#sweep-summary").inner_text()
    assert page.locator("#sweep-plot .js-plotly-plot").count() == 1
    assert edit_count(page) == 1  # the sweep edits copies of the model's own weights, not the session's list
    assert page.dialogs == []

