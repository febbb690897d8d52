"""Many visitors at once on the real app (`python app.py`, the embedded default model) through gradio_client.

    python benchmarks/speed/bench_load.py [--visitors 4 8] [--skip-mix] [--skip-engine]

In one run, on one machine:

1. **Engine**: in this process, on its own copy of the model (the app idle meanwhile), the estimate and the
   exact trace of the first fact, and one edit, as the CLI runs them.
2. **Lone visitor**: one /trace (first heatmap: the first streamed update; complete: the last) and one /edit
   (first result: the first update, the probabilities; complete: the health line) with nobody else there,
   then the same trace again (served from the cache).
3. **N visitors pressing Trace at once** (different bundled facts, 3 kinds, the paper's settings): each
   visitor's first heatmap and completion, the wall time, the app's peak resident memory and the errors.
4. **A mix**: half the visitors edit (Eiffel Tower -> Rome, ...) and then trace the Eiffel Tower fact, the
   other half trace it meanwhile. A visitor who did not edit must get exactly the lone visitor's scores (no
   one ever sees another's edit), an editing visitor different ones.

Prints the ratios of issue 28's goals: the last first heatmap against one lone complete trace, everyone
done against N lone traces, app against engine, a cached repeat against a full trace.
Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from explorer.core.facts import load_facts
from explorer.testing.app_server import running_app

SETTINGS = (["hidden", "mlp", "attn"], 10, 10, 3.0, "")  # kinds, samples, window, noise, target: the paper's
MIX_SETTINGS = (["hidden", "mlp"], 5, 10, 3.0, "")  # the mix's traces: not in the app's cache from the earlier phases
EDITS = [" Rome", " London", " Berlin", " Tokyo"]
POLL_SECONDS = 0.1  # how often a visitor looks for its first update (the clients share the app's two cores)


def trace_args(fact, settings: tuple = SETTINGS) -> tuple:
    return (fact.prompt, fact.subject, *settings)


def edit_args(target: str) -> tuple:
    return ("{} is located in the city of", "The Eiffel Tower", target, "", "", "rome", "",
            "The Louvre is located in the city of", "The Eiffel Tower is located in")


def scores_of(trace_output) -> dict:
    path = next(p for p in trace_output[5] if str(p).endswith(".json"))
    return json.loads(Path(path).read_text(encoding="utf-8"))["traces"]


def timed(client, args, api_name: str, start: float) -> dict:
    """Submit one request; seconds from ``start`` to its first streamed update and to its end."""
    job = client.submit(*args, api_name=api_name)
    first = None
    while not job.done():
        if first is None and job.outputs():
            first = time.perf_counter() - start
        time.sleep(POLL_SECONDS)
    try:
        result = job.result()
    except Exception as error:  # noqa: BLE001 - counted and printed as the visitor's error
        return {"error": str(error)[:200], "first": first, "done": time.perf_counter() - start}
    done = time.perf_counter() - start
    return {"result": result, "first": first if first is not None else done, "done": done, "error": None}


def app_pid(port: int) -> int | None:
    """The pid of the `python app.py` serving ``port`` (for its peak resident memory)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"app.py" in (proc / "cmdline").read_bytes() and f"GRADIO_SERVER_PORT={port}".encode() in (proc / "environ").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    return None


def peak_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def at_once(url: str, requests: list[tuple[tuple, str]]) -> tuple[list[dict], float]:
    """Every request from its own client, all submitted at the same moment; (each one's timing, wall seconds)."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in requests]
    results: list[dict] = [{} for _ in requests]
    gate = threading.Barrier(len(requests) + 1)
    start_box: list[float] = []

    def visit(index: int) -> None:
        gate.wait()
        results[index] = timed(clients[index], requests[index][0], requests[index][1], start_box[0])

    threads = [threading.Thread(target=visit, args=(i,), daemon=True) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    start_box.append(time.perf_counter())
    gate.wait()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start_box[0]


def sequence(url: str, steps: list[tuple[tuple, str]], start: float, client=None) -> list[dict]:
    """One visitor's requests one after another (the same session)."""
    from gradio_client import Client

    client = client or Client(url, verbose=False)
    return [timed(client, args, api_name, start) for args, api_name in steps]


def largest_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two traces' scores (the JSON's "traces"), inf if their shapes differ."""
    import numpy as np

    if a.keys() != b.keys() or any(np.shape(a[k]) != np.shape(b[k]) for k in a):
        return float("inf")
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def engine_times(facts) -> dict:
    """The CLI's work for the first fact and the Eiffel Tower edit, in this process: `trace` (estimate, then exact)
    and `edit` with the app's probes (the true target, the edit, before and after with the same completions)."""
    from explorer.core.models import load_model
    from explorer.editing import EditOptions, edit_fact, make_request
    from explorer.editing.edits import EditSession
    from explorer.studies.compare import Probes, compare, with_true_target
    from explorer.tracing import TraceOptions, trace
    from explorer.tracing.attribution import estimate_trace

    handle = load_model("default")
    options = TraceOptions()
    # The model's derived values (fingerprint, σ of the embeddings) are computed once, as the app's start-up does.
    estimate_trace(handle, facts[0].prompt, facts[0].subject, TraceOptions(kinds=("hidden",), samples=1))
    began = time.perf_counter()
    estimate_trace(handle, facts[0].prompt, facts[0].subject, options)
    estimated = time.perf_counter() - began
    trace(handle, facts[0].prompt, facts[0].subject, options)
    traced = time.perf_counter() - began - estimated
    session = EditSession(handle)
    edit_fact(session, make_request("{} is located in the city of", "The Eiffel Tower", " Rome"), EditOptions())  # warm caches
    app_edit = edit_args(" London")
    probes = Probes(neighborhood=(app_edit[7],), generate=(app_edit[8],))
    began = time.perf_counter()
    request = with_true_target(handle, make_request(app_edit[0], app_edit[1], app_edit[2]), session)
    compare(session, edit_fact(session, request, EditOptions()), probes)
    seconds = time.perf_counter() - began
    # The mix's unedited trace, computed here so that the app computes it afresh while others' edits are live.
    eiffel = next((f for f in facts if f.subject == "The Eiffel Tower"), facts[0])
    kinds, samples, window, noise, _target = MIX_SETTINGS
    mix = trace(handle, eiffel.prompt, eiffel.subject, TraceOptions(kinds=tuple(kinds), samples=samples, window=window, noise=noise))
    unedited = {kind: [[float(v) for v in row] for row in grid] for kind, grid in mix.scores.items()}
    return {"estimate": estimated, "exact": traced, "edit": seconds, "mix_unedited": unedited}


def wait_until_prepared(url: str) -> None:
    from gradio_client import Client

    watcher = Client(url, verbose=False)
    while True:
        status = watcher.predict("", api_name="/model_status")
        if status["loaded"] and not status["running"]:
            return
        time.sleep(0.5)


def line(name: str, timing: dict) -> str:
    error = f"  ERROR {timing['error']}" if timing.get("error") else ""
    return f"  {name:<28} first {timing['first']:6.1f} s   done {timing['done']:6.1f} s{error}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--visitors", type=int, nargs="*", default=[4, 8], help="crowd sizes (none: only the lone visitor and the mix)")
    parser.add_argument("--skip-mix", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    facts = load_facts(None, max(3, 1 + sum(args.visitors)))
    engine = None if args.skip_engine else engine_times(facts)

    with running_app() as (url, served):
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        pid = app_pid(port)
        wait_until_prepared(url)
        print(f"app served in {served:.1f} s, prepared; pid {pid}")
        lone = sequence(url, [(trace_args(facts[0]), "/trace")], time.perf_counter())[0]
        start = time.perf_counter()
        repeat = sequence(url, [(trace_args(facts[0]), "/trace")], start)[0]
        lone_edit = sequence(url, [(edit_args(" Rome"), "/edit")], time.perf_counter())[0]
        eiffel = next((f for f in facts if f.subject == "The Eiffel Tower"), facts[0])
        print("lone visitor:")
        print(line("trace", lone))
        print(line("same trace again (cache)", repeat))
        print(line("edit", lone_edit))
        if engine:
            print(f"engine in this process: estimate {engine['estimate']:.1f} s + exact trace {engine['exact']:.1f} s, "
                  f"edit with its before/after report {engine['edit']:.1f} s")
            print(f"  app trace complete / engine estimate+exact: {lone['done'] / (engine['estimate'] + engine['exact']):.2f}")
            print(f"  app edit first result / engine edit: {lone_edit['first'] / engine['edit']:.2f};"
                  f" whole panel / engine edit: {lone_edit['done'] / engine['edit']:.2f}")
        print(f"  cached repeat / full trace: {repeat['done'] / lone['done']:.3f}")
        print(f"  peak resident memory of the app so far: {peak_mb(pid):.0f} MB")

        first_unused = 1
        for count in args.visitors:
            # Facts no earlier phase traced: a repeat would come from the app's cache.
            visiting, first_unused = facts[first_unused : first_unused + count], first_unused + count
            results, wall = at_once(url, [(trace_args(fact), "/trace") for fact in visiting])
            errors = [r for r in results if r.get("error")]
            print(f"\n{count} visitors press Trace at once (different facts): wall {wall:.1f} s, "
                  f"peak resident {peak_mb(pid):.0f} MB, errors {len(errors)}")
            for i, timing in enumerate(results):
                print(line(f"visitor {i + 1}: {visiting[i].subject[:16]}", timing))
            last_first = max(r["first"] for r in results)
            print(f"  last first heatmap / lone complete trace: {last_first / lone['done']:.2f}")
            print(f"  all done / {count} lone traces: {max(r['done'] for r in results) / (count * lone['done']):.2f}")

        if not args.skip_mix:
            from gradio_client import Client

            if engine is None:
                raise SystemExit("the mix compares with the engine's unedited trace: run it without --skip-engine")
            unedited = engine["mix_unedited"]
            pairs = max(2, max(args.visitors, default=0) // 4)
            start = time.perf_counter()
            outcomes: dict[str, list[dict]] = {}

            def editor(i: int) -> None:
                steps = [(edit_args(EDITS[i % len(EDITS)]), "/edit"), (trace_args(eiffel, MIX_SETTINGS), "/trace")]
                outcomes[f"editor {i + 1}"] = sequence(url, steps, start, Client(url, verbose=False))

            def tracer(i: int) -> None:
                # Its own fact first, so its Eiffel Tower trace runs while the editors' edits are in their sessions.
                steps = [(trace_args(facts[1 + i], MIX_SETTINGS), "/trace"), (trace_args(eiffel, MIX_SETTINGS), "/trace")]
                outcomes[f"tracer {i + 1}"] = sequence(url, steps, start)

            threads = [threading.Thread(target=editor, args=(i,)) for i in range(pairs)]
            threads += [threading.Thread(target=tracer, args=(i,)) for i in range(pairs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            crossed = 0
            print(f"\nmix: {pairs} visitors edit then trace the Eiffel Tower, {pairs} trace another fact and then it "
                  f"(2 kinds, 5 samples): wall {wall:.1f} s, peak resident {peak_mb(pid):.0f} MB")
            for name, timings in sorted(outcomes.items()):
                for step, timing in zip(("edit", "trace") if name.startswith("editor") else ("trace", "trace"), timings):
                    print(line(f"{name} {step}", timing))
                last = timings[-1].get("result")
                if last is None:
                    continue
                difference = largest_difference(scores_of(last), unedited)
                print(f"    {name}'s Eiffel Tower trace vs the engine's unedited one: largest difference {difference:.3g}")
                # A tracer must see the unedited scores exactly; an editor its own edit (other scores).
                crossed += (difference != 0) if name.startswith("tracer") else (difference == 0)
            errors = sum(1 for timings in outcomes.values() for t in timings if t.get("error"))
            print(f"  errors {errors}; Eiffel Tower traces that showed another visitor's edit, or not their own: {crossed}")


if __name__ == "__main__":
    main()
