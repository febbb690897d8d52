"""Plotly figures from results (no torch here)."""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from ..tracing import TraceResult

KIND_COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_TITLES = {"hidden": "single restored layer (hidden state)", "mlp": "restored MLP outputs", "attn": "restored attention outputs"}


def safe_label(text: str) -> str:
    """Text shown as text: plotly reads a subset of HTML in labels, so escape it."""
    return html.escape(text, quote=True).replace("\n", "\\n")


def token_labels(result: TraceResult) -> list[str]:
    """Axis labels: each token, subject tokens marked with ``*`` as in the paper."""
    start, end = result.subject_range
    return [safe_label(token) + ("*" if start <= i < end else "") for i, token in enumerate(result.tokens)]


def heatmap(result: TraceResult, kind: str) -> go.Figure:
    """Tokens (prompt order, top to bottom) × layers, coloured by the answer's probability from low_score up.

    A trace in progress leaves its cells not computed yet empty (NaN). An attribution-patching estimate
    (``method`` "atp") is drawn as its estimated indirect effect on its own relative colour scale, since
    its magnitudes are not the exact trace's, and titled as an estimate.
    """
    grid = np.asarray(result.scores[kind], dtype=float)
    labels = token_labels(result)
    effect = grid - result.low_score
    estimate = result.method == "atp"

    def cell_text(t: int, l: int) -> str:
        if np.isnan(grid[t, l]):
            return "not computed yet"
        if estimate:
            return f"estimated indirect effect = {effect[t, l]:+.4f}"
        return f"p = {grid[t, l]:.4f}<br>indirect effect = {effect[t, l]:+.4f}"

    computed = effect[~np.isnan(effect)]  # an estimate or a trace in progress leaves cells not computed yet empty (NaN)
    if estimate:
        values = effect
        low, high = (float(computed.min()), float(computed.max())) if computed.size else (0.0, 0.0)
        title, scale = f"ESTIMATE (attribution patching): {KIND_TITLES[kind]}", "estimated effect<br>(relative scale)"
    else:
        values, low = grid, result.low_score
        high = float(computed.max()) + low if computed.size else low
        title, scale = f"Impact of {KIND_TITLES[kind]}", f"p({safe_label(result.answer.strip())})"
    n_tokens, n_layers = grid.shape
    hover = np.array([[f"{labels[t]} · layer {l}<br>{cell_text(t, l)}" for l in range(n_layers)] for t in range(n_tokens)])
    figure = go.Figure(go.Heatmap(
        z=values, x=list(range(n_layers)), y=list(range(n_tokens)), zmin=low, zmax=max(high, low + 1e-9),
        colorscale=KIND_COLOURS[kind], text=hover, hoverinfo="text", colorbar={"title": {"text": scale}},
    ))
    figure.update_layout(
        title={"text": title, "font": {"size": 14}},
        xaxis={"title": {"text": "layer" if kind == "hidden" else f"centre of {result.window}-layer window"}},
        yaxis={"tickmode": "array", "tickvals": list(range(n_tokens)), "ticktext": labels, "autorange": "reversed"},
        margin={"l": 10, "r": 10, "t": 40, "b": 40},
        height=max(260, 28 * n_tokens + 110),
    )
    return figure


def agreement_markdown(report: dict[str, dict], estimate_seconds: float, exact_seconds: float) -> str:
    """How far the estimate was from the exact trace, per kind (a Markdown table)."""
    rows = ["| kind | correlation | largest error | peak cell (exact → estimate) |", "| --- | ---: | ---: | --- |"]
    for kind, found in report.items():
        exact_peak, estimate_peak = found["exact_peak"], found["estimate_peak"]
        verdict = "same" if found["peak_cell_agrees"] else ("same token" if found["peak_token_agrees"] else "differs")
        rows.append(f"| {kind} | {found['correlation']:.2f} | {found['max_abs_error']:.3f} | "
                    f"{verdict}: token {exact_peak[0]} layer {exact_peak[1]} → token {estimate_peak[0]} layer {estimate_peak[1]} |")
    return (f"**Estimate vs exact trace** (estimate {estimate_seconds:.1f} s, exact {exact_seconds:.1f} s):\n\n" + "\n".join(rows))


def caption(result: TraceResult) -> str:
    """One line: the answer, its clean and corrupted probabilities, and the trace settings (plain text);
    for a trace in progress, how many cells are computed so far."""
    line = (
        f"answer {result.answer!r}: p = {result.high_score:.4f} clean, {result.low_score:.4f} corrupted; "
        f"noise {result.noise:g} x sigma = {result.noise_std:.4f}, {result.samples} samples, window {result.window}"
    )
    missing = sum(int(np.isnan(grid).sum()) for grid in result.scores.values())
    if missing:
        total = sum(np.asarray(grid).size for grid in result.scores.values())
        line += f" — computing: {total - missing} of {total} cells so far (the last subject token and the last token first)"
    return line


def trace_html(result: TraceResult) -> str:
    """A standalone HTML page with one interactive heatmap per kind."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Causal trace</title></head><body>",
        f"<h3>{html.escape(result.prompt)}</h3><p>subject: {html.escape(result.subject)}; {html.escape(caption(result))}</p>",
    ]
    for index, kind in enumerate(result.scores):
        parts.append(heatmap(result, kind).to_html(full_html=False, include_plotlyjs="inline" if index == 0 else False))
    parts.append("</body></html>")
    return "\n".join(parts)


def _highlight(text: str, targets: dict[str, str]) -> str:
    """``text`` escaped for HTML, with each target string wrapped in a mark of its class."""
    out = safe_label(text)
    for target, css in targets.items():
        word = safe_label(target.strip())
        if word:
            out = out.replace(word, f'<mark class="{css}">{word}</mark>')
    return out


def generations_html(report: dict, target_new: str, target_true: str | None) -> str:
    """Original and edited completions side by side, one row per prompt, targets highlighted."""
    targets = {target_new: "target-new", **({target_true: "target-true"} if target_true else {})}
    rows = []
    for old, new in zip(report["before"]["generations"], report["after"]["generations"]):
        rows.append(
            f"<tr><td class='prompt'>{safe_label(old['prompt'])}</td>"
            f"<td class='original'>{_highlight(old['text'], targets)}</td>"
            f"<td class='edited'>{_highlight(new['text'], targets)}</td></tr>"
        )
    return (
        "<style>.side-by-side td{vertical-align:top;padding:4px 8px}.target-new{background:#c7e9c0}"
        ".target-true{background:#fcbba1}</style><table class='side-by-side'>"
        "<tr><th>prompt</th><th>original model</th><th>edited model</th></tr>" + "".join(rows) + "</table>"
    )


def metrics_markdown(metrics: dict, warnings: list[str]) -> str:
    """The edit's scores before → after as a Markdown table, then any warnings.

    Teacher-forced scores (P(new) > P(true)) first, then decoded success (the greedy continuation begins
    with the target), each beside the unedited model's on the same prompts.
    """
    labels = {"ES": "ES", "PS": "PS", "NS": "NS", "EM": "EM", "PM": "PM", "NM": "NM",
              "decoded_efficacy": "decoded ES", "decoded_paraphrase": "decoded PS", "decoded_neighborhood": "decoded NS"}
    names = [n for n in labels if metrics["after"].get(n) is not None]
    def cell(value: float) -> str:
        return f"{100 * value:.1f}"
    lines = ["| | " + " | ".join(labels[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for side in ("before", "after"):
        lines.append(f"| {side} | " + " | ".join(cell(metrics[side][n]) for n in names) + " |")
    lines += [f"\n**Warning:** {safe_label(w)}" for w in warnings]
    return "\n".join(lines)


def probability_bars(rows: list[list]) -> go.Figure:
    """P(target_new) and P(target_true) before vs after the edit, one group of bars per prompt.

    ``rows`` are the edit panel's table rows: role, prompt, P(new) before, P(new) after, P(true) before, P(true) after.
    """
    labels = [f"{i + 1}. {row[0]}" for i, row in enumerate(rows)]
    hovers = [safe_label(row[1]) for row in rows]
    series = (("P(new) before", 2, "#a1d99b"), ("P(new) after", 3, "#238b45"), ("P(true) before", 4, "#fc9272"), ("P(true) after", 5, "#cb181d"))
    figure = go.Figure(
        [go.Bar(name=name, x=labels, y=[row[column] for row in rows], marker_color=colour, customdata=hovers,
                hovertemplate="%{customdata}<br>" + name + " = %{y:.4f}<extra></extra>")
         for name, column, colour in series]
    )
    figure.update_layout(barmode="group", yaxis={"title": {"text": "probability"}, "range": [0, 1]},
                         margin={"l": 10, "r": 10, "t": 30, "b": 40}, height=320, legend={"orientation": "h"})
    return figure


def _band(figure: go.Figure, x: list[int], summary: dict, name: str, colour: str, row: int | None = None) -> None:
    """A mean line with its 95% confidence band (shaded) from a ``mean_ci`` summary."""
    mean, half = np.asarray(summary["mean"], dtype=float), np.asarray(summary["ci95"], dtype=float)
    where = {} if row is None else {"row": row, "col": 1}
    figure.add_trace(go.Scatter(x=x + x[::-1], y=list(mean + half) + list((mean - half)[::-1]), fill="toself",
                                fillcolor=colour, opacity=0.2, line={"width": 0}, hoverinfo="skip", showlegend=False,
                                legendgroup=name), **where)
    figure.add_trace(go.Scatter(x=x, y=list(mean), name=f"{name} (n={summary['count']})", line={"color": colour},
                                legendgroup=name, showlegend=row in (None, 1)), **where)


CATEGORY_COLOURS = {
    "first_subject_token": "#9ecae1", "middle_subject_tokens": "#4292c6", "last_subject_token": "#d62728",
    "first_subsequent_token": "#74c476", "further_tokens": "#969696", "last_token": "#6a51a3",
}
SEVERED_COLOURS = {"ordinary": "#6a51a3", "mlp_severed": "#238b45", "attn_severed": "#cb181d"}


def average_figure(result: dict) -> go.Figure:
    """The paper's Figure 2: per kind, the mean answer probability per layer for each token category, with 95% bands.

    ``result`` is the ``average`` command's JSON (facts_total, facts_correct, low/high score, kind → category → mean_ci).
    """
    from plotly.subplots import make_subplots

    kinds = [kind for kind in KIND_TITLES if kind in result]
    figure = make_subplots(rows=len(kinds), cols=1, subplot_titles=[f"Average impact of {KIND_TITLES[k]}" for k in kinds],
                           vertical_spacing=0.12)
    for row, kind in enumerate(kinds, start=1):
        for category, summary in result[kind].items():
            if summary["count"]:
                _band(figure, list(range(len(summary["mean"]))), summary, category.replace("_", " "), CATEGORY_COLOURS[category], row)
        figure.add_hline(y=result["low_score"], line={"dash": "dot", "color": "grey"}, row=row, col=1)
    figure.update_layout(height=300 * max(1, len(kinds)) + 60, margin={"l": 10, "r": 10, "t": 60, "b": 40},
                         title={"text": f"{result['facts_correct']} of {result['facts_total']} facts known; dotted: mean corrupted p",
                                "font": {"size": 13}})
    figure.update_xaxes(title_text="layer")
    figure.update_yaxes(title_text="p(answer)")
    return figure


def severed_figure(result: dict) -> go.Figure:
    """The paper's Figure 3 analysis: hidden-state restoration at the last subject token, ordinary vs severed paths."""
    figure = go.Figure()
    for key, colour in SEVERED_COLOURS.items():
        _band(figure, list(range(len(result[key]["mean"]))), result[key], key.replace("_", " "), colour)
    figure.add_hline(y=result["low_score"], line={"dash": "dot", "color": "grey"})
    figure.update_layout(height=360, margin={"l": 10, "r": 10, "t": 50, "b": 40}, xaxis={"title": {"text": "layer"}},
                         yaxis={"title": {"text": "p(answer)"}},
                         title={"text": f"Last subject token, {result['prompts']} prompts; dotted: mean corrupted p", "font": {"size": 13}})
    return figure


def inspection_markdown(found) -> str:
    """A cell's read-outs (an :class:`inspection.CellInspection`) as Markdown, tokens shown as text."""
    def listed(predictions) -> str:
        return ", ".join(f"`{safe_label(text)}` {p:.3f}" for text, p in predictions)

    layers = found.restored_layers
    restored = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"
    return (
        f"**{found.kind} cell: token {found.token} (`{safe_label(found.token_text)}`), layer {found.layer}** "
        f"(restores {restored}). Answer `{safe_label(found.answer)}`: p = {found.answer_clean:.4f} clean, "
        f"{found.answer_corrupted:.4f} corrupted, **{found.answer_restored:.4f} with this cell restored**.\n\n"
        f"| read out from | top next-token predictions |\n| --- | --- |\n"
        f"| this token after layer {found.layer}, clean run (logit lens) | {listed(found.lens_clean)} |\n"
        f"| the same, corrupted runs | {listed(found.lens_corrupted)} |\n"
        f"| the same, corrupted runs with the cell restored | {listed(found.lens_restored)} |\n"
        f"| the model's output, corrupted runs with the cell restored | {listed(found.output_restored)} |"
    )


def sweep_figure(mlp_effect: list[float] | None, points: list[dict], num_layers: int) -> go.Figure:
    """Per layer: the traced MLP effect at the last subject token (line, left axis) beside the edit's score
    there (markers, right axis); layers not swept yet are simply absent."""
    from plotly.subplots import make_subplots

    figure = make_subplots(specs=[[{"secondary_y": True}]])
    if mlp_effect is not None:
        figure.add_trace(go.Scatter(x=list(range(len(mlp_effect))), y=mlp_effect, name="MLP effect (trace)",
                                    line={"color": "#238b45"}), secondary_y=False)
    figure.add_trace(go.Scatter(x=[p["layer"] for p in points], y=[p["score"] for p in points], mode="markers+lines",
                                name="edit score (mean of EM, PM, NM)", marker={"color": "#6a51a3", "size": 9},
                                line={"dash": "dot"}, customdata=[[p["ES"], p["new_prob"], p["delta_norm"]] for p in points],
                                hovertemplate="layer %{x}<br>score %{y:.3f}<br>ES %{customdata[0]}<br>P(new) %{customdata[1]:.3f}"
                                              "<br>|ΔW| %{customdata[2]:.3g}<extra></extra>"), secondary_y=True)
    figure.update_xaxes(title_text="layer", range=[-0.5, num_layers - 0.5])
    figure.update_yaxes(title_text="indirect effect", secondary_y=False)
    figure.update_yaxes(title_text="edit score", secondary_y=True)
    figure.update_layout(height=340, margin={"l": 10, "r": 10, "t": 30, "b": 40}, legend={"orientation": "h"})
    return figure


def health_markdown(health: dict) -> str:
    """The model's health line after an edit: probe facts still right, fluency, how far the weights moved."""
    retained = ("no probe facts (the model knows none of the bundled facts)" if health["probe_retained"] is None
                else f"{health['probes_right']}/{health['probes_total']} probe facts still right")
    line = (f"**Model health** with your applied edits: {retained} · fluency {health['fluency']:.2f} bits "
            f"(unedited {health['baseline_fluency']:.2f}) · ‖ΔW‖/‖W‖ {health['relative_norm']:.3g}")
    return line + "".join(f"\n\n**Warning:** {safe_label(w)}" for w in health["warnings"])
