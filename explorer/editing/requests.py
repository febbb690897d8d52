"""Edit requests: a prompt template with one ``{}`` for the subject, the subject, and the new (and true) target."""
from __future__ import annotations

from ..core.errors import InputError
from ..core.prompts import clean_text, quoted
from .edits import EditRequest


def make_request(prompt: str, subject: str, target_new: str, target_true: str | None = None) -> EditRequest:
    """A checked request; a prompt without ``{}`` gets one where the subject is written out."""
    prompt = clean_text(prompt, "prompt")
    subject = clean_text(subject, "subject").strip()
    target_new = clean_text(target_new, "target_new")
    if target_true is not None and not str(target_true).strip():
        target_true = None
    if target_true is not None:
        target_true = clean_text(target_true, "target_true")
    prompt = _with_subject_slot(prompt, subject)
    if target_true is not None and target_true.strip() == target_new.strip():
        raise InputError("target_new is the same as target_true; type the new object you want")
    return EditRequest(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true)


def _with_subject_slot(prompt: str, subject: str) -> str:
    """``prompt`` with exactly one ``{}`` (put where the subject is written, when it has none) and text after it."""
    if "{}" not in prompt:
        if subject not in prompt:
            raise InputError(f"the prompt has no {{}} and the subject {quoted(subject)} does not occur in it; write {{}} where the subject goes")
        prompt = prompt.replace(subject, "{}", 1)
    if prompt.count("{}") != 1:
        raise InputError("the prompt must contain {} exactly once, where the subject goes")
    if not prompt.replace("{}", "").strip():
        raise InputError("the prompt must go on after the subject, e.g. '{} is located in the city of'")
    return prompt
