"""Prompts, subjects and their token positions: validation and tokenisation shared by every engine."""
from __future__ import annotations

import json
import numbers
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as the model sees it, with the subject's half-open token range ``[start, end)``."""

    prompt: str
    subject: str
    input_ids: torch.Tensor  # shape (1, n)
    tokens: list[str]
    subject_range: tuple[int, int]

    @property
    def length(self) -> int:
        """Number of tokens, special tokens included."""
        return int(self.input_ids.shape[1])


_CONTROL_CATEGORIES = {"Cc", "Cs", "Co", "Cn"}
_ALLOWED_CONTROLS = {"\t", "\n"}


def clean_text(value: object, what: str, allow_empty: bool = False) -> str:
    """``value`` as a string fit to tokenise, or :class:`InputError` saying what is wrong with it."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(f"{what} must be text, got {type(value).__name__}")
    bad = sorted({repr(ch) for ch in value if unicodedata.category(ch) in _CONTROL_CATEGORIES and ch not in _ALLOWED_CONTROLS})
    if bad:
        raise InputError(f"{what} contains control characters ({', '.join(bad[:3])}); remove them and try again")
    if not allow_empty and not value.strip():
        raise InputError(f"{what} is empty; type some text")
    return value


def read_json_input(path: str | Path, label: str, wanted: str) -> object:
    """The JSON in a file a user named; a missing file or one that is not JSON is an :class:`InputError`
    that names it (``label``, e.g. "--prefixes-file x.json") and says what to give instead (``wanted``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{label} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{label} is not JSON ({error.__class__.__name__}); give {wanted}") from None


def is_whole_number(value: object) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a bool, a float or text that looks like one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def quoted(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message: escaped (one line) and cut to about ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token id decoded on its own, as shown on heatmap axes."""
    return [tokenizer.decode([int(i)]) for i in ids]


def find_subject(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of ``subject`` in ``prompt`` (its first occurrence)."""
    start = prompt.find(subject)
    if start < 0:
        raise InputError(f"subject {quoted(subject)} does not occur in the prompt; copy it exactly as written there")
    return start, start + len(subject)


def tokenize_prompt(tokenizer, prompt: str, subject: str, max_tokens: int | None = None) -> TokenizedPrompt:
    """Tokenise ``prompt`` (with the tokenizer's special tokens) and locate ``subject`` by character offsets."""
    prompt = clean_text(prompt, "prompt")
    subject = clean_text(subject, "subject")
    subject = subject.strip()
    if subject.strip() == prompt.strip():
        raise InputError("the subject is the whole prompt; the prompt must go on after the subject (e.g. '... is located in')")
    return tokenize_at(tokenizer, prompt, subject, find_subject(prompt, subject), max_tokens)


def tokenize_at(
    tokenizer, text: str, subject: str, char_span: tuple[int, int], max_tokens: int | None = None
) -> TokenizedPrompt:
    """Tokenise ``text`` (special tokens included) with the subject at the character span given.

    Works from the tokenizer's offsets, so BPE and SentencePiece tokenizers, with or without a BOS
    token, and a subject anywhere in the text all map the same way. The subject's range is every token
    that overlaps ``char_span``.
    """
    if not isinstance(text, str) or not isinstance(subject, str):
        raise InputError("the prompt and the subject must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the prompt contains characters that are not valid Unicode (lone surrogates); retype it") from None
    try:
        char_start, char_end = (int(i) for i in char_span)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"the subject's position must be two numbers (start, end), got {quoted(str(char_span))}") from None
    if not 0 <= char_start < char_end <= len(text):
        raise InputError(f"the subject's position {char_start}..{char_end} is not inside the prompt of {len(text)} characters")
    # split_special_tokens: text the user typed, such as "<bos>" or "<start_of_turn>", stays text; only the
    # tokenizer's own BOS is special.
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True, split_special_tokens=True)
    ids = list(encoding["input_ids"])
    if max_tokens is not None and len(ids) > max_tokens:
        raise InputError(f"the prompt is {len(ids)} tokens long, over the limit of {max_tokens}; shorten it")
    offsets = encoding["offset_mapping"]
    covered = [
        i
        for i, (start, end) in enumerate(offsets)
        if end > start and start < char_end and end > char_start and not _is_special(tokenizer, ids[i])
    ]
    if not covered:
        raise InputError(f"subject {quoted(subject)} maps to no token of the prompt")
    return TokenizedPrompt(
        prompt=text,
        subject=subject,
        input_ids=torch.tensor([ids], dtype=torch.long),
        tokens=token_strings(tokenizer, ids),
        subject_range=(covered[0], covered[-1] + 1),
    )


def _is_special(tokenizer, token_id: int) -> bool:
    return token_id in set(getattr(tokenizer, "all_special_ids", []) or [])


_LEADING_ARTICLES = {"The", "A", "An"}
_CONNECTORS = {"of", "de", "la", "le", "von", "van", "der", "du", "del", "da", "and", "&"}
_WORD = re.compile(r"[^\W\d_][\w'’.\-]*|\d[\w.\-]*", re.UNICODE)


def _is_name_word(word: str) -> bool:
    return word[0].isdigit() or any(ch.isupper() for ch in word)


def guess_subject(prompt: str) -> str:
    """Guess the subject: the longest run of capitalised words (articles and 'of'-like links allowed inside)."""
    prompt = clean_text(prompt, "prompt")
    words = list(_WORD.finditer(prompt))
    runs: list[tuple[int, int]] = []  # (first word, last word) index pairs
    i = 0
    while i < len(words):
        if _is_name_word(words[i].group()):
            j = i
            while j + 1 < len(words):
                nxt = words[j + 1].group()
                if _is_name_word(nxt):
                    j += 1
                elif nxt in _CONNECTORS and j + 2 < len(words) and _is_name_word(words[j + 2].group()):
                    j += 2
                else:
                    break
            runs.append((i, j))
            i = j + 1
        else:
            i += 1
    # A sentence-initial article alone ("The mother tongue of ...") is not a subject.
    runs = [r for r in runs if not (r[0] == r[1] and words[r[0]].group() in _LEADING_ARTICLES)]
    if not runs:
        raise InputError("could not guess the subject (no capitalised words); type the subject")
    first, last = max(runs, key=lambda r: (words[r[1]].end() - words[r[0]].start(), -r[0]))
    return prompt[words[first].start() : words[last].end()]
