"""The Average tab's handlers: the paper's Figure 2 (average effects) and severed paths over a fact set."""
from __future__ import annotations

import gradio as gr

from ...core.errors import InputError
from ...tracing import TraceOptions, export
from ...tracing.aggregate import average_effects, average_severed, known_prompts
from .. import plots
from . import config
from .errors import user_errors
from .inputs import fact_set, trace_options
from .jobs import JobReport, in_worker
from .sessions import Workspace


@user_errors
def run_average(upload, limit, kinds, samples, workspace: Workspace, progress=gr.Progress()):
    """The paper's Figure 2 on this session's model: average effect per layer for each token category."""
    options = trace_options(kinds, samples, TraceOptions.window, TraceOptions.noise)
    facts = fact_set(upload, limit)
    session = workspace.session
    report = JobReport(workspace, progress)

    def work() -> dict:
        with session.applied():
            return average_effects(session.handle, facts, options, config.LIMITS.trace, progress=report).to_json()

    result = in_worker(work, report)
    if not result["facts_correct"]:
        raise InputError(f"the model completes none of the {len(facts)} facts correctly, so there is nothing to average")
    path = workspace.files("average") / "average.json"
    export.write_data(result, path)
    summary = f"{result['facts_correct']} of {result['facts_total']} facts completed correctly and traced."
    return plots.average_figure(result), summary, str(path)


@user_errors
def run_severed(upload, limit, samples, workspace: Workspace, progress=gr.Progress()):
    """Severed paths at the last subject token, averaged over the known facts of the set."""
    options = trace_options(["hidden"], samples, TraceOptions.window, TraceOptions.noise)
    facts = fact_set(upload, limit)
    session = workspace.session
    report = JobReport(workspace, progress)

    def work() -> tuple[list, dict]:
        with session.applied():
            prompts = known_prompts(session.handle, facts)
            if not prompts:
                raise InputError(f"the model completes none of the {len(facts)} facts correctly, so there is nothing to sever")
            return prompts, average_severed(session.handle, prompts, options, config.LIMITS.trace, progress=report)

    prompts, result = in_worker(work, report)
    path = workspace.files("severed") / "severed.json"
    export.write_data(result, path)
    return plots.severed_figure(result), f"{len(prompts)} of {len(facts)} facts completed correctly and severed.", str(path)
