"""The app as a user meets it, on the embedded default model: `python app.py` to a served page, and a click on
Trace to three heatmaps drawn (the paper's defaults), timed in headless Chromium.

    python benchmarks/speed/bench_app.py [--screenshots assets] [--skip-edit] [--sweep]

With --screenshots it also saves the trace panel and, after an edit (Eiffel Tower -> Rome), the edit panel.
With --sweep it then times the layer sweep of the Edit tab's request over all layers (sweep_panel.png).

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from explorer.testing.app_server import launch_browser, running_app
from explorer.testing.page import PROMPT, SUBJECT, edit, sweep, trace, wait_for_health


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--screenshots", type=Path, help="folder for trace_panel.png and edit_panel.png")
    parser.add_argument("--skip-edit", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="after the edit, sweep its request over all layers")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with running_app() as (url, served), sync_playwright() as playwright:
        print(f"python app.py -> page served: {served:.1f} s (model loaded from its converted cache)")
        context = launch_browser(playwright, Path(tempfile.mkdtemp()))
        page = context.new_page()
        page.goto(url)
        began = time.perf_counter()
        trace(page, PROMPT, SUBJECT)
        print(f"click Trace -> three heatmaps drawn: {time.perf_counter() - began:.1f} s (3 kinds, 10 samples, window 10)")
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            page.locator("#trace-panel").screenshot(path=str(args.screenshots / "trace_panel.png"))
        if not args.skip_edit:
            page.get_by_role("tab", name="Edit").click()
            began = time.perf_counter()
            edit(page, " Rome", layer="")
            print(f"click Edit -> side-by-side panel drawn: {time.perf_counter() - began:.1f} s (default layer, statistics cached)")
            wait_for_health(page)
            print(f"click Edit -> health line drawn: {time.perf_counter() - began:.1f} s")
            if args.screenshots:
                page.locator("#edit-panel").screenshot(path=str(args.screenshots / "edit_panel.png"))
        if args.sweep:
            began = time.perf_counter()
            sweep(page)
            print(f"click Sweep layers -> every layer's point drawn: {time.perf_counter() - began:.1f} s (trace 10 samples, all layers)")
            if args.screenshots:
                page.locator("#sweep-plot").scroll_into_view_if_needed()
                page.locator("#sweep-plot").screenshot(path=str(args.screenshots / "sweep_panel.png"))
        context.close()


if __name__ == "__main__":
    main()
