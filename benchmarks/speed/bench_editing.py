"""Edit benchmark on the default model: seconds per phase of one ROME edit, and the one-time costs.

    python benchmarks/speed/bench_editing.py [--layer N] [--stats-corpus wikipedia] [--stats-tokens 100000] [--repeat 2]

Without --layer, edits use the model's default layer (1 for the embedded model).

The first edit pays the one-time costs (context prefixes, key statistics, unless already cached; and the
keys/values of the prefixes' own tokens, in the "context" column); the
following ones show the per-edit cost. Each edit is also checked: P(target_new) before and after.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import time

from explorer.core.models import load_model
from explorer.core.scoring import target_probabilities
from explorer.editing import EditOptions, edit_fact, make_request
from explorer.editing.edits import EditSession
from explorer.editing.statistics import StatsSpec

REQUESTS = [
    ("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
    ("{} plays the sport of", "Michael Jordan", " baseball", " basketball"),
    ("The mother tongue of {} is", "Vladimir Putin", " French", " Russian"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--stats-tokens", type=int, default=StatsSpec.tokens)
    parser.add_argument("--stats-corpus", default=StatsSpec.corpus)
    parser.add_argument("--weight-decay", type=float, default=EditOptions().weight_decay)
    parser.add_argument("--repeat", type=int, default=len(REQUESTS))
    args = parser.parse_args()

    began = time.perf_counter()
    handle = load_model()
    print(f"model loaded in {time.perf_counter() - began:.1f} s")
    options = EditOptions(
        layer=args.layer, stats=StatsSpec(corpus=args.stats_corpus, tokens=args.stats_tokens), weight_decay=args.weight_decay
    )
    print(f"{'request':<40}{'total':>8}" + "".join(f"{p:>10}" for p in ("prefixes", "context", "key", "value", "stats", "update"))
          + f"{'steps':>7}{'P(new) before -> after':>26}")
    for prompt, subject, new, true in REQUESTS[: args.repeat]:
        request = make_request(prompt, subject, new, true)
        edit = edit_fact(EditSession(handle), request, options)
        session = EditSession(handle)
        before = target_probabilities(handle, [request.filled], new)[0]
        session.add(edit)
        with session.applied():
            after = target_probabilities(handle, [request.filled], new)[0]
        phases = "".join(f"{edit.phases.get(p, 0.0):>10.2f}" for p in ("prefixes", "context", "key", "value", "stats", "update"))
        label = f"{subject} -> {new.strip()}"
        print(f"{label:<40}{edit.seconds:>8.2f}{phases}{edit.stats['value_steps']:>7}{before:>14.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
