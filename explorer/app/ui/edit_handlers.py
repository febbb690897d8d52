"""The Edit tab's handlers: an edit with its before/after report, undo and reset, free completions, bundled cases."""
from __future__ import annotations

import functools

import gradio as gr

from ...core.errors import InputError
from ...core.generation import complete
from ...editing import edit_fact, make_request, validate_options
from ...studies.compare import GENERATION_TOKENS, Probes, before_and_after, comparison, completions, probabilities, with_true_target
from ...studies.evaluate import HANDWRITTEN_CASES, read_dataset
from ...studies.health import baseline_fluency, model_health, probe_facts
from .. import plots
from ..scheduler import FIRST_SHOWN, MAIN_SHOWN
from . import config
from .errors import user_errors
from .inputs import check_lengths, edit_options, optional_int, prompt_lines, required_int
from .jobs import JobReport
from .sessions import Workspace, active_rows


@user_errors
def run_edit(prompt, subject, target_new, target_true, layer, method, paraphrases, neighborhood, generate,
             workspace: Workspace, progress=gr.Progress()):
    """Edit handler: compute the edit, add it to this session, and show before vs after, in stages: the
    probabilities and scores first, then the original and edited completions, then the model's health."""
    session = workspace.session
    if len(session.edits) >= config.LIMITS.max_edits:
        raise InputError(f"{len(session.edits)} edits are active, the limit; undo one first")
    handle = session.handle
    request = make_request(prompt, subject, target_new, target_true or None)
    options = edit_options(config.EDIT_OPTIONS, method, optional_int(layer, "layer"))
    validate_options(options, handle)  # before the length checks and the true target's pass: a typo costs no wait
    check_lengths(handle, (request.filled, request.target_new, request.target_true or ""), "edit prompt and targets")
    probes = Probes(check_lengths(handle, prompt_lines(paraphrases, "paraphrases"), "paraphrases"),
                    check_lengths(handle, prompt_lines(neighborhood, "neighbourhood prompts"), "neighbourhood prompts"),
                    check_lengths(handle, prompt_lines(generate, "prompts to complete"), "prompts to complete") or (request.filled,),
                    new_tokens=min(GENERATION_TOKENS, config.LIMITS.max_new_tokens))
    report = JobReport(workspace, progress)
    # Three parts of one job, each shown when done; the job holds no turn while Gradio sends a part to the page.
    with report.turns(last=False):
        request = with_true_target(handle, request, session)
        edit = edit_fact(session, request, options, progress=report)
        others = session.frozen()  # the session as the edit found it: the "before" side
        scored = before_and_after(others, edit, lambda model, asked: probabilities(model, asked, probes))
        session.add(edit)
        result = comparison(edit, *scored)
        rows = comparison_rows(request, probes, result)
        bars = plots.probability_bars(rows)
        report.shown(FIRST_SHOWN)
    yield (rows, bars, "<p>completing the prompts on the original and the edited model…</p>",
           plots.metrics_markdown(result["metrics"], result["warnings"]), active_rows(session), workspace,
           "measuring the model's health…")
    with report.turns(last=False):
        report(0.95, "completions of the original and the edited model")
        written = before_and_after(others, edit, lambda model, asked: completions(model, asked, probes))
        report.shown(MAIN_SHOWN)
    result = comparison(edit, *({**side, **more} for side, more in zip(scored, written)))
    generations = plots.generations_html(result, request.target_new, request.target_true)
    if probes.new_tokens < GENERATION_TOKENS:  # the operator's cap, said rather than applied silently
        generations = (f"<p>Completions are {probes.new_tokens} tokens long, cut from {GENERATION_TOKENS} by the "
                       f"server's limit (ROME_EXPLORER_MAX_NEW_TOKENS).</p>" + generations)
    metrics = plots.metrics_markdown(result["metrics"], result["warnings"])
    yield gr.update(), gr.update(), generations, metrics, gr.update(), workspace, gr.update()
    with report.turns():
        report(0.98, "the model's health")
        health = session_health(session)
    # Every output again: a script's /edit call (gradio_client) gets the last update as its whole result.
    yield rows, bars, generations, metrics, active_rows(session), workspace, health


def session_health(session) -> str:
    """The health line of the session's model with its applied edits (probe facts, fluency, ‖ΔW‖/‖W‖, warnings)."""
    handle = session.handle
    unedited = baseline_fluency(handle)
    health = model_health(session, probe_facts(handle), unedited).to_json()
    return plots.health_markdown({**health, "baseline_fluency": unedited})


@user_errors
def toggle_edit(number, workspace: Workspace):
    """Switch one edit (by its number; the last when empty) off, or on again; the list and the model's health."""
    session = workspace.session
    chosen = optional_int(number, "edit number")
    session.toggle(-1 if chosen is None else chosen - 1)
    with JobReport(workspace, None).turns():
        health = session_health(session)
    return active_rows(session), health, workspace


def comparison_rows(request, probes: Probes, report: dict) -> list[list]:
    """One row per prompt: its role, P(new) and P(true) before and after."""
    before, after = report["before"], report["after"]
    rows = [["edit", request.filled, before["target_new_prob"], after["target_new_prob"],
             before["target_true_prob"], after["target_true_prob"]]]
    for role, key, prompts in (("paraphrase", "paraphrases", probes.paraphrases), ("neighbour", "neighborhood", probes.neighborhood)):
        for i, text in enumerate(prompts):
            rows.append([role, text, before[key]["target_new_prob"][i], after[key]["target_new_prob"][i],
                         before[key]["target_true_prob"][i], after[key]["target_true_prob"][i]])
    return [[*row[:2], *(round(float(v), 6) for v in row[2:])] for row in rows]


COMPARISON_HEADERS = ["role", "prompt", "P(new) before", "P(new) after", "P(true) before", "P(true) after"]


@user_errors
def undo_edit(number, workspace: Workspace):
    """Undo one edit (by its number in the list; the last when empty)."""
    session = workspace.session
    chosen = optional_int(number, "edit number")
    session.undo(-1 if chosen is None else chosen - 1)
    return active_rows(session), workspace


@user_errors
def reset_edits(workspace: Workspace):
    """Remove every edit of this session."""
    session = workspace.session
    session.clear()
    return active_rows(session), workspace


def new_token_count(value: object) -> int:
    """The number of tokens to generate per completion, within ``max_new_tokens``."""
    count = required_int(value, "new tokens")
    if not 1 <= count <= config.LIMITS.max_new_tokens:
        raise InputError(f"new tokens must be between 1 and {config.LIMITS.max_new_tokens} (the server's limit), got {count}")
    return count


@user_errors
def complete_prompts(text, new_tokens, workspace: Workspace):
    """Greedy completions of each line on this session's model (with its edits), as an HTML table."""
    count = new_token_count(new_tokens)
    session = workspace.session
    prompts = check_lengths(session.handle, prompt_lines(text, "prompts"), "prompts")
    if not prompts:
        raise InputError("type at least one prompt to complete")
    with JobReport(workspace, None).turns(), session.applied():
        texts = complete(session.handle, prompts, count)
    rows = "".join(f"<tr><td class='prompt'>{plots.safe_label(p)}</td><td class='completion'>{plots.safe_label(t)}</td></tr>"
                   for p, t in zip(prompts, texts))
    return f"<table class='completions'><tr><th>prompt</th><th>completion ({len(session.edits)} edit(s) active)</th></tr>{rows}</table>"


@functools.lru_cache(maxsize=1)
def sample_cases() -> tuple:
    """The bundled CounterFact cases, read once per process."""
    return tuple(read_dataset(HANDWRITTEN_CASES)[1])


def sample_case_labels() -> list[str]:
    """Labels of the bundled CounterFact cases offered as examples."""
    return [f"{c.case_id}: {c.request.filled} → {c.request.target_new.strip()}" for c in sample_cases()]


def fill_from_case(label: str):
    """The edit panel's fields from a bundled CounterFact case."""
    case = {c.case_id: c for c in sample_cases()}[label.split(":", 1)[0]]
    r = case.request
    return r.prompt, r.subject, r.target_new, r.target_true, "\n".join(case.paraphrases), "\n".join(case.neighborhood), "\n".join(case.generation)
