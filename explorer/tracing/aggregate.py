"""Averages over a fact set: the paper's Figure 2 (effect by token category) and severed paths."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import InputError
from ..core.facts import Fact, load_facts
from ..core.models import LoadedModel
from ..core.progress import Progress, no_progress, part_of
from ..core.scoring import predicts
from . import DEFAULT_LIMITS, SEVERED_KEYS, TraceLimits, TraceOptions, last_subject_effects, trace, trace_severed

CATEGORIES = (
    "first_subject_token",
    "middle_subject_tokens",
    "last_subject_token",
    "first_subsequent_token",
    "further_tokens",
    "last_token",
)


def category_rows(scores: np.ndarray, subject_range: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per category, the fact's per-layer scores (mean over the category's tokens); empty categories left out."""
    start, end = subject_range
    last = scores.shape[0] - 1
    rows = {"first_subject_token": scores[start], "last_subject_token": scores[end - 1], "last_token": scores[last]}
    if end - start > 2:
        rows["middle_subject_tokens"] = scores[start + 1 : end - 1].mean(axis=0)
    if end < last:
        rows["first_subsequent_token"] = scores[end]
    if end + 1 < last:
        rows["further_tokens"] = scores[end + 1 : last].mean(axis=0)
    return rows


def mean_ci(rows: Sequence[np.ndarray]) -> dict[str, list[float] | int]:
    """Mean per layer and its 95% confidence half-width (normal approximation)."""
    if not rows:
        return {"mean": [], "ci95": [], "count": 0}
    stack = np.vstack(rows)
    std = stack.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros(stack.shape[1])
    return {"mean": stack.mean(axis=0).tolist(), "ci95": (1.96 * std / np.sqrt(len(rows))).tolist(), "count": len(rows)}


@dataclass
class AverageResult:
    """The ``average`` command's JSON content."""

    facts_total: int
    facts_correct: int
    kinds: dict[str, dict[str, dict]] = field(default_factory=dict)
    low_score: float = 0.0
    high_score: float = 0.0

    def to_json(self) -> dict:
        """The documented keys: facts_total, facts_correct, per kind per category mean/ci95, low/high scores."""
        return {
            "facts_total": self.facts_total,
            "facts_correct": self.facts_correct,
            "low_score": self.low_score,
            "high_score": self.high_score,
            **self.kinds,
        }


def average_effects(
    handle: LoadedModel,
    facts: Sequence[Fact],
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
    progress: Progress = no_progress,
) -> AverageResult:
    """Trace every fact the model predicts correctly and average scores per token category and layer."""
    per_kind: dict[str, dict[str, list]] = {kind: {c: [] for c in CATEGORIES} for kind in options.kinds}
    lows, highs, correct = [], [], 0
    for index, fact in enumerate(facts):
        progress(index / max(1, len(facts)), f"fact {index + 1}/{len(facts)}: {fact.subject}")
        if not predicts(handle, fact):
            continue
        correct += 1
        inner = part_of(progress, index / len(facts), (index + 1) / len(facts), f"fact {index + 1}/{len(facts)}: ")
        result = trace(handle, fact.prompt, fact.subject, options, limits, progress=inner)
        lows.append(result.low_score)
        highs.append(result.high_score)
        for kind in options.kinds:
            for category, row in category_rows(result.scores[kind], result.subject_range).items():
                per_kind[kind][category].append((row, row - result.low_score))
    summary = {
        kind: {
            category: {
                **mean_ci([score for score, _ in rows]),
                # each fact's own low_score subtracted: comparable across categories with different fact counts
                "indirect_effect": mean_ci([effect for _, effect in rows]),
            }
            for category, rows in categories.items()
        }
        for kind, categories in per_kind.items()
    }
    return AverageResult(
        facts_total=len(facts),
        facts_correct=correct,
        kinds=summary,
        low_score=float(np.mean(lows)) if lows else 0.0,
        high_score=float(np.mean(highs)) if highs else 0.0,
    )


def known_prompts(handle: LoadedModel, facts: Sequence[Fact]) -> list[tuple[str, str]]:
    """(prompt, subject) of the facts the model completes correctly: the ones worth severing paths on."""
    return [(fact.prompt, fact.subject) for fact in facts if predicts(handle, fact)]


def average_severed(
    handle: LoadedModel,
    prompts: Sequence[tuple[str, str | None]],
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
    progress: Progress = no_progress,
) -> dict:
    """Severed-path scores per layer (``ordinary``, ``mlp_severed``, ``attn_severed``) averaged over prompts."""
    rows: dict[str, list] = {key: [] for key in SEVERED_KEYS}
    lows, highs = [], []
    for index, (prompt, subject) in enumerate(prompts):
        inner = part_of(progress, index / len(prompts), (index + 1) / len(prompts), f"prompt {index + 1}/{len(prompts)}: ")
        result = trace_severed(handle, prompt, subject, options, limits, inner)
        lows.append(result.low_score)
        highs.append(result.high_score)
        for key in SEVERED_KEYS:
            rows[key].append(result.scores[key])
    return {
        "prompts": len(prompts),
        "low_score": float(np.mean(lows)) if lows else 0.0,
        "high_score": float(np.mean(highs)) if highs else 0.0,
        **{key: mean_ci(values) for key, values in rows.items()},
    }


def last_subject_mlp_effects(
    handle: LoadedModel, facts_limit: int, progress: Progress = no_progress, facts: Sequence[Fact] | None = None
) -> tuple[np.ndarray, int]:
    """Mean MLP indirect effect per layer at the last subject token over up to ``facts_limit`` known facts."""
    facts = load_facts() if facts is None else facts
    rows = []
    for fact in facts:
        if len(rows) >= facts_limit:
            break
        progress(len(rows) / facts_limit, f"choosing the edit layer: fact {len(rows) + 1}/{facts_limit}")
        if predicts(handle, fact):
            rows.append(last_subject_effects(handle, fact.prompt, fact.subject, "mlp"))
    if not rows:
        raise InputError("the model completes none of the fact set's facts, so no edit layer can be chosen; give --layer")
    return np.mean(rows, axis=0), len(rows)
