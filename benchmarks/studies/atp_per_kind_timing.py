"""Time per trace of per-kind, one-step/total and the old per-kind on 5 held-out facts, in one run (docs/attribution.md)."""
import sys
import time

sys.path.insert(0, "benchmarks")
from atp_agreement import chosen_facts

from explorer.core.models import load_model
from explorer.tracing import TraceOptions
from explorer.tracing.attribution import estimate_trace

OLD = "old per-kind (one-step/total + integrated-4/total)"


def one_trace(handle, fact, name: str) -> None:
    if name == OLD:
        estimate_trace(handle, fact.prompt, fact.subject, TraceOptions(kinds=("hidden", "attn")), estimator="one-step/total")
        estimate_trace(handle, fact.prompt, fact.subject, TraceOptions(kinds=("mlp",)), estimator="integrated-4/total")
    else:
        estimate_trace(handle, fact.prompt, fact.subject, TraceOptions(), estimator=name)


def main() -> None:
    handle = load_model()
    facts = chosen_facts(handle, 20)[1::2][:5]
    seconds: dict[str, list[float]] = {"per-kind": [], "one-step/total": [], OLD: []}
    for fact in facts:
        for name, times in seconds.items():
            began = time.perf_counter()
            one_trace(handle, fact, name)
            times.append(time.perf_counter() - began)
    print({name: sum(times) / len(times) for name, times in seconds.items()}, [fact.subject for fact in facts])


if __name__ == "__main__":
    main()
