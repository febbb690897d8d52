"""Where the app's time goes beyond the engine's, in one process on the embedded default model.

    python benchmarks/speed/bench_app_overhead.py [--rounds 2]

For the first bundled fact (3 kinds, the paper's settings) and the Eiffel Tower -> Rome edit, each round
times, one after another on the same loaded model:

* trace: the engine alone (estimate + exact trace, no streaming); the engine streaming its partial results
  to a callback that does nothing; the app's trace handler run to its end (streaming, figures, downloads);
  and how long building the figures of one update takes;
* edit: the engine's edit alone; the app's edit handler to its first update (probabilities) and to its end.

The handler runs without a Gradio server, so the difference to the engine is the app's own work (streaming,
figures, downloads, completions and health); bench_load.py measures the whole app through gradio_client.
"""
from __future__ import annotations

import argparse
import time

from explorer.app import plots, ui
from explorer.app.caches import BoundedCache
from explorer.app.ui import edit_handlers
from explorer.core.facts import load_facts
from explorer.core.models import load_model
from explorer.editing import EditOptions, edit_fact, make_request
from explorer.editing.edits import EditSession
from explorer.tracing import TraceOptions, trace
from explorer.tracing.attribution import estimate_trace

QUIET = {"progress": lambda *a, **k: None}


def seconds(work) -> tuple[float, object]:
    began = time.perf_counter()
    value = work()
    return time.perf_counter() - began, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    handle = load_model("default")
    ui.sessions.shared_model = lambda name="default", progress=None: handle  # the handlers use this copy
    fact = load_facts(None, 1)[0]
    options = TraceOptions()
    request = make_request("{} is located in the city of", "The Eiffel Tower", " Rome")
    edit_fact(EditSession(handle), request, EditOptions())  # statistics and prefixes cached before timing
    edit_handlers.session_health(EditSession(handle))  # the probe facts and baseline fluency, as the app's start-up prepares them
    trace(handle, fact.prompt, fact.subject, options)  # derived values (σ, fingerprint) and allocator pools warm
    for round_ in range(args.rounds):
        ui.config.TRACE_CACHE = BoundedCache(32)
        plain, (estimate, exact) = seconds(lambda: (estimate_trace(handle, fact.prompt, fact.subject, options),
                                                    trace(handle, fact.prompt, fact.subject, options)))
        partials = []
        streaming, _ = seconds(lambda: (estimate_trace(handle, fact.prompt, fact.subject, options, partial=partials.append),
                                        trace(handle, fact.prompt, fact.subject, options, partial=partials.append)))
        workspace = ui.Workspace()
        updates = []
        handler, _ = seconds(lambda: updates.extend(ui.run_trace(fact.prompt, fact.subject, list(options.kinds), options.samples,
                                                                 options.window, options.noise, workspace, **QUIET)))
        figures, _ = seconds(lambda: [plots.heatmap(exact, kind) for kind in exact.scores])
        repeat, _ = seconds(lambda: list(ui.run_trace(fact.prompt, fact.subject, list(options.kinds), options.samples,
                                                      options.window, options.noise, workspace, **QUIET)))
        print(f"round {round_ + 1}: trace of {fact.subject!r}")
        print(f"  engine, no streaming        {plain:6.2f} s")
        print(f"  engine, streaming           {streaming:6.2f} s  ({len(partials)} partial results; x{streaming / plain:.2f})")
        print(f"  app handler, to its end     {handler:6.2f} s  ({len(updates)} updates; x{handler / plain:.2f} the engine)")
        print(f"  figures of one update       {figures:6.2f} s  (3 heatmaps)")
        print(f"  repeat from the cache       {repeat:6.2f} s  ({repeat / handler:.3f} of the full trace)")

        engine_edit, _ = seconds(lambda: edit_fact(EditSession(handle), request, EditOptions()))
        workspace = ui.Workspace()
        began = time.perf_counter()
        stages = []
        for _update in ui.run_edit(request.prompt, request.subject, request.target_new, "", "", "rome", "",
                                   "The Louvre is located in the city of", "The Eiffel Tower is located in", workspace, **QUIET):
            stages.append(time.perf_counter() - began)
        print(f"  edit: engine {engine_edit:.2f} s; app first update {stages[0]:.2f} s (x{stages[0] / engine_edit:.2f}), "
              f"completions {stages[1]:.2f} s, whole panel {stages[-1]:.2f} s (x{stages[-1] / engine_edit:.2f})")


if __name__ == "__main__":
    main()
