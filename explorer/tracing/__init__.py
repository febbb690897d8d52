"""Causal tracing: how much of the answer's probability comes back when one state is restored.

A trace makes one clean run and ``samples`` corrupted runs (noise on the subject's token embeddings),
then, for every cell (token, layer) of each *kind*, restores the clean state in the corrupted runs and
measures the answer's mean probability.

The straightforward algorithm (``explorer/testing/reference_trace.py``) reruns the whole model for every cell. The engine skips
the work that cannot change: the clean and corrupted runs are made once (``runs``); cells before the
subject, and final-layer hidden cells off the last token, restore a state equal to the corrupted one and
are not run (``plan``); all cells restoring one token share one batched pass (``scheduling``), which
reruns neither the blocks below a cell's first restored layer nor the positions before the token, and
copies what still equals the corrupted run (``executor``); the unembedding runs at the last position
only, over many cells together (``unembedding``).

Data flow::

    options ──> runs.validated_inputs ──> runs.run_clean_and_corrupted ──> CleanAndCorrupted
    plan.cells_for_kind / severed_cells ──> Cells
    scheduling.score_cells: Cells grouped per token ──> executor.BatchedPass (plan.plan_pass orders its rows)
        ──> final states ──> unembedding.answer_probabilities ──> scores
    api.trace / trace_severed / last_subject_effects ──> results.TraceResult / SeveredResult

The modules, one job each:

- ``options``: the kinds (hidden, mlp, attn), per-request caps (:class:`TraceLimits`), :class:`TraceOptions`
  and their validation.
- ``runs``: the prompt (tokenised, subject located), the answer token, the noise and σ, and the clean and
  corrupted runs every cell starts from (:class:`CleanAndCorrupted`).
- ``plan``: :class:`Cell` (one restoration experiment), the cells of each kind and of the severed-path
  analysis, windows, and :func:`plan_pass`, which orders one pass's cells so they share blocks.
- ``executor``: :class:`BatchedPass`, one forward pass for all cells restoring one token, skipping the
  work whose result is already known (its docstring lists what it skips).
- ``scheduling``: which cells share a pass, how many fit in ``memory_mb``, when states are scored
  (:func:`score_cells`, streaming with ``on_scores``).
- ``unembedding``: the answer's probability, a softmax over blocks of the vocabulary.
- ``results``: :class:`TraceResult` and :class:`SeveredResult`, plain values and numpy arrays.
- ``api``: :func:`trace`, :func:`last_subject_effects`, :func:`trace_severed`.

Built on the engine, each in its own module (import them from their modules):

- ``aggregate``: the average indirect effect over many facts by token category, and the severed averages.
- ``attribution``: the gradient estimate of a whole trace in seconds, and its agreement with the trace.
- ``inspection``: one cell opened up (the top tokens with and without the restoration).
- ``export``: trace results as JSON, CSV and ROME's npz layout (the CLI's files, the app's downloads).

The plain per-cell executor the batched one is held to lives with the tests' helpers
(``explorer/testing/reference_trace.py``), beside the independent oracle ``explorer/testing/oracle.py``.

The names below are the package's public surface; import them from ``explorer.tracing``.
"""
from .api import last_subject_effects, trace, trace_severed
from .executor import BatchedPass, run_pass
from .options import DEFAULT_LIMITS, KINDS, TraceLimits, TraceOptions, validate_options
from .plan import Cell, PassPlan, cells_for_kind, plan_pass, severed_cells, window_layers
from .results import SEVERED_KEYS, SeveredResult, TraceResult, trace_result
from .runs import (
    CleanAndCorrupted,
    answer_token,
    embedding_std,
    prepare_prompt,
    run_clean_and_corrupted,
    subject_noise,
    validated_inputs,
)
from .scheduling import STREAM_ROWS, score_cells
from .unembedding import VOCAB_BLOCK, answer_probabilities

__all__ = [
    "BatchedPass",
    "Cell",
    "CleanAndCorrupted",
    "DEFAULT_LIMITS",
    "KINDS",
    "PassPlan",
    "SEVERED_KEYS",
    "STREAM_ROWS",
    "SeveredResult",
    "TraceLimits",
    "TraceOptions",
    "TraceResult",
    "VOCAB_BLOCK",
    "answer_probabilities",
    "answer_token",
    "cells_for_kind",
    "embedding_std",
    "last_subject_effects",
    "plan_pass",
    "prepare_prompt",
    "run_clean_and_corrupted",
    "run_pass",
    "score_cells",
    "severed_cells",
    "subject_noise",
    "trace",
    "trace_result",
    "trace_severed",
    "validate_options",
    "validated_inputs",
    "window_layers",
]
