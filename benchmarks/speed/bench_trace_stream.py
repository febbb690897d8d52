"""What a user waits for when tracing in the app: the first heatmap update, the whole trace, and a repeat.

    python benchmarks/speed/bench_trace_stream.py [--rounds 2]

Starts `python app.py` on the embedded model, waits until its start-up preparation is done (so nothing
else runs), then through gradio_client submits the bundled Eiffel Tower trace (3 kinds, 10 samples,
window 10) and polls the job: seconds to the first update that carries heatmaps, seconds to the final
result, and seconds for the identical trace submitted again (served from the app's cache). Each round
uses a new prompt ending, so its first trace is computed, not cached.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import time

from explorer.testing.app_server import running_app

PROMPTS = ["The Eiffel Tower is located in the city of", "The Eiffel Tower is located in the country of",
           "The Eiffel Tower stands in the city of"]


def timed_trace(client, prompt: str) -> tuple[float, float, int, str]:
    """Seconds to the first update with heatmaps, seconds to the end, the number of updates, and the final
    agreement note (which gives the engine's seconds for the estimate and the exact trace)."""
    began = time.perf_counter()
    job = client.submit(prompt, "The Eiffel Tower", ["hidden", "mlp", "attn"], 10, 10, 3, "", api_name="/trace")
    first = None
    while not job.done():
        if first is None and job.outputs():
            first = time.perf_counter() - began
        time.sleep(0.05)
    total = time.perf_counter() - began
    final = job.result()
    return (first if first is not None else total), total, len(job.outputs()), final[-1].splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from gradio_client import Client

    with running_app() as (url, _served):
        client = Client(url, verbose=False)
        while client.predict("", api_name="/model_status")["running"]:
            time.sleep(1)
        for prompt in PROMPTS[: args.rounds]:
            first, total, updates, note = timed_trace(client, prompt)
            _first, repeat, _updates, _note = timed_trace(client, prompt)
            print(f"{prompt!r}: first heatmaps {first:.1f} s, whole trace {total:.1f} s ({updates} updates); "
                  f"first/whole = {first / total:.3f}; identical repeat {repeat:.2f} s, repeat/whole = {repeat / total:.4f}; "
                  f"{note}", flush=True)


if __name__ == "__main__":
    main()
