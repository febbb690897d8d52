"""Fields inside panels the page shows late (a closed accordion, a tab other than the first) keep what is typed.

Gradio 6 does not draw such a panel's fields when the page loads. When the panel is first opened, it draws
them, waits a tick and an animation frame, and then sets every one of them once more to the props it was
built with (``render_previously_invisible_children`` in its frontend). Whatever was typed or chosen in
between is wiped, on screen and in what the next click sends: a layer sweep typed as ``0-1`` then runs every
layer. The wait is a frame on an idle page and much longer on a busy one (a page drawing heatmaps), so fast
typing right after opening a panel loses text there.

Gradio re-applies the props it holds for the field, and an event's output is what updates those props. So
each such field echoes its own value back to itself in the browser whenever it changes (no server round trip,
no queue): the late re-application then writes back what was typed, not the initial value. The echo listens
to ``change``, which fires for every edit, pasted text included (a textbox's ``input`` fires on keystrokes
only); echoing a value equal to the held one changes nothing, so it does not loop.
"""
from __future__ import annotations

import gradio as gr

# The fields typed into: typing can start within the frame after a panel opens. A choice from a menu or a slider
# takes longer than that, and the echo's update counts as a change of the field (a menu's change handler would
# run twice).
KEPT_FIELDS = (gr.Textbox, gr.Number)
ECHO_JS = "(value) => value"


def lazily_shown_fields(root: gr.blocks.BlockContext, lazy: bool = False) -> list[gr.components.Component]:
    """The fields under ``root`` that Gradio draws only when their closed accordion or later tab opens."""
    found = []
    tabs = [child for child in root.children if isinstance(child, gr.Tab)]
    # Gradio draws the selected tab (the first, unless told) and, with render_children, the others too.
    selected = getattr(root, "selected", None)
    shown_tab = next((tab for tab in tabs if selected is not None and tab.id == selected), tabs[0] if tabs else None)
    for child in root.children:
        inside = lazy
        if isinstance(child, gr.Accordion) and not child.open:
            inside = True
        if isinstance(child, gr.Tab) and child is not shown_tab and not child.render_children:
            inside = True
        if isinstance(child, gr.blocks.BlockContext):
            found += lazily_shown_fields(child, inside)
        elif inside and isinstance(child, KEPT_FIELDS) and child.interactive is not False:
            found.append(child)
    return found


def keep_typed_values(demo: gr.Blocks) -> list[gr.components.Component]:
    """Make every lazily shown field of ``demo`` echo its value when it changes (call inside its ``with`` block)."""
    fields = lazily_shown_fields(demo)
    for field in fields:
        field.change(None, [field], [field], js=ECHO_JS, queue=False, show_progress="hidden", api_name=False)
    return fields
