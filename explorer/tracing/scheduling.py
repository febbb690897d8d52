"""Which cells share a batched pass, how many fit in memory, and when their states are scored."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..core.models import LoadedModel
from ..core.progress import Progress, no_progress
from .executor import run_pass
from .plan import Cell
from .runs import CleanAndCorrupted
from .unembedding import answer_probabilities

# A streamed trace scores its restored states in batches of at least this many rows: the unembedding is
# bound by memory below a few hundred rows, so scoring each small pass alone would cost more.
STREAM_ROWS = 512


def score_cells(
    handle: LoadedModel,
    runs: CleanAndCorrupted,
    cells: Sequence[Cell],
    memory_mb: int = 1024,
    progress: Progress = no_progress,
    on_scores: Callable[[list[int], np.ndarray], None] | None = None,
    first_tokens: Sequence[int] = (),
) -> np.ndarray:
    """Mean answer probability over the corrupted runs for each cell, in the order given.

    With ``on_scores``, scores are reported as they are computed (``on_scores(cell indices, scores)``),
    the cells restoring ``first_tokens`` first; the unembedding then runs every STREAM_ROWS rows
    instead of once at the end.
    """
    if not cells:
        return np.zeros(0)
    samples = runs.samples
    groups = _passes(cells, max(1, _rows_budget(handle, runs, memory_mb) // samples), first_tokens)
    final_states = torch.empty(len(cells) * samples, runs.corrupted_embeds.shape[-1], dtype=runs.corrupted_embeds.dtype)
    scores = np.zeros(len(cells))
    waiting: list[int] = []  # cells whose final states are in, not yet scored
    for done, group in enumerate(groups):
        progress(done / len(groups), f"restored {sum(len(g) for g in groups[:done])}/{len(cells)} cells")
        states = run_pass(handle, runs, [cells[i] for i in group])
        for slot, index in enumerate(group):
            final_states[index * samples : (index + 1) * samples] = states[slot * samples : (slot + 1) * samples].cpu()
        waiting += group
        if on_scores is not None and (len(waiting) * samples >= STREAM_ROWS or done == len(groups) - 1):
            rows = torch.cat([final_states[i * samples : (i + 1) * samples] for i in waiting])
            scores[waiting] = answer_probabilities(handle, rows, runs.answer_id, memory_mb).reshape(len(waiting), samples).mean(axis=1)
            on_scores(waiting, scores[waiting])
            waiting = []
    if on_scores is not None:
        return scores
    probs = answer_probabilities(handle, final_states, runs.answer_id, memory_mb)
    return probs.reshape(len(cells), samples).mean(axis=1)


def _passes(cells: Sequence[Cell], max_cells: int, first_tokens: Sequence[int]) -> list[list[int]]:
    """Cell indices per batched pass: the cells of one token (at most ``max_cells``), ``first_tokens`` first.

    Cells restoring the same token share a key/value prefix, so they run in one pass as far as they fit;
    within a token they are sorted by start, so that cells which can share blocks (plan_pass) land in the
    same pass.
    """
    rank = {token: place for place, token in enumerate(first_tokens)}
    order = sorted(range(len(cells)), key=lambda i: (rank.get(cells[i].token, len(rank)), cells[i].token, cells[i].start))
    groups: list[list[int]] = []
    for index in order:
        if groups and len(groups[-1]) < max_cells and cells[groups[-1][0]].token == cells[index].token:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _rows_budget(handle: LoadedModel, runs: CleanAndCorrupted, memory_mb: int) -> int:
    """How many sequences one batched pass may hold within ``memory_mb``."""
    config = handle.model.config
    hidden = runs.corrupted_embeds.shape[-1]
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    n = runs.prompt.length
    element = runs.corrupted_embeds.element_size()
    per_row = n * (6 * hidden + 3 * intermediate + 4 * n) * element + handle.num_layers * 2 * n * hidden * element
    return max(runs.samples, int(memory_mb * 2**20 // per_row))
