"""ROME Explorer: locate (causal tracing) and edit (ROME) factual associations in language models.

The packages, from the foundations up (each ``__init__`` is its package's manual):

- ``core/``: the model handle and the one owner of its weights, families, hooks, prompts, scoring, generation.
- ``tracing/``: causal tracing and what is built on it (the gradient estimate, one cell inspected, averages).
- ``editing/``: ROME and FT+L, one edit workflow, edits applied and undone exactly, key statistics.
- ``studies/``: compare, health, metrics, evaluate, sequential, sweep, on top of both engines.
- ``app/`` and ``cli/``: the Gradio app and ``python -m explorer`` (``__main__``), which call the same entry points.
- ``testing/``: helpers the tests and benchmarks share.
"""

__version__ = "0.1.0"
