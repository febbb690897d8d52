"""The Gradio app: layout and event wiring only; the engines do the work."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import html
import inspect
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np

from . import export, plots
from .bounded_cache import BoundedCache
from .aggregate import average_effects, average_severed, known_prompts
from .attribution import agreement, estimate_trace
from .compare import GENERATION_TOKENS, Probes, compare, with_true_target
from .editing import METHODS, EditOptions, compute_edit, make_request, prepare, validate_options
from .edits import EditSession
from .evaluate import read_dataset
from .facts import ASSETS, load_facts
from .generation import complete
from .inspection import inspect_cell, parse_cell
from .limits import AppLimits
from .model_policy import check_model, field_label
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model, model_fingerprint
from .preparation import Preparation, Status
from .progress import Cancelled, part_of
from .prompts import InputError
from .tracing import KINDS, TraceOptions, TraceResult, trace

TRACE_DEFAULTS = TraceOptions()  # the controls start at the engine's defaults (the paper's)

SAMPLE_CASES = ASSETS / "counterfact_sample.json"
USER_ERRORS = (InputError, ModelLoadError, FloatingPointError, Cancelled)
EDIT_OPTIONS = EditOptions()  # the app's edit settings (the paper's); method and layer come from the page
LIMITS = AppLimits.from_env()
MAX_LOADED_MODELS = 2  # the app's own model plus one a user loaded; older ones are dropped (sessions keep theirs)
TRACE_EXAMPLES = 8  # facts from the bundled set offered as clickable trace examples
TRACE_CACHE: BoundedCache[tuple] = BoundedCache(32)  # (estimate, exact) of finished traces, for repeats (a few MB)
STREAM_SECONDS = 1.0  # a streaming trace redraws its heatmaps at most this often
STOP_POLL_SECONDS = 0.2  # how soon a cancelled job hands the page back

_model_lock = threading.Lock()
_models: OrderedDict[str, LoadedModel] = OrderedDict()
_preparations: dict[str, Preparation] = {}


def shared_model(name: str = DEFAULT_MODEL, progress=None) -> LoadedModel:
    """The one loaded copy of ``name`` that every session shares."""
    with _model_lock:
        if name not in _models:
            _models[name] = load_model(name, progress=progress)
            while len(_models) > MAX_LOADED_MODELS:
                _models.popitem(last=False)
        _models.move_to_end(name)
        return _models[name]


def start_preparation(name: str) -> Preparation:
    """Load ``name`` and prepare its default edit in the background, once per model."""
    with _model_lock:
        preparation = _preparations.setdefault(name, Preparation(name))
    return preparation.start(lambda progress: shared_model(name, progress=progress), EDIT_OPTIONS)


class Workspace:
    """One browser session's state: its model, its edits over that shared model, a cancel flag, its files."""

    def __init__(self, model_name: str = DEFAULT_MODEL):
        self.model_name = model_name
        self.cancel = threading.Event()
        self._session: EditSession | None = None
        self._files: Path | None = None

    def __deepcopy__(self, memo) -> Workspace:
        # Gradio deep-copies a State's initial value for each new browser session: start that one empty.
        return Workspace(self.model_name)

    @property
    def session(self) -> EditSession:
        if self._session is None:
            self._session = EditSession(shared_model(self.model_name))
        return self._session

    def switch_model(self, name: str, handle: LoadedModel) -> None:
        """Work on ``handle`` from now on; edits made on the previous model are dropped."""
        self.model_name, self._session = name, EditSession(handle)

    def files(self) -> Path:
        """This session's download folder, emptied for each new result."""
        self.close()
        self._files = Path(tempfile.mkdtemp(prefix="rome-explorer-"))
        return self._files

    def close(self) -> None:
        """Remove this session's download folder (Gradio calls it when the session's state is deleted)."""
        if self._files is not None:
            shutil.rmtree(self._files, ignore_errors=True)
            self._files = None


@contextlib.contextmanager
def _as_gradio_errors():
    try:
        yield
    except Cancelled:
        raise gr.Error("cancelled") from None
    except USER_ERRORS as error:
        # Gradio shows the message as HTML and it may repeat what the user typed: escape it.
        raise gr.Error(html.escape(str(error), quote=False)) from None


def user_errors(handler):
    """Turn the engines' clear errors into Gradio messages; anything else stays a bug to see in the log.

    Works for plain handlers and for generators (handlers that stream their results).
    """
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def streaming(*args, **kwargs):
            with _as_gradio_errors():
                yield from handler(*args, **kwargs)

        return streaming

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        with _as_gradio_errors():
            return handler(*args, **kwargs)

    return wrapped


def streamed(work, every: float, stopped: Callable[[], bool] | None = None):
    """Run ``work(emit)`` in a thread; yield ``(False, [items emitted since the last yield])`` as it goes, at
    most once per ``every`` seconds, then ``(True, its return value)``.

    The thread runs in a copy of this context, so Gradio's progress bar still reaches the page; an
    exception in ``work`` is raised here. Once ``stopped()`` is true this returns within STOP_POLL_SECONDS
    by raising Cancelled, leaving the thread to stop at its own next check: Gradio counts a job as
    pending, and drops clicks on its button, until the handler returns, and a pass of the engine can take
    many seconds before it looks at its cancel flag.
    """
    items: queue.Queue = queue.Queue()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            items.put(("done", context.run(work, lambda item: items.put(("item", item)))))
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, which raises it
            items.put(("error", error))

    threading.Thread(target=run, daemon=True, name="streamed-job").start()
    pending: list = []
    shown = 0.0
    while True:
        wait = max(0.0, every - (time.monotonic() - shown)) if pending else None
        if stopped is not None:
            wait = STOP_POLL_SECONDS if wait is None else min(wait, STOP_POLL_SECONDS)
        try:
            what, value = items.get(timeout=wait)
        except queue.Empty:  # the pending items have waited long enough, or it is time to look at the flag
            what, value = "flush", None
        if stopped is not None and stopped() and what != "done":
            raise Cancelled("cancelled")
        if what == "error":
            raise value
        if what == "item":
            pending.append(value)
        if pending and (what != "item" or time.monotonic() - shown >= every):
            yield False, pending
            pending, shown = [], time.monotonic()
        if what == "done":
            yield True, value
            return


def in_worker(work, stopped: Callable[[], bool]):
    """``work()``'s value, computed in a thread that this caller stops waiting for once ``stopped()`` is true.

    For read-only jobs only: an abandoned job finishes its current step in the background, so a job that
    changes the session (an edit) must stay in the handler's own thread and stop at the engine's checks.
    """
    for finished, value in streamed(lambda emit: work(), STREAM_SECONDS, stopped):
        if finished:
            return value
    raise AssertionError("streamed ended without a value")


class JobReport:
    """The progress callback of one job of a session; it stops the job once the session pressed cancel.

    Each job has a cancel flag of its own, which becomes the session's current one: a job started right
    after a cancel must not clear the flag that the cancelled job has yet to see.
    """

    def __init__(self, workspace: Workspace, progress) -> None:
        self._flag = workspace.cancel = threading.Event()
        self._progress = progress

    def __call__(self, fraction: float, message: str) -> None:
        if self._flag.is_set():
            raise Cancelled("cancelled")
        self._progress(fraction, desc=message)

    def cancelled(self) -> bool:
        """Whether this job was asked to stop (the engines poll it between steps)."""
        return self._flag.is_set()




def optional_int(value: object, what: str) -> int | None:
    """A whole number typed into a text field, None when left empty."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise InputError(f"{what} must be a whole number or empty, got {text!r}")
    return int(number)


def required_int(value: object, what: str) -> int:
    """A whole number from a field that must not be empty."""
    number = optional_int(value, what)
    if number is None:
        raise InputError(f"{what} must be a whole number")
    return number


def required_float(value: object, what: str) -> float:
    """A finite number from a field."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not np.isfinite(number):
        raise InputError(f"{what} must be a number, got {str(value)!r}")
    return number


def prompt_lines(text: str | None, what: str) -> tuple[str, ...]:
    """The non-empty lines of a multi-line field, at most ``LIMITS.max_prompts`` of them."""
    lines = tuple(line.strip() for line in str(text or "").splitlines() if line.strip())
    if len(lines) > LIMITS.max_prompts:
        raise InputError(f"{len(lines)} {what} given, over the limit of {LIMITS.max_prompts}; remove some")
    return lines


def check_lengths(handle: LoadedModel, texts: tuple[str, ...], what: str) -> tuple[str, ...]:
    """``texts`` unchanged, or a clear error when one is longer than ``LIMITS.max_prompt_tokens`` tokens."""
    for text in texts:
        length = len(handle.tokenizer(text, add_special_tokens=False)["input_ids"])
        if length > LIMITS.max_prompt_tokens:
            raise InputError(f"one of the {what} is {length} tokens long, over the limit of {LIMITS.max_prompt_tokens}; shorten it")
    return texts


def trace_options(kinds: list[str] | None, samples: object, window: object, noise: object, target: str | None = None) -> TraceOptions:
    """Validated trace settings from the page's controls (an empty target: the model's own answer)."""
    kinds = [str(kind) for kind in (kinds or [])]
    if not kinds:
        raise InputError("choose at least one kind to trace (hidden, mlp, attn)")
    return TraceOptions(kinds=tuple(kinds), samples=required_int(samples, "samples"), window=required_int(window, "window"),
                        noise=required_float(noise, "noise"), target=str(target) if target and str(target).strip() else None)


def _figures(result: TraceResult) -> list:
    return [gr.update(value=plots.heatmap(result, kind), visible=True) if kind in result.scores else gr.update(value=None, visible=False)
            for kind in KINDS]


def peak_mlp_layer(result: TraceResult) -> int | None:
    """The layer of the strongest MLP effect at the last subject token: where the paper edits."""
    if "mlp" not in result.scores:
        return None
    return int(np.argmax(np.asarray(result.scores["mlp"])[result.subject_range[1] - 1]))


def write_downloads(result: TraceResult, folder: Path) -> list[str]:
    """The trace as JSON, CSV and ROME's npz (one file per kind), for the download box."""
    paths = [export.write_json(result, folder / "trace.json")]
    (folder / "trace.csv").write_text(export.trace_to_csv(result), encoding="utf-8")
    paths += [folder / "trace.csv", *export.write_npz(result, folder / "trace.npz")]
    return [str(path) for path in paths]


def trace_key(session: EditSession, prompt: str, subject: str | None, options: TraceOptions) -> tuple:
    """What a trace's result depends on: the model, the session's edits, the prompt, subject and options."""
    return (model_fingerprint(session.handle), tuple(edit.digest for edit in session.edits), prompt, subject or None,
            options, LIMITS.trace)


def _trace_outputs(result: TraceResult, session: EditSession, workspace: Workspace) -> tuple:
    caption = plots.caption(result) + (f" (on the model with {len(session.edits)} edit(s) of yours)" if session.edits else "")
    layer = peak_mlp_layer(result)
    return (*_figures(result), caption, result.subject, write_downloads(result, workspace.files()),
            gr.update() if layer is None else str(layer), workspace)


def _finished(estimate: TraceResult, exact: TraceResult, session: EditSession, workspace: Workspace) -> tuple:
    report = plots.agreement_markdown(agreement(exact, estimate), estimate.seconds, exact.seconds)
    return (*_trace_outputs(exact, session, workspace), *_figures(estimate), report)


@user_errors
def run_trace(prompt, subject, kinds, samples, window, noise, workspace: Workspace, target=None, progress=gr.Progress()):
    """Trace handler, on this session's edited model: heatmaps, caption, the subject used, downloads, a layer to
    edit, then the attribution-patching estimate's heatmaps and how far they were from the exact trace.

    Streams: the estimate is drawn first (seconds), then the exact heatmaps appear with their first cells
    and fill in. A trace identical to one already computed (same model, edits, prompt, subject and
    options) comes from a cache at once.
    """
    options = trace_options(kinds, samples, window, noise, target)
    session = workspace.session
    key = trace_key(session, str(prompt), subject, options)
    cached = TRACE_CACHE.get(key)
    if cached is not None:
        yield _finished(*cached, session, workspace)
        return
    report = JobReport(workspace, progress)

    def work(emit) -> tuple[TraceResult, TraceResult]:
        with session.applied():
            estimate = estimate_trace(session.handle, prompt, subject or None, options, LIMITS.trace,
                                      progress=part_of(report, 0, 0.02), partial=emit)
            emit(estimate)
            exact = trace(session.handle, prompt, subject or None, options, LIMITS.trace, progress=report, partial=emit)
        TRACE_CACHE.put(key, (estimate, exact))  # here, not in the page's loop: kept even if the page went away
        return estimate, exact

    for finished, results in streamed(work, STREAM_SECONDS, report.cancelled):
        if finished:
            yield _finished(*results, session, workspace)
            continue
        estimates = [result for result in results if result.method == "atp"]
        exact = [result for result in results if result.method != "atp"]
        if exact:
            exact_part = (*_figures(exact[-1]), plots.caption(exact[-1]), gr.update(), gr.update(), gr.update(), workspace)
        else:  # the estimate comes first: the last trace's exact maps are cleared meanwhile
            exact_part = (*(gr.update(value=None, visible=False) for _ in KINDS),
                          plots.caption(estimates[-1]) + " — estimate drawn below; computing the exact trace",
                          gr.update(), gr.update(), gr.update(), workspace)
        if estimates:
            note = ("**Estimate** (attribution patching), each map on its own relative scale; the exact trace is being "
                    "computed above.")
            estimate_part = (*_figures(estimates[-1]), note)
        else:
            estimate_part = (*(gr.update() for _ in KINDS), gr.update())
        yield (*exact_part, *estimate_part)


@user_errors
def inspect_trace_cell(prompt, subject, kinds, samples, window, noise, cell, workspace: Workspace, target=None):
    """A look inside one cell (``kind,token,layer``, filled by clicking a heatmap) on this session's model."""
    options = trace_options(kinds, samples, window, noise, target)
    kind, token, layer = parse_cell(cell)
    session = workspace.session
    with session.applied():
        found = inspect_cell(session.handle, prompt, subject or None, kind, token, layer, options, LIMITS.trace)
    return plots.inspection_markdown(found)


@user_errors
def compare_traces(prompt, subject, target_new, kinds, samples, window, noise, workspace: Workspace, progress=gr.Progress()):
    """The edit prompt traced on the original and on this session's edited model, with the same noise."""
    session = workspace.session
    if not session.edits:
        raise InputError("no active edits: make an edit first, then trace again to compare")
    options = trace_options(kinds, samples, window, noise)
    # Only the filled prompt is used: a placeholder stands in for an empty target field.
    request = make_request(prompt, subject, target_new or " x")
    report = JobReport(workspace, progress)

    def work() -> tuple[TraceResult, TraceResult]:
        # The answer is fixed to the original model's, so both maps show the probability of the same token.
        original = trace(session.handle, request.filled, request.subject, options, LIMITS.trace,
                         progress=part_of(report, 0, 0.5, "original model: "))
        with session.applied():
            edited = trace(session.handle, request.filled, request.subject, replace(options, target=original.answer),
                           LIMITS.trace, progress=part_of(report, 0.5, 1, "edited model: "))
        return original, edited

    original, edited = in_worker(work, report.cancelled)
    caption = f"original: {plots.caption(original)}\nedited: {plots.caption(edited)}"
    return (*_figures(original), *_figures(edited), caption)


@user_errors
def run_edit(prompt, subject, target_new, target_true, layer, method, paraphrases, neighborhood, generate,
             workspace: Workspace, progress=gr.Progress()):
    """Edit handler: compute the edit, add it to this session, and show before vs after."""
    session = workspace.session
    if len(session.edits) >= LIMITS.max_edits:
        raise InputError(f"{len(session.edits)} edits are active, the limit; undo one first")
    handle = session.handle
    request = make_request(prompt, subject, target_new, target_true or None)
    options = replace(EDIT_OPTIONS, method=str(method), layer=optional_int(layer, "layer"))
    validate_options(handle, options)
    check_lengths(handle, (request.filled, request.target_new, request.target_true or ""), "edit prompt and targets")
    probes = Probes(check_lengths(handle, prompt_lines(paraphrases, "paraphrases"), "paraphrases"),
                    check_lengths(handle, prompt_lines(neighborhood, "neighbourhood prompts"), "neighbourhood prompts"),
                    check_lengths(handle, prompt_lines(generate, "prompts to complete"), "prompts to complete") or (request.filled,),
                    new_tokens=min(GENERATION_TOKENS, LIMITS.max_new_tokens))
    report = JobReport(workspace, progress)
    request = with_true_target(handle, request, session)
    # Outside applied(): the layer, prefixes and C belong to the model's own weights, and a request arriving
    # during the start-up preparation waits here for that work (without holding the model's lock).
    prepared = prepare(handle, options, part_of(report, 0, 0.2))
    with session.applied():
        edit = compute_edit(handle, request, options, progress=report, prepared=prepared)
    result = compare(session, edit, probes)
    session.add(edit)
    rows = comparison_rows(request, probes, result)
    return (
        rows,
        plots.probability_bars(rows),
        plots.generations_html(result, request.target_new, request.target_true),
        plots.metrics_markdown(result["metrics"], result["warnings"]),
        active_rows(session),
        workspace,
    )


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
EDIT_LIST_HEADERS = ["#", "subject", "prompt", "target_new", "layer", "method", "|ΔW|"]


def active_rows(session: EditSession) -> list[list]:
    """The session's active edits, oldest first."""
    return [[i + 1, e["request"]["subject"], e["request"]["prompt"], e["request"]["target_new"], e["layer"], e["method"],
             round(e["delta_norm"], 3)] for i, e in enumerate(session.active())]


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


@user_errors
def complete_prompts(text, workspace: Workspace):
    """Greedy completions of each line on this session's model (with its edits), as an HTML table."""
    session = workspace.session
    prompts = check_lengths(session.handle, prompt_lines(text, "prompts"), "prompts")
    if not prompts:
        raise InputError("type at least one prompt to complete")
    with session.applied():
        texts = complete(session.handle, prompts, min(GENERATION_TOKENS, LIMITS.max_new_tokens))
    rows = "".join(f"<tr><td class='prompt'>{plots.safe_label(p)}</td><td class='completion'>{plots.safe_label(t)}</td></tr>"
                   for p, t in zip(prompts, texts))
    return f"<table class='completions'><tr><th>prompt</th><th>completion ({len(session.edits)} edit(s) active)</th></tr>{rows}</table>"


def fact_set(upload: str | None, limit: object) -> list:
    """The uploaded fact set (``known_1000.json`` format) or the bundled one, cut to ``limit`` facts."""
    count = required_int(limit, "number of facts")
    if not 1 <= count <= LIMITS.max_facts:
        raise InputError(f"number of facts must be between 1 and {LIMITS.max_facts}, got {count}")
    if upload:
        size = Path(upload).stat().st_size
        if size > LIMITS.max_upload_bytes:
            raise InputError(f"the fact set is {size} bytes, over the limit of {LIMITS.max_upload_bytes}")
    return load_facts(upload or None, count)


@user_errors
def run_average(upload, limit, kinds, samples, workspace: Workspace, progress=gr.Progress()):
    """The paper's Figure 2 on this session's model: average effect per layer for each token category."""
    options = trace_options(kinds, samples, TraceOptions.window, TraceOptions.noise)
    facts = fact_set(upload, limit)
    session = workspace.session
    report = JobReport(workspace, progress)

    def work() -> dict:
        with session.applied():
            return average_effects(session.handle, facts, options, LIMITS.trace, progress=report).to_json()

    result = in_worker(work, report.cancelled)
    if not result["facts_correct"]:
        raise InputError(f"the model completes none of the {len(facts)} facts correctly, so there is nothing to average")
    path = workspace.files() / "average.json"
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
            return prompts, average_severed(session.handle, prompts, options, LIMITS.trace, progress=report)

    prompts, result = in_worker(work, report.cancelled)
    path = workspace.files() / "severed.json"
    export.write_data(result, path)
    return plots.severed_figure(result), f"{len(prompts)} of {len(facts)} facts completed correctly and severed.", str(path)


CANCELLED_NOTE = "cancelled: the job stops at its next step; run it again when you like"


def cancel_job(workspace: Workspace) -> str:
    """Ask this session's running job to stop at its next progress step; the note the page shows instead of its result."""
    workspace.cancel.set()
    return CANCELLED_NOTE


def model_summary(handle: LoadedModel) -> str:
    parameters = sum(p.numel() for p in handle.model.parameters())
    return (f"**{plots.safe_label(handle.name)}**: {handle.arch.model_type}, {handle.num_layers} layers, "
            f"{parameters / 1e6:.0f}M parameters")


def status_line(workspace: Workspace):
    """The model status line: this session's model and its background preparation; the poll stops once it is done."""
    name = workspace.model_name
    preparation = _preparations.get(name)
    status = preparation.status() if preparation else None
    loaded = _models.get(name)
    line = model_summary(loaded) if loaded is not None else f"Model: **{plots.safe_label(name)}**"
    if status is None:
        line += "" if loaded is not None else " (loaded on first use)"
    elif status.running:
        line += f" · {plots.safe_label(status.message)} ({100 * status.fraction:.0f}%)"
    else:
        line += f" · {'could not prepare: ' if status.failed else ''}{plots.safe_label(status.message)}"
    return line, gr.Timer(active=bool(status and status.running))


def preparation_status(name: str) -> dict:
    """Where the background preparation of model ``name`` stands, for scripts that wait for it."""
    preparation = _preparations.get(name)
    status = preparation.status() if preparation else Status(0.0, "not started", running=False, loaded=name in _models)
    return {"model": name, **status.to_json()}


@user_errors
def load_session_model(name, workspace: Workspace, progress=gr.Progress()):
    """Switch this session to another model (a hub name or a local folder); its edits on the old model are dropped."""
    name = str(name or "").strip() or DEFAULT_MODEL
    check_model(name, LIMITS)  # which models, how large: refused here before anything is loaded or downloaded
    handle = shared_model(name, progress=lambda f, m: progress(f, desc=m))
    workspace.switch_model(name, handle)
    start_preparation(name)  # the model is loaded: this prepares its first edit in the background
    line, poll = status_line(workspace)
    return line, active_rows(workspace.session), workspace, poll


@functools.lru_cache(maxsize=1)
def sample_cases() -> tuple:
    """The bundled CounterFact cases, read once per process."""
    return tuple(read_dataset(SAMPLE_CASES)[1])


def sample_case_labels() -> list[str]:
    """Labels of the bundled CounterFact cases offered as examples."""
    return [f"{c.case_id}: {c.request.filled} → {c.request.target_new.strip()}" for c in sample_cases()]


def fill_from_case(label: str):
    """The edit panel's fields from a bundled CounterFact case."""
    case = {c.case_id: c for c in sample_cases()}[label.split(":", 1)[0]]
    r = case.request
    return r.prompt, r.subject, r.target_new, r.target_true, "\n".join(case.paraphrases), "\n".join(case.neighborhood), "\n".join(case.generation)


def trace_examples() -> list[list[str]]:
    """Clickable (prompt, subject) pairs from the bundled fact set, spread over its relations."""
    facts = load_facts()
    step = max(1, len(facts) // TRACE_EXAMPLES)
    return [[fact.prompt, fact.subject] for fact in facts[::step][:TRACE_EXAMPLES]]


def _heatmap_row(label: str, elem_id: str) -> list:
    with gr.Row(elem_id=elem_id):
        return [gr.Plot(label=f"{label}{kind}", visible=False, elem_id=f"{elem_id}-{kind}") for kind in KINDS]


# A click on a cell of an exact heatmap writes "kind,token,layer" into the cell field and presses Inspect.
# Plotly draws a new plot element when a figure is replaced, so new ones are looked for every second.
CLICK_TO_INSPECT_JS = """
() => {
  const bind = () => {
    for (const kind of ["hidden", "mlp", "attn"]) {
      const plot = document.querySelector(`#trace-plots-${kind} .js-plotly-plot`);
      if (!plot || plot.__inspectBound || typeof plot.on !== "function") continue;
      plot.__inspectBound = true;
      plot.on("plotly_click", (event) => {
        const point = event.points[0];
        const field = document.querySelector("#inspect-cell textarea, #inspect-cell input");
        field.value = `${kind},${point.y},${point.x}`;
        field.dispatchEvent(new Event("input", {bubbles: true}));
        setTimeout(() => document.querySelector("#inspect-button").click(), 100);
      });
    }
  };
  setInterval(bind, 1000);
}
"""


def build_app(model_name: str = DEFAULT_MODEL) -> gr.Blocks:
    """The page: model, trace, edit and average panels over one shared model, edits kept per browser session."""
    with gr.Blocks(title="ROME Explorer") as demo:
        workspace = gr.State(Workspace(model_name), delete_callback=Workspace.close)
        examples = trace_examples()
        gr.Markdown("# ROME Explorer\nLocate factual associations with causal tracing and rewrite them with ROME (Meng et al.).")
        # Outside the accordion: the start-up preparation's progress is visible without opening anything.
        model_status = gr.Markdown(f"Model: **{plots.safe_label(model_name)}** (loaded on first use)", elem_id="model-status")
        status_poll = gr.Timer(1.0)
        with gr.Accordion("Model", open=False):
            with gr.Row():
                model_field = gr.Textbox(label=field_label(), value=model_name, scale=4)
                load_button = gr.Button("Load", scale=1)
        with gr.Tabs() as tabs:
            with gr.Tab("Trace", id="trace", elem_id="trace-panel"):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", value=examples[0][0], elem_id="trace-prompt")
                    subject = gr.Textbox(label="Subject (guessed when empty)", value=examples[0][1], elem_id="trace-subject")
                    target = gr.Textbox(label="Target (empty: the model's own answer)", value="")
                with gr.Row():
                    kinds = gr.CheckboxGroup(list(KINDS), value=list(KINDS), label="Kinds")
                    samples = gr.Slider(1, LIMITS.max_samples, value=TRACE_DEFAULTS.samples, step=1, label="Samples", elem_id="trace-samples")
                    window = gr.Slider(1, min(30, LIMITS.max_window), value=TRACE_DEFAULTS.window, step=1, label="Window")
                    noise = gr.Slider(0.5, 10, value=TRACE_DEFAULTS.noise, step=0.5, label="Noise (x sigma)")
                with gr.Row():
                    button = gr.Button("Trace", variant="primary", elem_id="trace-button")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="trace-cancel")
                caption = gr.Textbox(label="Result", interactive=False, elem_id="trace-caption")
                plots_out = _heatmap_row("", "trace-plots")
                with gr.Accordion("Look inside a cell: click a cell of a heatmap above", open=True):
                    with gr.Row():
                        cell = gr.Textbox(label="Cell: kind,token,layer (filled by a click on a heatmap)", elem_id="inspect-cell", scale=4)
                        inspect_button = gr.Button("Inspect", elem_id="inspect-button", scale=1)
                    inspection = gr.Markdown(elem_id="inspect-result")
                estimate_note = gr.Markdown(elem_id="trace-estimate-note")
                estimate_out = _heatmap_row("estimate ", "trace-estimate-plots")
                with gr.Row():
                    downloads = gr.File(label="Downloads (JSON, CSV, ROME npz)", file_count="multiple", interactive=False)
                    with gr.Column():
                        trace_layer = gr.Textbox(label="Layer to edit: this trace's peak MLP effect at the last subject token "
                                                       "(an empty layer in the Edit tab uses the model's default, chosen by evaluation)")
                        to_edit = gr.Button("Edit at this layer")
                gr.Examples(examples, [prompt, subject], label="Facts from the bundled set")
            with gr.Tab("Edit", id="edit", elem_id="edit-panel"):
                case = gr.Dropdown(sample_case_labels(), label="Example from the bundled CounterFact sample", value=None)
                with gr.Row():
                    edit_prompt = gr.Textbox(label="Prompt ({} for the subject, or the subject written out)", value="{} is located in the city of", elem_id="edit-prompt")
                    edit_subject = gr.Textbox(label="Subject", value="The Eiffel Tower", elem_id="edit-subject")
                    target_new = gr.Textbox(label="New target", value=" Rome", elem_id="edit-target-new")
                    target_true = gr.Textbox(label="True target (empty: the model's answer)", value="")
                with gr.Row():
                    # A text field: Gradio's Number shows an empty value as 0, which is a real layer.
                    layer = gr.Textbox(label="Layer (empty: the model's default)", value="", elem_id="edit-layer")
                    method = gr.Dropdown(list(METHODS), value="rome", label="Method")
                with gr.Row():
                    paraphrases = gr.Textbox(label="Paraphrases (one per line)", lines=3)
                    neighborhood = gr.Textbox(label="Neighbourhood prompts (one per line)", lines=3, value="The Louvre is located in the city of")
                    generate = gr.Textbox(label="Prompts to complete (one per line)", lines=3, value="The Eiffel Tower is located in")
                with gr.Row():
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                    edit_cancel = gr.Button("Cancel", variant="stop", elem_id="edit-cancel")
                generations = gr.HTML(label="Completions: original | edited", elem_id="edit-generations")
                bars = gr.Plot(label="P(new) and P(true) before vs after", elem_id="edit-bars")
                table = gr.Dataframe(headers=COMPARISON_HEADERS, label="Before vs after", interactive=False)
                metrics = gr.Markdown(label="metrics", elem_id="edit-metrics")
                edits = gr.Dataframe(headers=EDIT_LIST_HEADERS, label="Your active edits", interactive=False, elem_id="edit-list")
                with gr.Row():
                    undo_number = gr.Textbox(label="Edit # to undo (empty: last)", value="", elem_id="undo-number")
                    undo_button = gr.Button("Undo", elem_id="undo-button")
                    reset_button = gr.Button("Reset all", elem_id="reset-button")
                with gr.Accordion("Trace again: original vs edited", open=False):
                    compare_kinds = gr.CheckboxGroup(list(KINDS), value=["mlp"], label="Kinds")
                    compare_button = gr.Button("Trace original and edited")
                    compare_caption = gr.Textbox(label="Result", interactive=False, lines=2)
                    with gr.Row():
                        with gr.Column():
                            gr.Markdown("**Original model**")
                            original_plots = [gr.Plot(label=f"original {kind}", visible=False) for kind in KINDS]
                        with gr.Column():
                            gr.Markdown("**Edited model**")
                            edited_plots = [gr.Plot(label=f"edited {kind}", visible=False) for kind in KINDS]
                with gr.Accordion("Try your edited model", open=False):
                    free_prompts = gr.Textbox(label="Prompts (one per line)", lines=3, value="The Eiffel Tower is located in")
                    complete_button = gr.Button("Complete")
                    completions = gr.HTML(label="completions")
            with gr.Tab("Average effects", id="average", elem_id="average-panel"):
                gr.Markdown("The paper's Figure 2 and its severed-path analysis over a fact set. On the embedded model on 2 CPU "
                            "cores one fact takes about 40 s per kind with 10 samples.")
                with gr.Row():
                    upload = gr.File(label="Fact set (known_1000.json format; empty: the bundled set)", file_types=[".json"], type="filepath")
                    with gr.Column():
                        limit = gr.Slider(1, LIMITS.max_facts, value=5, step=1, label="Facts")
                        average_kinds = gr.CheckboxGroup(list(KINDS), value=["mlp"], label="Kinds")
                        average_samples = gr.Slider(1, LIMITS.max_samples, value=TRACE_DEFAULTS.samples, step=1, label="Samples", elem_id="average-samples")
                with gr.Row():
                    average_button = gr.Button("Average effects", variant="primary")
                    severed_button = gr.Button("Severed paths")
                    average_cancel = gr.Button("Cancel", variant="stop", elem_id="average-cancel")
                average_summary = gr.Markdown(label="summary")
                average_plot = gr.Plot(label="Average effects")
                average_file = gr.File(label="Download (JSON)", interactive=False)

        load_button.click(load_session_model, [model_field, workspace], [model_status, edits, workspace, status_poll], api_name="load_model")
        # Not queued behind a running job: the status line moves while a trace or an edit runs.
        status_poll.tick(status_line, [workspace], [model_status, status_poll], concurrency_limit=None, show_progress="hidden",
                         api_name=False)
        trace_event = button.click(
            run_trace, [prompt, subject, kinds, samples, window, noise, workspace, target],
            [*plots_out, caption, subject, downloads, trace_layer, workspace, *estimate_out, estimate_note], api_name="trace",
        )
        inspect_event = inspect_button.click(
            inspect_trace_cell, [prompt, subject, kinds, samples, window, noise, cell, workspace, target], [inspection],
            api_name="inspect",
        )
        demo.load(None, None, None, js=CLICK_TO_INSPECT_JS)
        to_edit.click(lambda value: (value, gr.Tabs(selected="edit")), [trace_layer], [layer, tabs], api_name=False)
        case.change(fill_from_case, [case], [edit_prompt, edit_subject, target_new, target_true, paraphrases, neighborhood, generate],
                    api_name=False)
        edit_event = edit_button.click(
            run_edit,
            [edit_prompt, edit_subject, target_new, target_true, layer, method, paraphrases, neighborhood, generate, workspace],
            [table, bars, generations, metrics, edits, workspace], api_name="edit",
        )
        undo_button.click(undo_edit, [undo_number, workspace], [edits, workspace], api_name="undo")
        reset_button.click(reset_edits, [workspace], [edits, workspace], api_name="reset")
        compare_event = compare_button.click(
            compare_traces, [edit_prompt, edit_subject, target_new, compare_kinds, samples, window, noise, workspace],
            [*original_plots, *edited_plots, compare_caption], api_name="compare",
        )
        complete_button.click(complete_prompts, [free_prompts, workspace], [completions], api_name="complete")
        average_event = average_button.click(
            run_average, [upload, limit, average_kinds, average_samples, workspace], [average_plot, average_summary, average_file],
            api_name="average",
        )
        severed_event = severed_button.click(
            run_severed, [upload, limit, average_samples, workspace], [average_plot, average_summary, average_file], api_name="severed",
        )

        def model_status_api(model: str = "") -> dict:
            """Where the background preparation of ``model`` (empty: the app's own) stands: loaded, running, message."""
            return preparation_status(str(model or "").strip() or model_name)

        gr.api(model_status_api, api_name="model_status", concurrency_limit=None)
        jobs = [trace_event, inspect_event, edit_event, compare_event, average_event, severed_event]
        for stop, note in ((cancel, caption), (edit_cancel, metrics), (average_cancel, average_summary)):
            # Its own concurrency group, so a cancel is never queued behind the job it cancels. The page stops
            # listening to the cancelled job, so the cancel itself says so where that job's result would appear.
            stop.click(cancel_job, [workspace], [note], cancels=jobs, concurrency_limit=None, api_name=False)
    return demo


def launch(model_name: str | None = None) -> None:
    """Start the app: ``ROME_EXPLORER_MODEL`` (or ``model_name``) on 127.0.0.1 unless GRADIO_SERVER_NAME says otherwise."""
    model_name = model_name or os.environ.get("ROME_EXPLORER_MODEL", DEFAULT_MODEL)
    demo = build_app(model_name)
    # Load the model and prepare its first edit while the page is already served; a failure is shown in the
    # status line, and the first request that needs the model tries again and says why.
    start_preparation(model_name)
    # One job at a time on the shared model; past ``queue_size`` waiting requests Gradio answers "queue is full".
    demo.queue(default_concurrency_limit=1, max_size=LIMITS.queue_size)
    demo.launch()
