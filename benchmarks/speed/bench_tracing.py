"""Fast tracing engine vs the straightforward per-cell loop, in one process, on the default model.

    python benchmarks/speed/bench_tracing.py [--prompt ...] [--subject ...] [--kinds hidden,mlp,attn] [--skip-oracle]

Prints seconds per kind for each, their ratio, and the max absolute difference over all cells. The
all-kinds trace runs once before the loop and once after it, and the overall ratio uses their mean: the
loop takes over ten minutes, long enough for a shared machine's speed to drift between the two.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from explorer.core.models import load_model
from explorer.testing import oracle
from explorer.tracing import TraceOptions, trace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="The Eiffel Tower")
    parser.add_argument("--kinds", default="hidden,mlp,attn")
    parser.add_argument("--skip-oracle", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    handle = load_model()
    print(f"model loaded in {time.perf_counter() - began:.1f} s")
    kinds = tuple(args.kinds.split(","))
    trace(handle, "The Louvre is in", "The Louvre", TraceOptions(kinds=("hidden",), samples=2))  # warm-up
    options = TraceOptions(kinds=kinds)  # the paper's defaults: 10 samples, window 10, noise 3σ, seed 1
    began = time.perf_counter()
    result = trace(handle, args.prompt, args.subject, options)
    fast_total = time.perf_counter() - began
    print(f"fast engine, all kinds: {fast_total:.1f} s ({len(result.tokens)} tokens, answer {result.answer!r})")
    per_kind = {}
    for kind in kinds:
        began = time.perf_counter()
        single = trace(handle, args.prompt, args.subject, TraceOptions(kinds=(kind,)))
        per_kind[kind] = time.perf_counter() - began
        # one kind alone batches differently from all three together: same numbers up to float rounding
        assert np.abs(single.scores[kind] - result.scores[kind]).max() < 1e-5
    if args.skip_oracle:
        for kind in kinds:
            print(f"{kind:6s} fast {per_kind[kind]:7.1f} s")
        return
    fast_runs = [fast_total]
    total_oracle = 0.0
    worst = 0.0
    for kind in kinds:
        began = time.perf_counter()
        expected = oracle.trace(handle.model, handle.tokenizer, args.prompt, args.subject, kinds=(kind,),
                                samples=options.samples, window_size=options.window, noise=options.noise,
                                seed=options.seed).scores[kind]
        seconds = time.perf_counter() - began
        total_oracle += seconds
        diff = float(np.abs(expected - result.scores[kind]).max())
        worst = max(worst, diff)
        print(f"{kind:6s} per-cell loop {seconds:7.1f} s   fast {per_kind[kind]:7.1f} s   ratio {seconds / per_kind[kind]:5.1f}x   max |diff| {diff:.2e}")
    began = time.perf_counter()
    again = trace(handle, args.prompt, args.subject, TraceOptions(kinds=kinds))
    fast_runs.append(time.perf_counter() - began)
    worst = max(worst, max(float(np.abs(again.scores[kind] - result.scores[kind]).max()) for kind in kinds))
    fast_mean = sum(fast_runs) / len(fast_runs)
    print(f"fast engine, all kinds, after the loop: {fast_runs[-1]:.1f} s (before it: {fast_runs[0]:.1f} s)")
    print(f"all    per-cell loop {total_oracle:7.1f} s   fast {fast_mean:7.1f} s   ratio {total_oracle / fast_mean:5.1f}x   max |diff| {worst:.2e}")


if __name__ == "__main__":
    main()
