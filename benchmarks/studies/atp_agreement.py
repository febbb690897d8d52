"""How well attribution patching estimates the exact trace, over facts of the bundled set the model knows.

    python benchmarks/studies/atp_agreement.py [--facts 20] [--estimators one-step,integrated-2,one-step/total,...]
        [--held-out] [--json OUT]

For each fact (every k-th fact of assets/known_facts.json that the default model completes correctly,
so the relations are spread), the exact trace (paper defaults: 3 kinds, 10 samples, window 10) and each
estimator's, both timed in this run. Exact traces are kept in benchmarks/studies/atp_agreement_exact_traces.json
(keyed by prompt, subject and options), so a rerun with other estimators costs only the estimates.
Prints per estimator and kind: the mean Pearson correlation of the indirect effects over all cells
(± 95% CI over facts), how often the peak token and the peak cell agree, and for MLP, on the facts whose
exact peak is at a subject token, how often the estimate peaks at that same token; and time per trace.
``NAME/total`` is the old window estimate (each member's total gradient). With ``--held-out`` the facts are
split alternately: per kind the estimator is chosen on the even-numbered half (highest peak-token agreement,
then highest r, then the cheaper) and its agreement is reported on the odd-numbered half only.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from explorer.core.facts import load_facts
from explorer.core.models import load_model
from explorer.core.scoring import predicts
from explorer.tracing import KINDS, TraceOptions, trace
from explorer.tracing.attribution import ESTIMATORS, estimate_trace
from explorer.tracing.attribution import agreement as compare
from explorer.tracing.export import trace_from_json, trace_to_json

EXACT = Path(__file__).resolve().parent / "atp_agreement_exact_traces.json"


def chosen_facts(handle, count: int) -> list:
    """``count`` known facts spread over the set: every k-th fact, skipping the ones the model gets wrong."""
    facts = load_facts()
    stride = max(1, len(facts) // (3 * count))
    picked = []
    for fact in facts[::stride]:
        if len(picked) == count:
            break
        if predicts(handle, fact):
            picked.append(fact)
    return picked


def agreement(exact, estimate, kind: str) -> dict:
    found = compare(exact, estimate)[kind]
    start, end = exact.subject_range
    return {"r": found["correlation"], "peak_token": found["peak_token_agrees"], "peak_cell": found["peak_cell_agrees"],
            "subject_peak": bool(start <= found["exact_peak"][0] < end), "max_abs_error": found["max_abs_error"]}


def mean_ci(values) -> str:
    values = np.asarray(values, dtype=float)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} ± {half:.2f}"


def summarize(per_fact: list[dict], kind: str) -> dict:
    """Mean r ± 95% CI, peak token / cell shares, and for MLP the share of subject-peaked facts kept on the token."""
    values = [fact[kind] for fact in per_fact]
    rs = np.asarray([v["r"] for v in values], dtype=float)
    half = 1.96 * rs.std(ddof=1) / math.sqrt(len(rs)) if len(rs) > 1 else 0.0
    subject = [v for v in values if v["subject_peak"]]
    return {"facts": len(values), "r": float(rs.mean()), "r_ci95": float(half),
            "peak_token": float(np.mean([v["peak_token"] for v in values])),
            "peak_cell": float(np.mean([v["peak_cell"] for v in values])),
            "subject_facts": len(subject),
            "subject_token": float(np.mean([v["peak_token"] for v in subject])) if subject else float("nan")}


def line(kind: str, found: dict) -> str:
    text = (f"  {kind:<6} r = {found['r']:.2f} ± {found['r_ci95']:.2f}, peak token {found['peak_token']:.0%}, "
            f"peak cell {found['peak_cell']:.0%}")
    if kind == "mlp" and found["subject_facts"]:
        text += (f"; exact peak at a subject token in {found['subject_facts']} facts, estimate on the same token in "
                 f"{found['subject_token']:.0%}")
    return text


def choose(summaries: dict[str, dict], kind: str) -> str:
    """The selection half's criterion: highest peak-token agreement, then highest mean r, then the cheaper."""
    return max(summaries, key=lambda name: (round(summaries[name][kind]["peak_token"], 6),
                                            round(summaries[name][kind]["r"], 6), -summaries[name]["seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--estimators", default=",".join([*ESTIMATORS, "per-kind"]))
    parser.add_argument("--held-out", action="store_true",
                        help="choose per kind on the even-numbered facts, report on the odd-numbered ones only")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    handle = load_model()
    options = TraceOptions()
    stored = json.loads(EXACT.read_text()) if EXACT.exists() else {}
    facts = chosen_facts(handle, args.facts)
    rows: dict[str, list] = {name: [] for name in args.estimators.split(",")}
    exact_seconds, estimate_seconds = [], {name: [] for name in rows}
    for number, fact in enumerate(facts, start=1):
        key = json.dumps([fact.prompt, fact.subject, list(options.kinds), options.samples, options.window, options.noise, options.seed])
        if key not in stored:
            began = time.perf_counter()
            stored[key] = trace_to_json(trace(handle, fact.prompt, fact.subject, options))
            stored[key]["seconds"] = time.perf_counter() - began
            EXACT.write_text(json.dumps(stored))
        exact = trace_from_json(stored[key])
        exact_seconds.append(exact.seconds)
        for name in rows:
            began = time.perf_counter()
            estimate = estimate_trace(handle, fact.prompt, fact.subject, options, estimator=name)
            estimate_seconds[name].append(time.perf_counter() - began)
            rows[name].append({kind: agreement(exact, estimate, kind) for kind in KINDS})
        print(f"{number}/{len(facts)} {fact.subject}: exact {exact.seconds:.1f} s", flush=True)
    print(f"\n{len(facts)} facts; exact trace {np.mean(exact_seconds):.1f} s on average (read back from {EXACT.name} where cached)")
    halves = {"all": range(len(facts))}
    if args.held_out:
        halves = {"selection": range(0, len(facts), 2), "held-out": range(1, len(facts), 2)}
    summary: dict[str, dict] = {}
    for half, indices in halves.items():
        summary[half] = {}
        print(f"\n== {half} half: {len(indices)} facts ==" if args.held_out else "")
        for name, per_fact in rows.items():
            seconds = float(np.mean(estimate_seconds[name]))
            summary[half][name] = {"seconds": seconds, **{kind: summarize([per_fact[i] for i in indices], kind) for kind in KINDS}}
            print(f"\n{name}: {seconds:.2f} s per trace, all facts of this run "
                  f"(exact / estimate = {np.mean(exact_seconds) / seconds:.1f}x)")
            for kind in KINDS:
                print(line(kind, summary[half][name][kind]))
    chosen = {}
    if args.held_out:
        chosen = {kind: choose(summary["selection"], kind) for kind in KINDS}
        print("\n== chosen on the selection half (peak token, then r, then cost); agreement on the held-out half ==")
        for kind, name in chosen.items():
            print(f"{name}:")
            print(line(kind, summary["held-out"][name][kind]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"facts": [f.subject for f in facts], "exact_seconds": exact_seconds,
                                                   "estimate_seconds": estimate_seconds, "summary": summary,
                                                   "chosen": chosen, "per_fact": rows}, indent=1))


if __name__ == "__main__":
    main()
