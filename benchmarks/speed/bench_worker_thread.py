"""The same trace in the main thread and in a worker thread (where the app's jobs run), in one process.

    python benchmarks/speed/bench_worker_thread.py [--share-heap] [--rounds 2]

The first bundled fact, the paper's settings, streaming its partial results as the app does: seconds of the
estimate and of estimate + exact trace, alternating main thread and a fresh worker thread. With
--share-heap, explorer.app.allocator.share_one_heap() is applied first, as app.py does. Run it also under
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184` to compare glibc's own variables.
"""
from __future__ import annotations

import argparse
import threading
import time

from explorer.app.allocator import share_one_heap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--share-heap", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.share_heap:
        print("share_one_heap:", share_one_heap())
    from explorer.core.facts import load_facts
    from explorer.core.models import load_model
    from explorer.tracing import TraceOptions, trace
    from explorer.tracing.attribution import estimate_trace

    handle = load_model("default")
    fact = load_facts(None, 1)[0]
    options = TraceOptions()

    def work() -> tuple[float, float]:
        began = time.perf_counter()
        estimate_trace(handle, fact.prompt, fact.subject, options, partial=lambda result: None)
        estimated = time.perf_counter() - began
        trace(handle, fact.prompt, fact.subject, options, partial=lambda result: None)
        return estimated, time.perf_counter() - began

    work()  # derived values and allocator pools warm
    for _ in range(args.rounds):
        estimate, total = work()
        print(f"main thread    estimate {estimate:5.2f} s, estimate + exact {total:5.2f} s", flush=True)
        out: list[tuple[float, float]] = []
        worker = threading.Thread(target=lambda: out.append(work()))
        worker.start()
        worker.join()
        print(f"worker thread  estimate {out[0][0]:5.2f} s, estimate + exact {out[0][1]:5.2f} s", flush=True)


if __name__ == "__main__":
    main()
