"""The errors a user can act on: each message is one line that says what to do (the app and the CLI show it as is)."""
from __future__ import annotations


class InputError(ValueError):
    """Input the user can fix; the message is one line that says what to do."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and why."""
