"""Two `evaluate` runs on the same cases, side by side: each run's metrics and their paired difference.

    python benchmarks/studies/paired_metrics.py A.json B.json [--metrics ES,PS,NS,EM,PM,NM]

For each metric: A's and B's mean (± 95% CI, normal approximation over cases, as `evaluate` prints it) and
the mean of the per-case difference B − A with its 95% CI (normal approximation over the paired
differences). A difference whose interval holds 0 is not a measured difference.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def per_case(path: Path, metric: str) -> dict[str, float]:
    """Metric (in percent) after the edit, per case id, for the cases that have it."""
    cases = json.loads(path.read_text())["per_case"]
    return {case["case_id"]: 100 * case["after"][metric] for case in cases if case["after"].get(metric) is not None}


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--metrics", default="ES,PS,NS,EM,PM,NM")
    args = parser.parse_args()
    print(f"A = {args.first.name}\nB = {args.second.name}")
    print(f"{'metric':<8}{'cases':>6}{'A':>16}{'B':>16}{'B - A (paired)':>20}")
    for metric in args.metrics.split(","):
        a, b = per_case(args.first, metric), per_case(args.second, metric)
        shared = sorted(set(a) & set(b), key=lambda case: (len(case), case))
        first, second = np.array([a[c] for c in shared]), np.array([b[c] for c in shared])
        cells = [mean_ci(first), mean_ci(second), mean_ci(second - first)]
        print(f"{metric:<8}{len(shared):>6}" + "".join(f"{m:>10.1f} ± {h:<4.1f}" for m, h in cells[:2])
              + f"{cells[2][0]:>+13.1f} ± {cells[2][1]:<4.1f}")


if __name__ == "__main__":
    main()
