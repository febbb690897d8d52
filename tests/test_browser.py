"""The app in a real browser: `python app.py` on a free loopback port, driven by Debian's headless Chromium."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.app_server import CHROMIUM, launch_browser, running_app
from tests.app_server import tiny_app as serving_tiny

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")

HOSTILE = "<img src=x onerror=alert(1)>"
PLOTS = "#trace-plots .js-plotly-plot"
TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    """(url, model folder) of the app serving a tiny random Llama."""
    with serving_tiny(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("cache")) as served:
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


def fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)


def trace(page, prompt: str | None = None, subject: str | None = None) -> list:
    """Run a trace from the page and return each heatmap's z values once the new ones are drawn."""
    if prompt is not None:
        fill(page, "trace-prompt", prompt)
    if subject is not None:
        fill(page, "trace-subject", subject)
    page.evaluate(f"window.__before = Array.from(document.querySelectorAll('{PLOTS}')).map(d => d.data)")
    page.locator("#trace-button").click()
    # New heatmaps, and a caption that no longer says "computing": the trace streams partial maps before the final ones.
    page.wait_for_function(
        f"""() => {{ const plots = Array.from(document.querySelectorAll('{PLOTS}'));
        const caption = document.querySelector('#trace-caption textarea').value;
        return plots.length === 3 && plots.every((d, i) => d.data && d.data !== (window.__before || [])[i])
               && !caption.includes('computing'); }}""",
        timeout=TIMEOUT_MS,
    )
    return page.evaluate(f"Array.from(document.querySelectorAll('{PLOTS}')).map(d => d.data[0].z)")


def tick_labels(page) -> list[list[str]]:
    return page.evaluate(f"Array.from(document.querySelectorAll('{PLOTS}')).map(d => Array.from(d.querySelectorAll('.ytick text')).map(t => t.textContent))")


def caption(page) -> str:
    return page.locator("#trace-caption textarea, #trace-caption input").first.input_value()


EDIT_COUNT = "Number(document.querySelector('#edit-list [role=grid]').getAttribute('aria-rowcount')) - 1"


def edit_count(page) -> int:
    """How many rows the page's active-edit list shows (the grid's row count less its header)."""
    return page.evaluate(EDIT_COUNT)


def edit(page, target_new: str, layer: str = "1") -> None:
    page.get_by_role("tab", name="Edit").click()
    fill(page, "edit-target-new", target_new)
    fill(page, "edit-layer", layer)
    before = edit_count(page)
    page.locator("#edit-button").click()
    page.wait_for_function(f"{EDIT_COUNT} > {before} && document.querySelector('#edit-generations table.side-by-side') !== null",
                           timeout=TIMEOUT_MS)


def expected_labels(folder_or_tokenizer, prompt: str, subject: str) -> list[str]:
    from explorer.prompts import tokenize_prompt

    tokenized = tokenize_prompt(folder_or_tokenizer, prompt, subject)
    start, end = tokenized.subject_range
    return [token + ("*" if start <= i < end else "") for i, token in enumerate(tokenized.tokens)]


PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


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
        samples = page.locator("#trace-samples input[type=number]")
        samples.fill("2")
        samples.press("Enter")
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
