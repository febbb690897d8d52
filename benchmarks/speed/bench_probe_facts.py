"""The health line's probe facts: one forward pass per prompt against one batched pass, with the same answers.

    python benchmarks/speed/bench_probe_facts.py [--rounds 2]
"""
from __future__ import annotations

import argparse
import time

from explorer.core.models import load_model
from explorer.core.scoring import top_prediction, top_predictions
from explorer.studies.health import probe_facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    handle = load_model("default")
    prompts = [fact.prompt for fact in probe_facts(handle)]
    top_predictions(handle, prompts)  # warm
    for _ in range(args.rounds):
        began = time.perf_counter()
        one = [top_prediction(handle, prompt) for prompt in prompts]
        alone = time.perf_counter() - began
        began = time.perf_counter()
        batch = top_predictions(handle, prompts)
        together = time.perf_counter() - began
        print(f"{len(prompts)} probe facts: one at a time {alone:.2f} s, batched {together:.2f} s, same answers: {one == batch}")


if __name__ == "__main__":
    main()
