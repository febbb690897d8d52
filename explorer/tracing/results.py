"""What a trace hands back: plain values and numpy arrays, ready for plots, JSON and the CLI."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.models import LoadedModel
from ..core.prompts import TokenizedPrompt
from .options import TraceOptions
from .runs import CleanAndCorrupted


@dataclass
class TraceResult:
    """Everything a trace measured, as plain values and numpy arrays ``scores[kind][token, layer]``."""

    model: str
    prompt: str
    subject: str
    subject_guessed: bool
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    high_score: float
    low_score: float
    scores: dict[str, np.ndarray]
    noise: float
    noise_std: float
    samples: int
    window: int
    seed: int
    seconds: float
    num_layers: int = 0
    method: str = "exact"  # "exact" (every cell restored) or "atp" (estimated by attribution patching)

    def indirect_effect(self, kind: str) -> np.ndarray:
        """Score minus the corrupted run's score, per cell."""
        return self.scores[kind] - self.low_score


def trace_result(
    handle: LoadedModel,
    tokenized: TokenizedPrompt,
    guessed: bool,
    runs: CleanAndCorrupted,
    options: TraceOptions,
    noise_std: float,
    scores: dict[str, np.ndarray],
    seconds: float,
) -> TraceResult:
    """A :class:`TraceResult` holding copies of ``scores``."""
    return TraceResult(
        model=handle.name,
        prompt=tokenized.prompt,
        subject=tokenized.subject,
        subject_guessed=guessed,
        tokens=tokenized.tokens,
        subject_range=tokenized.subject_range,
        answer=handle.tokenizer.decode([runs.answer_id]),
        answer_id=runs.answer_id,
        high_score=runs.high_score,
        low_score=runs.low_score,
        scores={kind: grid.copy() for kind, grid in scores.items()},
        noise=options.noise,
        noise_std=noise_std,
        samples=options.samples,
        window=options.window,
        seed=options.seed,
        seconds=seconds,
        num_layers=handle.num_layers,
    )


# Result key -> the kind of output frozen above the restored layer (None: nothing frozen).
SEVERED_KEYS = {"ordinary": None, "mlp_severed": "mlp", "attn_severed": "attn"}


@dataclass
class SeveredResult:
    """Per layer: restoring the hidden state at the last subject token, plain and with later MLP/attn severed."""

    prompt: str
    subject: str
    token: int
    answer: str
    high_score: float
    low_score: float
    scores: dict[str, np.ndarray]  # "ordinary" / "mlp_severed" / "attn_severed" -> [layer]
