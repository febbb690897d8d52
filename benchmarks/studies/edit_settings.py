"""How the edit's settings change its quality: CounterFact metrics of several variants on the same cases.

    python benchmarks/studies/edit_settings.py [--limit 10] [--layer 1] [--variants rome,rome-clamp4,...] [--json OUT]

Variants (all on the default model, the project's CounterFact sample set, generation skipped; C from
20k tokens sampled from the model unless said otherwise, as when these variants were measured):
  rome            the model's measured settings (explorer.editing.MODEL_SETTINGS / FAMILY_SETTINGS)
  rome-wikipedia  the same with C from 100k tokens of offline Wikipedia (the default corpus now)
  rome-clamp4     ‖δ‖ ≤ 4 × ‖MLP output‖ and stop below loss 0.05 (the paper's), weight decay 1e-3
  rome-clamp2     the same with ‖δ‖ ≤ 2 × ‖MLP output‖
  rome-clamp1     the same with ‖δ‖ ≤ 1 × ‖MLP output‖
  rome-clamp1-stop  ‖δ‖ ≤ 1 × ‖MLP output‖, stop below loss 0.15
  rome-clamp0.5   ‖δ‖ ≤ 0.5 × ‖MLP output‖, stop below loss 0.15
  rome-lr1        the paper's clamp and stop with Adam's learning rate 1 instead of 0.5
  rome-paper      the paper's clamp, stop and weight decay (0.5)
  rome-identity   C = identity (no statistics)
  rome-shrink     C with 10% ridge shrinkage
  rome-original   the original code's Λ (bare prompt key)
  ft              FT+L (Adam on W, L∞ ≤ 5e-4)

Prints each variant's metrics (± 95% CI), its mean seconds per edit and its mean value-optimisation steps.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from explorer.core.models import load_model
from explorer.editing import EditOptions
from explorer.editing.statistics import StatsSpec
from explorer.studies.evaluate import EvaluationSettings, evaluate, read_dataset

SAMPLE = Path(__file__).resolve().parents[2] / "assets" / "handwritten_counterfact_cases.json"


def variants(layer: int) -> dict[str, tuple[str, EditOptions]]:
    base = EditOptions(layer=layer, stats=StatsSpec(corpus="sample", tokens=20_000))
    clamped = {factor: replace(base, clamp_factor=factor, loss_stop=0.05, weight_decay=1e-3) for factor in (4.0, 2.0, 1.0)}
    return {
        "rome": ("rome", base),
        "rome-wikipedia": ("rome", replace(base, stats=StatsSpec())),
        "rome-clamp4": ("rome", clamped[4.0]),
        "rome-clamp2": ("rome", clamped[2.0]),
        "rome-clamp1": ("rome", clamped[1.0]),
        "rome-clamp1-stop": ("rome", replace(clamped[1.0], loss_stop=0.15)),
        "rome-clamp0.5": ("rome", replace(clamped[1.0], clamp_factor=0.5, loss_stop=0.15)),
        "rome-lr1": ("rome", replace(clamped[4.0], lr=1.0)),
        "rome-paper": ("rome", replace(base, clamp_factor=4.0, loss_stop=0.05, weight_decay=0.5)),
        "rome-identity": ("rome", replace(base, stats=StatsSpec(corpus="identity"))),
        "rome-shrink": ("rome", replace(base, shrinkage=0.1)),
        "rome-original": ("rome-original", base),
        "ft": ("ft", base),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--variants", default="rome,rome-clamp4,rome-identity,rome-original,ft")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    handle = load_model()
    kind, cases = read_dataset(SAMPLE, args.limit)
    table = variants(args.layer)
    results = {}
    names = ("S", "ES", "PS", "NS", "EM", "PM", "NM")
    print(f"{'variant':<16}" + "".join(f"{n:>14}" for n in names) + f"{'s/edit':>9}{'steps':>7}", flush=True)
    for name in args.variants.split(","):
        method, options = table[name]
        began = time.perf_counter()
        result = evaluate(handle, cases, kind, EvaluationSettings(method=method, generation=False, edit=options))
        seconds = (time.perf_counter() - began) / len(cases)
        edits = [case["edit"] for case in result["per_case"]]
        edit_seconds = float(np.mean([edit["seconds"] for edit in edits]))
        steps = float(np.mean([edit["stats"].get("value_steps", 0) for edit in edits]))
        results[name] = {"seconds_per_case": seconds, "seconds_per_edit": edit_seconds, "value_steps": steps,
                         "metrics": result["metrics"], "unedited": result["unedited"], "per_case": result["per_case"]}
        if "unedited" not in results:
            results["unedited"] = {"metrics": result["unedited"]}
            print(f"{'unedited':<16}" + "".join(f"{result['unedited'][n]['mean']:>8.1f} ±{result['unedited'][n]['ci95']:>4.1f}" for n in names), flush=True)
        print(f"{name:<16}" + "".join(f"{result['metrics'][n]['mean']:>8.1f} ±{result['metrics'][n]['ci95']:>4.1f}" for n in names)
              + f"{edit_seconds:>9.1f}{steps:>7.1f}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cases": len(cases), "layer": args.layer, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
