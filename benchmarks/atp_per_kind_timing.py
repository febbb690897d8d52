"""Time per trace of per-kind, one-step/total and the old per-kind on 5 held-out facts, in one run (docs/attribution.md)."""
import time, json, sys
sys.path.insert(0, "benchmarks")
from atp_agreement import chosen_facts
from explorer.models import load_model
from explorer.attribution import estimate_trace
from explorer.tracing import TraceOptions
h=load_model(); facts=chosen_facts(h,20)[1::2][:5]
t={"per-kind":[], "one-step/total":[], "old per-kind (one-step/total + integrated-4/total)":[]}
for f in facts:
    for name in t:
        b=time.perf_counter()
        if name.startswith("old"):
            estimate_trace(h,f.prompt,f.subject,TraceOptions(kinds=("hidden","attn")),estimator="one-step/total"); estimate_trace(h,f.prompt,f.subject,TraceOptions(kinds=("mlp",)),estimator="integrated-4/total")
        else: estimate_trace(h,f.prompt,f.subject,TraceOptions(),estimator=name)
        t[name].append(time.perf_counter()-b)
print({k:sum(v)/len(v) for k,v in t.items()}, [f.subject for f in facts])
