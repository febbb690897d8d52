"""How the edit's settings change its quality: CounterFact metrics of several variants on the same cases.

    python benchmarks/edit_settings.py [--limit 10] [--layer 4] [--variants rome,rome-wd,...] [--json OUT]

Variants (all on the default model, the project's CounterFact sample set, generation skipped):
  rome            the defaults: C from 20k tokens sampled from the model, the family's weight decay
  rome-wd         weight decay 1e-3 (Gemma 3's family setting)
  rome-paper-wd   the paper's weight decay 0.5
  rome-identity   C = identity (no statistics)
  rome-shrink     C with 10% ridge shrinkage
  rome-original   the original code's Λ (bare prompt key)
  ft              FT+L (Adam on W, L∞ ≤ 5e-4)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from explorer.editing import EditOptions
from explorer.evaluate import EvaluationSettings, evaluate, read_dataset
from explorer.models import load_model
from explorer.stats import StatsSpec

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "counterfact_sample.json"


def variants(layer: int) -> dict[str, tuple[str, EditOptions]]:
    base = EditOptions(layer=layer, stats=StatsSpec(corpus="sample", tokens=20_000))
    return {
        "rome": ("rome", base),
        "rome-wd": ("rome", replace(base, weight_decay=1e-3)),
        "rome-paper-wd": ("rome", replace(base, weight_decay=0.5)),
        "rome-identity": ("rome", replace(base, stats=StatsSpec(corpus="identity"))),
        "rome-shrink": ("rome", replace(base, shrinkage=0.1)),
        "rome-original": ("rome-original", base),
        "ft": ("ft", base),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--variants", default="rome,rome-wd,rome-identity,rome-original,ft")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    handle = load_model()
    kind, cases = read_dataset(SAMPLE, args.limit)
    table = variants(args.layer)
    results = {}
    names = ("S", "ES", "PS", "NS", "EM", "PM", "NM")
    print(f"{'variant':<16}" + "".join(f"{n:>14}" for n in names) + f"{'s/edit':>9}", flush=True)
    for name in args.variants.split(","):
        method, options = table[name]
        began = time.perf_counter()
        result = evaluate(handle, cases, kind, EvaluationSettings(method=method, generation=False, edit=options))
        seconds = (time.perf_counter() - began) / len(cases)
        results[name] = {"seconds_per_case": seconds, "metrics": result["metrics"], "unedited": result["unedited"]}
        if "unedited" not in results:
            results["unedited"] = {"metrics": result["unedited"]}
            print(f"{'unedited':<16}" + "".join(f"{result['unedited'][n]['mean']:>8.1f} ±{result['unedited'][n]['ci95']:>4.1f}" for n in names), flush=True)
        print(f"{name:<16}" + "".join(f"{result['metrics'][n]['mean']:>8.1f} ±{result['metrics'][n]['ci95']:>4.1f}" for n in names)
              + f"{seconds:>9.1f}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cases": len(cases), "layer": args.layer, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
