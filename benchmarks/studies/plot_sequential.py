"""Draw sequential-editing runs (``python -m explorer sequential ... --json``) as one PNG, and print their table.

Each run is a line per measure over the number of edits; the PNG is rendered by Debian's Chromium through
Playwright (what the browser tests use), so no other image library is needed.

    python benchmarks/studies/plot_sequential.py benchmarks/studies/sequential/sequential_rome_125.json \
        benchmarks/studies/sequential/sequential_rome_original_125.json --png assets/sequential_curve.png
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.testing.app_server import CHROMIUM, CHROMIUM_FLAGS

PANELS = (("ES", "retention: ES of all edits so far (%)"), ("PS", "PS of all edits so far (%)"),
          ("NS", "NS of all edits so far (%)"), ("probe_retained", "probe facts still right (%)"),
          ("fluency", "fluency (n-gram entropy, bits)"), ("relative_norm", "‖W − W₀‖ / ‖W₀‖"))
COLOURS = {"rome": "#6a51a3", "rome-original": "#e6550d", "ft": "#31a354"}


def figure(runs: list[dict]) -> go.Figure:
    out = make_subplots(rows=2, cols=3, subplot_titles=[title for _, title in PANELS], horizontal_spacing=0.07)
    for run in runs:
        points = run["checkpoints"]
        for index, (key, _title) in enumerate(PANELS):
            scale = 100 if key == "probe_retained" else 1
            values = [None if p[key] is None else scale * p[key] for p in points]
            out.add_trace(go.Scatter(x=[p["edits"] for p in points], y=values, name=run["method"], mode="lines+markers",
                                     line={"color": COLOURS.get(run["method"], "#636363")}, legendgroup=run["method"],
                                     showlegend=index == 0), row=index // 3 + 1, col=index % 3 + 1)
    out.update_xaxes(title_text="edits")
    out.update_layout(width=1200, height=640, margin={"l": 40, "r": 20, "t": 50, "b": 40}, legend={"orientation": "h"})
    return out


def table(runs: list[dict]) -> str:
    lines = ["| method | edits | ES | PS | NS | probe facts right | fluency | ‖ΔW‖/‖W₀‖ | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for p in run["checkpoints"]:
            cells = ["–" if p[k] is None else f"{p[k]:.1f}" for k in ("ES", "PS", "NS")]
            probes = "–" if p["probe_retained"] is None else f"{100 * p['probe_retained']:.0f}%"
            lines.append(f"| {run['method']} | {p['edits']} | {' | '.join(cells)} | {probes} | {p['fluency']:.2f} | "
                         f"{p['relative_norm']:.3f} | {p['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--png", help="write the figure here")
    args = parser.parse_args()
    runs = [json.loads(Path(path).read_text()) for path in args.runs]
    print(table(runs))
    if args.png:
        from playwright.sync_api import sync_playwright

        with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
            page_file = Path(folder) / "curve.html"
            page_file.write_text(figure(runs).to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1220, "height": 660})
            page.goto(page_file.as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg")
            page.locator(".js-plotly-plot").first.screenshot(path=args.png)
            browser.close()


if __name__ == "__main__":
    main()
