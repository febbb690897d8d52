"""What a trace may be asked for: the kinds of state, the per-request caps and the options."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from ..core.prompts import clean_text, is_whole_number

KINDS = ("hidden", "mlp", "attn")


@dataclass(frozen=True)
class TraceLimits:
    """Caps that keep one request bounded (a public Space serves many users)."""

    max_prompt_tokens: int = 64
    max_samples: int = 50
    max_window: int = 64
    max_noise: float = 100.0


DEFAULT_LIMITS = TraceLimits()


@dataclass(frozen=True)
class TraceOptions:
    """What to trace and how; the defaults are the paper's."""

    kinds: tuple[str, ...] = KINDS
    samples: int = 10
    window: int = 10
    noise: float = 3.0  # multiple of the subject-embedding standard deviation
    seed: int = 1
    target: str | None = None  # None: the clean run's top-1 token
    memory_mb: int = 1024  # cap for batched activations; larger prompts or models fall back to smaller batches


def validate_options(options: TraceOptions, limits: TraceLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`InputError` for options no trace can run with."""
    unknown = [kind for kind in options.kinds if kind not in KINDS]
    if unknown or not options.kinds:
        raise InputError(f"unknown kind {unknown[0] if unknown else '(none)'!r}: choose from {', '.join(KINDS)}")
    if not 1 <= options.samples <= limits.max_samples:
        raise InputError(f"samples must be between 1 and {limits.max_samples}, got {options.samples}")
    if not 1 <= options.window <= limits.max_window:
        raise InputError(f"window must be between 1 and {limits.max_window}, got {options.window}")
    if not (np.isfinite(options.noise) and 0 < options.noise <= limits.max_noise):
        raise InputError(f"noise must be above 0 and at most {limits.max_noise}, got {options.noise}")
    if not (is_whole_number(options.seed) and 0 <= options.seed < 2**32):
        raise InputError(f"seed must be a whole number from 0 to {2**32 - 1}, got {options.seed!r}"[:200])
    if options.target is not None and options.target != "":
        clean_text(options.target, "target")
