"""The plain per-cell executor, written the way the paper describes a cell: the yardstick for the batched one.

For each cell: one ordinary forward pass of the corrupted inputs (every noise sample, as one batch),
with forward hooks that put the clean run's states back at the cell's token (hidden: the block output
of one layer; mlp / attn: the module outputs over the cell's window of layers) and hold the states the
cell freezes (its severed kind's outputs above the restored layer) at the corrupted run's values; then
the answer's probability from a float64 softmax over the whole vocabulary, averaged over the samples.

It takes the cells and the clean and corrupted runs from the package, and nothing from the batched
executor, the scheduler or the blocked softmax: no block is skipped, no position cached, no row shared.
It is slow by design (a whole forward pass per cell).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import numpy as np
import torch

from ..core import hooks
from ..core.models import LoadedModel
from ..tracing.options import DEFAULT_LIMITS, TraceLimits, TraceOptions
from ..tracing.plan import Cell, cells_for_kind
from ..tracing.results import TraceResult, trace_result
from ..tracing.runs import CleanAndCorrupted, run_clean_and_corrupted, validated_inputs


def reference_scores(handle: LoadedModel, runs: CleanAndCorrupted, cells: Sequence[Cell]) -> np.ndarray:
    """Mean answer probability over the corrupted runs for each cell, one whole forward pass per cell."""
    return np.array([reference_score(handle, runs, cell) for cell in cells], dtype=float)


def reference_score(handle: LoadedModel, runs: CleanAndCorrupted, cell: Cell) -> float:
    """The answer's mean probability over the noise samples with ``cell``'s states restored and frozen."""
    arch = handle.arch
    values: dict[tuple[str, int], torch.Tensor] = {}
    for kind, layer in cell.restores:
        values[(kind, layer)] = runs.clean[kind][layer][cell.token]  # (d,): the same in every sample
    for kind, layer in cell.freezes:
        assert (kind, layer) not in values, f"cell restores and freezes {kind} {layer}"
        values[(kind, layer)] = runs.corrupted[kind][layer][:, cell.token]  # (samples, d): each sample its own
    with torch.no_grad(), ExitStack() as stack:
        for (kind, layer), value in values.items():
            stack.enter_context(hooks.on_output(arch.state_module(kind, layer), _set_at(cell.token, value)))
        final = arch.backbone(inputs_embeds=runs.corrupted_embeds, use_cache=False).last_hidden_state[:, -1]
        probabilities = torch.softmax(arch.logits(final).double(), dim=-1)[:, runs.answer_id]
    return float(probabilities.mean())


def _set_at(token: int, value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An output hook's function: the module's output with position ``token`` set to ``value`` in every row."""

    def set_output(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, token] = value
        return output

    return set_output


def reference_trace(
    handle: LoadedModel,
    prompt: str,
    subject: str | None = None,
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
) -> TraceResult:
    """:func:`trace`'s result computed by the reference executor: the same cells, one forward pass each."""
    began = time.perf_counter()
    tokenized, guessed, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    with handle.weights.locked():
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        scores = {}
        for kind in options.kinds:
            cells = cells_for_kind(kind, tokenized, handle.num_layers, options.window)
            # Cells left out restore a state equal to the corrupted one, as in trace: their score is low_score.
            scores[kind] = np.full((tokenized.length, handle.num_layers), runs.low_score)
            for key, value in zip(cells, reference_scores(handle, runs, list(cells.values()))):
                scores[kind][key] = value
    return trace_result(handle, tokenized, guessed, runs, options, noise_std, scores, time.perf_counter() - began)
