"""Caps that keep one app request bounded, read once from the environment (a public Space serves many users)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from ..core.errors import InputError
from ..tracing import TraceLimits

# Environment variable → the AppLimits field it sets. The defaults are documented in SECURITY.md.
ENVIRONMENT = {
    "ROME_EXPLORER_MAX_PROMPT_TOKENS": "max_prompt_tokens",
    "ROME_EXPLORER_MAX_SAMPLES": "max_samples",
    "ROME_EXPLORER_MAX_WINDOW": "max_window",
    "ROME_EXPLORER_MAX_PROMPTS": "max_prompts",
    "ROME_EXPLORER_MAX_NEW_TOKENS": "max_new_tokens",
    "ROME_EXPLORER_MAX_FACTS": "max_facts",
    "ROME_EXPLORER_MAX_UPLOAD_BYTES": "max_upload_bytes",
    "ROME_EXPLORER_MAX_EDITS": "max_edits",
    "ROME_EXPLORER_QUEUE": "queue_size",
    "ROME_EXPLORER_MAX_RUNNING": "max_running",
    "ROME_EXPLORER_MAX_MODEL_PARAMETERS": "max_model_parameters",
    "ROME_EXPLORER_MAX_MODEL_BYTES": "max_model_bytes",
}


@dataclass(frozen=True)
class AppLimits:
    """Every cap the app enforces; each field has an environment variable in :data:`ENVIRONMENT`."""

    max_prompt_tokens: int = TraceLimits.max_prompt_tokens  # tokens in a traced prompt
    max_samples: int = TraceLimits.max_samples  # corrupted runs per trace
    max_window: int = TraceLimits.max_window  # layers restored together (MLP / attention)
    max_prompts: int = 20  # paraphrase / neighbourhood / completion prompts per request
    max_new_tokens: int = 60  # generated tokens per completion
    max_facts: int = 100  # facts per average or severed run
    max_upload_bytes: int = 5_000_000  # an uploaded fact set
    max_edits: int = 10  # active edits per browser session
    queue_size: int = 16  # waiting requests before the app answers "busy"
    max_running: int = 8  # jobs taking turns on the cores at once (explorer/app/scheduler.py); more wait in Gradio's queue
    # A model the model field loads where the public can reach the app (see model_policy), checked before any download.
    max_model_parameters: int = 2_000_000_000  # parameters, counted from the configuration (8 GB as float32)
    max_model_bytes: int = 10_000_000_000  # bytes of weight files on disk or on the hub

    @property
    def trace(self) -> TraceLimits:
        return TraceLimits(max_prompt_tokens=self.max_prompt_tokens, max_samples=self.max_samples, max_window=self.max_window)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AppLimits:
        """Defaults overridden by any ``ROME_EXPLORER_MAX_*`` / ``ROME_EXPLORER_QUEUE`` variable that is set."""
        values = {}
        for variable, name in ENVIRONMENT.items():
            text = env.get(variable, "").strip()
            if not text:
                continue
            if not text.isdigit() or int(text) < 1:
                raise InputError(f"{variable} must be a whole number of at least 1, got {text!r}")
            values[name] = int(text)
        return cls(**values)


def documented_defaults() -> dict[str, int]:
    """Environment variable → its default, as the dataclass defines it (for the docs and their test)."""
    defaults = {f.name: f.default for f in fields(AppLimits)}
    return {variable: defaults[name] for variable, name in ENVIRONMENT.items()}
