"""Studies built on the tracing and editing engines, each a function from a model and requests to a JSON report.

- ``compare``: one edit's before/after snapshot (probabilities, completions, decoded success, the paper's scores).
- ``health``: the model's health after edits (probe facts kept, fluency, ‖ΔW‖/‖W‖).
- ``metrics``: the paper's metrics as pure functions over numbers and texts.
- ``evaluate``: CounterFact and zsRE evaluation over many records, with intervals.
- ``sequential``: many edits one after another, with checkpoints.
- ``sweep``: the same edit at every layer beside the trace's MLP effect.

Every study edits through :func:`explorer.editing.run_edit` (one edit workflow for every caller).
"""
