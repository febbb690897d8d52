"""Does the layer tracing points to give the best edit? Layer sweeps of bundled CounterFact cases on the default model.

For each case: the MLP indirect effect at the last subject token per layer (the trace) and the same ROME edit
at every layer, scored on the case's own prompts (``explorer.studies.sweep``). Reported: the traced peak and the
best layer per case, the correlation between them over cases (Pearson, with a bootstrap 95% interval), the
per-case rank correlation between the effect and the edit score over layers (mean, with a bootstrap
interval), and the seconds per sweep (the first case's includes the one-pass key statistics of all layers
when they are not cached yet).

    python benchmarks/studies/sweep_localisation.py --cases 10 --out benchmarks/studies/sweep_localisation_10cases.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from explorer.core.facts import ASSETS
from explorer.core.models import load_model
from explorer.editing import EditOptions
from explorer.editing.edits import EditSession
from explorer.studies.compare import Probes
from explorer.studies.evaluate import read_dataset
from explorer.studies.sweep import sweep_layers

BOOTSTRAP = 10_000


def ranks(values) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def bootstrap_interval(values: np.ndarray, statistic, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(BOOTSTRAP)]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/studies/sweep_localisation_10cases.json")
    args = parser.parse_args()
    handle = load_model("default")
    _kind, cases = read_dataset(ASSETS / "handwritten_counterfact_cases.json", args.cases)
    per_case = []
    for case in cases:
        began = time.perf_counter()
        result = sweep_layers(EditSession(handle), case.request, Probes(case.paraphrases, case.neighborhood), None, EditOptions())
        seconds = time.perf_counter() - began
        scores = [point["score"] for point in result["layers"]]
        per_case.append({"case_id": case.case_id, "subject": case.request.subject, "peak_layer": result["peak_layer"],
                         "best_layer": result["best_layer"], "rank_correlation": spearman(result["mlp_effect"], scores),
                         "seconds": seconds, "sweep": result})
        print(f"case {case.case_id} ({case.request.subject}): traced peak {result['peak_layer']}, best edit {result['best_layer']}, "
              f"rank correlation {per_case[-1]['rank_correlation']:.2f}, {seconds:.0f} s", flush=True)
    pairs = np.array([(c["peak_layer"], c["best_layer"]) for c in per_case], dtype=float)

    def pearson(rows):
        return float(np.corrcoef(rows[:, 0], rows[:, 1])[0, 1]) if np.ptp(rows[:, 0]) and np.ptp(rows[:, 1]) else np.nan

    within = np.array([c["rank_correlation"] for c in per_case])
    summary = {
        "cases": len(per_case),
        "peak_vs_best_pearson": pearson(pairs),
        "peak_vs_best_pearson_ci95": bootstrap_interval(pairs, pearson),
        "best_equals_peak": int((pairs[:, 0] == pairs[:, 1]).sum()),
        "mean_abs_layer_gap": float(np.abs(pairs[:, 0] - pairs[:, 1]).mean()),
        "effect_vs_score_rank_correlation_mean": float(within.mean()),
        "effect_vs_score_rank_correlation_ci95": bootstrap_interval(within, np.mean),
        "seconds_per_sweep": [c["seconds"] for c in per_case],
    }
    print(json.dumps(summary, indent=1))
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump({"summary": summary, "cases": per_case}, out, indent=1)


if __name__ == "__main__":
    main()
