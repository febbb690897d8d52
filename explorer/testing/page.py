"""Driving the app's page in a browser (a Playwright page of ``app_server.launch_browser``): trace, edit, read back.

Shared by the browser tests and ``benchmarks/speed/bench_app.py``; the selectors are the app's element ids.
"""
from __future__ import annotations

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
PLOTS = "#trace-plots .js-plotly-plot"
TIMEOUT_MS = 240_000


def fill(page, elem_id: str, text: str) -> None:
    """Type ``text`` into a field, and check a moment later that the field still shows it."""
    field = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    field.fill(text)
    page.wait_for_timeout(100)
    shown = field.input_value()
    assert shown == text, f"the field #{elem_id} shows {shown!r}, not the {text!r} typed into it"


# Types into a field in the same task in which its element is added to the page (before any frame is drawn):
# the earliest moment a user could, and where a panel that draws its fields late used to wipe them.
TYPE_AS_IT_APPEARS = """([id, text]) => {
  const type = field => {
    Object.getOwnPropertyDescriptor(Object.getPrototypeOf(field), 'value').set.call(field, text);
    field.dispatchEvent(new Event('input', {bubbles: true}));
  };
  const observer = new MutationObserver(() => {
    const field = document.querySelector(`#${id} textarea, #${id} input`);
    if (field) { observer.disconnect(); type(field); }
  });
  observer.observe(document.body, {childList: true, subtree: true});
}"""


def type_as_it_appears(page, elem_id: str, text: str) -> None:
    """Type ``text`` into the field ``elem_id`` the moment it appears (call before opening its panel)."""
    assert page.locator(f"#{elem_id} textarea, #{elem_id} input").count() == 0, f"#{elem_id} is drawn already"
    page.evaluate(TYPE_AS_IT_APPEARS, [elem_id, text])


# Gradio drops a click on a button while that button's last job is still pending (its trigger mode "once"): a
# trace's final maps may be drawn a moment before the job counts as done. The caption's status wrapper hides then.
TRACE_IDLE = "() => Array.from(document.querySelectorAll('#trace-caption .wrap')).every(e => e.classList.contains('hide'))"


def wait_until_idle(page, timeout_ms: int = TIMEOUT_MS) -> None:
    """Until no trace is pending on the page, so that the next click on Trace starts one."""
    page.wait_for_function(TRACE_IDLE, timeout=timeout_ms)


def trace(page, prompt: str | None = None, subject: str | None = None, timeout_ms: int = TIMEOUT_MS) -> list:
    """Run a trace from the page and return each heatmap's z values once the new ones are drawn."""
    wait_until_idle(page, timeout_ms)
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
        timeout=timeout_ms,
    )
    return page.evaluate(f"Array.from(document.querySelectorAll('{PLOTS}')).map(d => d.data[0].z)")


def tick_labels(page) -> list[list[str]]:
    return page.evaluate(f"Array.from(document.querySelectorAll('{PLOTS}')).map(d => Array.from(d.querySelectorAll('.ytick text')).map(t => t.textContent))")


def caption(page) -> str:
    return page.locator("#trace-caption textarea, #trace-caption input").first.input_value()


def set_samples(page, samples: int) -> None:
    field = page.locator("#trace-samples input[type=number]")
    field.fill(str(samples))
    field.press("Enter")


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


HEALTH_DRAWN = "() => document.querySelector('#edit-health').innerText.includes('Model health')"


def wait_for_health(page, timeout_ms: int = TIMEOUT_MS) -> str:
    """Until the health line after an edit or a switch is drawn; its text."""
    page.wait_for_function(HEALTH_DRAWN, timeout=timeout_ms)
    return page.locator("#edit-health").inner_text()


# The summary names the best layer once a point is scored, and says "Editing…" until the last one is in.
SWEEP_DONE = ("() => document.querySelector('#sweep-summary').innerText.includes('Best edit') "
              "&& !document.querySelector('#sweep-summary').innerText.includes('Editing')")


def sweep(page, layers: str = "", timeout_ms: int = 2 * TIMEOUT_MS) -> None:
    """Run the Edit tab's layer sweep of the request in its fields (empty layers: all) until every point is in."""
    page.get_by_role("tab", name="Edit").click()
    if not page.locator("#sweep-button").is_visible():
        page.get_by_text("Layer sweep: does the traced layer edit best?").click()
    fill(page, "sweep-layers", layers)
    page.locator("#sweep-button").click()
    page.wait_for_function(SWEEP_DONE, timeout=timeout_ms)
