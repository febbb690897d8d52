"""The entry points: a whole trace, one row of it, and the severed-path analysis."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..core.models import LoadedModel
from ..core.progress import Progress, no_progress, part_of
from .options import DEFAULT_LIMITS, TraceLimits, TraceOptions
from .plan import cells_for_kind, severed_cells
from .results import SEVERED_KEYS, SeveredResult, TraceResult, trace_result
from .runs import run_clean_and_corrupted, validated_inputs
from .scheduling import score_cells


def trace(
    handle: LoadedModel,
    prompt: str,
    subject: str | None = None,
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
    progress: Progress = no_progress,
    partial: Callable[[TraceResult], None] | None = None,
) -> TraceResult:
    """Causal trace of ``prompt``: per kind, the answer's probability with each (token, layer) state restored.

    With ``partial``, the trace so far is handed over as cells are scored (cells not computed yet are
    NaN), the most informative tokens first: the subject's last token and the prompt's last token.
    """
    began = time.perf_counter()
    tokenized, guessed, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    with handle.weights.locked():
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        # All kinds' cells go through one scheduler: cells of different kinds that restore the same token
        # from the same block share batched passes without recomputing anything for nothing.
        cells = {kind: cells_for_kind(kind, tokenized, handle.num_layers, options.window) for kind in options.kinds}
        keys = [(kind, key) for kind in options.kinds for key in cells[kind]]
        # Cells left out of ``cells`` restore a state equal to the corrupted one: their score is low_score.
        scores = {kind: np.full((tokenized.length, handle.num_layers), runs.low_score) for kind in options.kinds}

        def result(seconds: float) -> TraceResult:
            return trace_result(handle, tokenized, guessed, runs, options, noise_std, scores, seconds)

        on_scores = None
        if partial is not None:
            for kind, key in keys:
                scores[kind][key] = np.nan
            on_scores = _filling(scores, keys, lambda: partial(result(time.perf_counter() - began)))
        last_subject = tokenized.subject_range[1] - 1
        values = score_cells(handle, runs, [cells[kind][key] for kind, key in keys], options.memory_mb, progress,
                             on_scores, first_tokens=(last_subject, tokenized.length - 1))
        for (kind, key), value in zip(keys, values):
            scores[kind][key] = value
    return result(time.perf_counter() - began)


def _filling(
    scores: dict[str, np.ndarray], keys: list[tuple[str, tuple[int, int]]], report: Callable[[], None]
) -> Callable[[list[int], np.ndarray], None]:
    """An ``on_scores`` callback: writes each scored cell (an index into ``keys``) into ``scores``, then reports."""

    def fill(indices: list[int], values: np.ndarray) -> None:
        for index, value in zip(indices, values):
            kind, key = keys[index]
            scores[kind][key] = value
        report()

    return fill


def last_subject_effects(
    handle: LoadedModel, prompt: str, subject: str, kind: str = "mlp", options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Indirect effect per layer of restoring ``kind`` at the subject's last token (one row of a trace)."""
    tokenized, _guessed, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    token = tokenized.subject_range[1] - 1
    with handle.weights.locked():
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        cells = cells_for_kind(kind, tokenized, handle.num_layers, options.window)
        layers = [layer for layer in range(handle.num_layers) if (token, layer) in cells]
        scores = np.full(handle.num_layers, runs.low_score)
        scores[layers] = score_cells(handle, runs, [cells[(token, layer)] for layer in layers], options.memory_mb)
    return scores - runs.low_score


def trace_severed(
    handle: LoadedModel,
    prompt: str,
    subject: str | None = None,
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
    progress: Progress = no_progress,
) -> SeveredResult:
    """The paper's severed-path analysis for one prompt (its Figure 3 averages this over facts)."""
    tokenized, _, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    with handle.weights.locked():
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        scores = {}
        for step, (key, severed_kind) in enumerate(SEVERED_KEYS.items()):
            cells = severed_cells(tokenized, handle.num_layers, severed_kind)
            scores[key] = score_cells(handle, runs, [cells[layer] for layer in range(handle.num_layers)], options.memory_mb,
                                      part_of(progress, step / len(SEVERED_KEYS), (step + 1) / len(SEVERED_KEYS), f"{key}: "))
    return SeveredResult(
        prompt=tokenized.prompt,
        subject=tokenized.subject,
        token=tokenized.subject_range[1] - 1,
        answer=handle.tokenizer.decode([runs.answer_id]),
        high_score=runs.high_score,
        low_score=runs.low_score,
        scores=scores,
    )
