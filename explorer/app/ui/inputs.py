"""Values typed into the page, checked: numbers, prompt lines within the limits, trace settings, fact sets."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ...core.errors import InputError
from ...core.facts import load_facts
from ...core.models import LoadedModel
from ...editing import METHODS, EditOptions
from ...tracing import TraceOptions
from . import config

# The Edit tab's method menu: the project's methods, and the reference code's every setting (--settings reference).
REFERENCE_CHOICE = "reference settings"
METHOD_CHOICES = (*METHODS, REFERENCE_CHOICE)


def edit_options(base: EditOptions, choice: object, layer: int | None = None) -> EditOptions:
    """``base`` with the method menu's choice (and the layer field's value) applied."""
    choice = str(choice)
    if choice == REFERENCE_CHOICE:
        return replace(base, method=None, settings="reference", layer=layer)
    if choice not in METHODS:
        raise InputError(f"unknown method {choice!r}: choose one of {', '.join(METHOD_CHOICES)}")
    return replace(base, method=choice, layer=layer)


def optional_int(value: object, what: str) -> int | None:
    """A whole number typed into a text field, None when left empty."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise InputError(f"{what} must be a whole number or empty, got {text!r}")
    return int(number)


def required_int(value: object, what: str) -> int:
    """A whole number from a field that must not be empty."""
    number = optional_int(value, what)
    if number is None:
        raise InputError(f"{what} must be a whole number")
    return number


def required_float(value: object, what: str) -> float:
    """A finite number from a field."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not np.isfinite(number):
        raise InputError(f"{what} must be a number, got {str(value)!r}")
    return number


def prompt_lines(text: str | None, what: str) -> tuple[str, ...]:
    """The non-empty lines of a multi-line field, at most ``config.LIMITS.max_prompts`` of them."""
    lines = tuple(line.strip() for line in str(text or "").splitlines() if line.strip())
    if len(lines) > config.LIMITS.max_prompts:
        raise InputError(f"{len(lines)} {what} given, over the limit of {config.LIMITS.max_prompts}; remove some")
    return lines


def check_lengths(handle: LoadedModel, texts: tuple[str, ...], what: str) -> tuple[str, ...]:
    """``texts`` unchanged, or a clear error when one is longer than ``config.LIMITS.max_prompt_tokens`` tokens."""
    for text in texts:
        length = len(handle.tokenizer(text, add_special_tokens=False)["input_ids"])
        if length > config.LIMITS.max_prompt_tokens:
            raise InputError(f"one of the {what} is {length} tokens long, over the limit of {config.LIMITS.max_prompt_tokens}; shorten it")
    return texts


def trace_options(kinds: list[str] | None, samples: object, window: object, noise: object, target: str | None = None) -> TraceOptions:
    """Validated trace settings from the page's controls (an empty target: the model's own answer)."""
    kinds = [str(kind) for kind in (kinds or [])]
    if not kinds:
        raise InputError("choose at least one kind to trace (hidden, mlp, attn)")
    return TraceOptions(kinds=tuple(kinds), samples=required_int(samples, "samples"), window=required_int(window, "window"),
                        noise=required_float(noise, "noise"), target=str(target) if target and str(target).strip() else None)


def fact_set(upload: str | None, limit: object) -> list:
    """The uploaded fact set (``known_1000.json`` format) or the bundled one, cut to ``limit`` facts."""
    count = required_int(limit, "number of facts")
    if not 1 <= count <= config.LIMITS.max_facts:
        raise InputError(f"number of facts must be between 1 and {config.LIMITS.max_facts}, got {count}")
    if upload:
        size = Path(upload).stat().st_size
        if size > config.LIMITS.max_upload_bytes:
            raise InputError(f"the fact set is {size} bytes, over the limit of {config.LIMITS.max_upload_bytes}")
    return load_facts(upload or None, count)
