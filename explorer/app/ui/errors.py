"""The engines' clear errors as Gradio messages, for plain and streaming handlers alike."""
from __future__ import annotations

import contextlib
import functools
import html
import inspect

import gradio as gr

from ...core.errors import InputError, ModelLoadError
from ...core.progress import Cancelled

USER_ERRORS = (InputError, ModelLoadError, FloatingPointError, Cancelled)


@contextlib.contextmanager
def _as_gradio_errors():
    try:
        yield
    except Cancelled:
        raise gr.Error("cancelled") from None
    except USER_ERRORS as error:
        # Gradio shows the message as HTML and it may repeat what the user typed: escape it.
        raise gr.Error(html.escape(str(error), quote=False)) from None


def user_errors(handler):
    """Turn the engines' clear errors into Gradio messages; anything else stays a bug to see in the log.

    Works for plain handlers and for generators (handlers that stream their results).
    """
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def streaming(*args, **kwargs):
            with _as_gradio_errors():
                yield from handler(*args, **kwargs)

        return streaming

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        with _as_gradio_errors():
            return handler(*args, **kwargs)

    return wrapped
