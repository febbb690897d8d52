"""Robustness properties, checked with hypothesis on tiny random models.

1. Hostile text and out-of-range numbers give a valid result or a one-line :class:`InputError`, never
   another exception: prompt cleaning, tokenisation, edit requests, edit and trace options.
2. The subject's token range is exactly the tokens that overlap its characters, wherever it stands,
   with and without a BOS token.
3. Any sequence of adding, undoing, clearing and applying edits leaves the weights bit for bit as
   they were outside :meth:`EditSession.applied`.
4. A request that fails mid-forward, or one that is cancelled, inside ``applied()`` leaves the
   model unedited and without hooks.
5. Damaged cache files (statistics, context prefixes, traced layer) are rebuilt, never served.

(Same seed, same trace: ``tests/tracing/test_api.py::test_same_seed_same_result_and_other_seed_differs``.)

The number of examples each property tries is its ``EXAMPLES`` entry.
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import string
import tempfile
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from explorer.core.errors import InputError
from explorer.core.generation import complete
from explorer.core.models import model_fingerprint
from explorer.core.progress import Cancelled, no_progress
from explorer.core.prompts import TokenizedPrompt, clean_text, tokenize_at, tokenize_prompt
from explorer.core.scoring import target_probabilities
from explorer.editing import METHODS, EditOptions, edit_fact, make_request, traced_peak_layer
from explorer.editing import statistics as stats
from explorer.editing import validate_options as validate_edit_options
from explorer.editing.edits import ARRAY_FIELDS, EditRequest, EditSession, load_edit
from explorer.editing.prefixes import context_prefixes
from explorer.editing.statistics import StatsSpec, second_moment, stats_folder
from explorer.tracing import KINDS, TraceLimits, TraceOptions, aggregate, trace, trace_severed
from explorer.tracing import validate_options as validate_trace_options
from tests.conftest import REPO, _tiny_tokenizer, build_tiny

# Hypothesis examples per property (reported in SECURITY.md).
EXAMPLES = {
    "clean_text": 100,
    "tokenize_prompt": 100,
    "tokenize_at": 100,
    "make_request": 100,
    "edit_options": 100,
    "trace_options": 100,
    "subject_range": 100,
    "absent_subject": 50,
    "session_ops": 100,  # per family (llama, gpt2)
    "failed_request": 50,  # per family (llama, gpt2)
    "cancelled_request": 30,  # per family (llama, gpt2)
    "saved_edit": 100,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None, suppress_health_check=[HealthCheck.too_slow])


PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
REQUESTS = (
    make_request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
    make_request("{} plays the", "Miles Davis", " guitar"),
)
CHEAP = dict(steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))
TOKENIZERS = {with_bos: _tiny_tokenizer(with_bos) for with_bos in (True, False)}
_BAD_CATEGORIES = {"Cc", "Cs", "Co", "Cn"}

# ---------------------------------------------------------------- hostile text

HOSTILE = [
    "",
    " ",
    "   \t  ",
    "\n",
    "\r\n",
    "\x00",
    "a\x00b",
    "\x07\x08",
    "\x1b[31mred\x1b[0m",
    "\u202e",
    "\u202eexe.txt",
    "\u200b",
    "\ufeff",
    "\u2028",
    "\x85",
    "\ud800",
    "\udfff",
    "\uffff",
    "\U0010ffff",
    "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "\U0001f1eb\U0001f1f7",
    "\u0645\u0631\u062d\u0628\u0627",
    "\u05e9\u05dc\u05d5\u05dd",
    "\u65e5\u672c\u8a9e",
    "e\u0301\u0308\u0323",
    "<img src=x onerror=alert(1)>",
    "</script><script>alert(1)</script>",
    "{}",
    "{",
    "}",
    "{0}",
    "{{}}",
    "%s%n",
    "<bos>",
    "<eos>",
    "<pad>",
    "'",
    '"',
    "\\",
    "Eiffel Tower",
    " is located in",
]
_fragments = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=8))
hostile_text = st.one_of(
    st.text(),
    st.lists(_fragments, max_size=6).map("".join),
    st.tuples(st.text(min_size=1, max_size=3), st.integers(300, 2000)).map(lambda pair: pair[0] * pair[1]),
)
not_text = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=8), st.lists(st.text(max_size=3), max_size=3))


@st.composite
def text_with_part(draw, text=hostile_text):
    """(text, a slice of it): a subject that does occur in the prompt."""
    whole = draw(text)
    start = draw(st.integers(0, len(whole)))
    end = draw(st.integers(start, min(len(whole), start + 40)))
    return whole, whole[start:end]


def _assert_one_line(error: InputError) -> None:
    message = str(error)
    assert message.strip(), "an InputError needs a message"
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, repr(message)


def _attempt(function, *args, **kwargs) -> tuple[bool, object]:
    """(True, result) or (False, None) for a one-line InputError; any other exception fails the test."""
    try:
        return True, function(*args, **kwargs)
    except InputError as error:
        _assert_one_line(error)
        return False, None


def _decoded(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def _check_tokenized(tokenizer, result: TokenizedPrompt, max_tokens: int | None, subject_text: str) -> None:
    n = result.length
    assert result.input_ids.shape == (1, n) and result.input_ids.dtype == torch.long and n >= 1
    assert len(result.tokens) == n
    start, end = result.subject_range
    assert 0 <= start < end <= n
    assert max_tokens is None or n <= max_tokens
    assert subject_text in _decoded(tokenizer, result.input_ids[0, start:end].tolist())


# ---------------------------------------------------------------- 1. validators under hostile input


@_settings("clean_text")
@given(value=st.one_of(hostile_text, not_text), allow_empty=st.booleans())
def test_clean_text_gives_the_text_back_or_a_one_line_error(value, allow_empty):
    ok, result = _attempt(clean_text, value, "prompt", allow_empty=allow_empty)
    if ok:
        assert isinstance(result, str) and result == (value if value is not None else "")
        assert allow_empty or result.strip()
        assert not any(unicodedata.category(ch) in _BAD_CATEGORIES and ch not in "\t\n" for ch in result)


@_settings("tokenize_prompt")
@given(
    with_bos=st.booleans(),
    pair=st.one_of(st.tuples(hostile_text, hostile_text), text_with_part()),
    max_tokens=st.one_of(st.none(), st.integers(-2, 300)),
)
def test_tokenize_prompt_gives_a_valid_range_or_a_one_line_error(with_bos, pair, max_tokens):
    prompt, subject = pair
    tokenizer = TOKENIZERS[with_bos]
    ok, result = _attempt(tokenize_prompt, tokenizer, prompt, subject, max_tokens=max_tokens)
    if ok:
        assert result.prompt == prompt and result.subject == subject.strip() and result.subject in prompt
        _check_tokenized(tokenizer, result, max_tokens, result.subject)


@st.composite
def text_and_span(draw):
    if draw(st.booleans()):
        text = draw(hostile_text)
        start = draw(st.integers(0, len(text)))
        return text, (start, draw(st.integers(start, len(text))))
    text = draw(st.one_of(hostile_text, not_text))
    span = draw(
        st.one_of(
            st.tuples(st.integers(-3, 60), st.integers(-3, 60)),
            st.tuples(st.floats(), st.floats()),
            st.lists(st.integers(0, 5), max_size=3),
            st.none(),
            st.text(max_size=3),
        )
    )
    return text, span


@_settings("tokenize_at")
@given(with_bos=st.booleans(), pair=text_and_span(), subject=st.one_of(hostile_text, st.none()), max_tokens=st.one_of(st.none(), st.integers(-2, 300)))
def test_tokenize_at_gives_a_valid_range_or_a_one_line_error(with_bos, pair, subject, max_tokens):
    text, span = pair
    tokenizer = TOKENIZERS[with_bos]
    ok, result = _attempt(tokenize_at, tokenizer, text, subject, span, max_tokens)
    if ok:
        assert result.prompt == text
        _check_tokenized(tokenizer, result, max_tokens, text[int(span[0]) : int(span[1])])


@_settings("make_request")
@given(
    pair=st.one_of(st.tuples(hostile_text, hostile_text), text_with_part()),
    target_new=hostile_text,
    target_true=st.one_of(st.none(), hostile_text),
)
def test_make_request_gives_a_checked_request_or_a_one_line_error(pair, target_new, target_true):
    prompt, subject = pair
    ok, request = _attempt(make_request, prompt, subject, target_new, target_true)
    if ok:
        assert isinstance(request, EditRequest)
        assert request.prompt.count("{}") == 1 and request.prompt.replace("{}", "").strip()
        assert request.subject and request.subject == request.subject.strip()
        assert request.target_new.strip()
        assert request.target_true is None or request.target_true.strip() != request.target_new.strip()
        if "{}" not in prompt:
            assert request.filled == prompt  # the subject goes back where it was written
        for text in (request.prompt, request.subject, request.target_new, request.target_true or ""):
            assert not any(unicodedata.category(ch) in _BAD_CATEGORIES and ch not in "\t\n" for ch in text)


@functools.lru_cache(maxsize=None)
def _validation_model():
    return build_tiny("gpt2", seed=3)


_odd_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1, 0, 10**6, 2**63, float("nan"), float("inf")])
)


@_settings("edit_options")
@given(
    method=st.one_of(st.sampled_from(METHODS), hostile_text),
    layer=st.one_of(st.none(), st.integers(-3, 8), st.sampled_from([10**9, -(10**9), True]), st.floats(), st.text(max_size=3)),
    steps=st.one_of(st.integers(-3, 300), st.sampled_from([0, 10**6])),
    shrinkage=st.one_of(st.floats(0, 1), _odd_numbers),
    lr=st.one_of(st.just(0.5), _odd_numbers),
    prefixes=st.one_of(
        st.just(((5, 10), (10, 10))),
        st.lists(st.tuples(st.integers(-2, 200), st.integers(-2, 200)), max_size=3).map(tuple),
        st.lists(st.lists(st.integers(0, 9), max_size=3).map(tuple), max_size=2).map(tuple),
    ),
    corpus=st.one_of(
        st.sampled_from(["sample", "identity", "wikipedia", f"text:{REPO / 'README.md'}", "text:~nosuchuser9/x.txt"]),
        hostile_text,
        hostile_text.map(lambda text: "text:" + text),
        st.integers(),
    ),
    tokens=st.one_of(st.integers(-10, 20_000_000), st.sampled_from([255, 256, 10_000_000, 10_000_001])),
    seed=st.one_of(st.integers(0, 5), st.integers()),
)
def test_edit_options_are_valid_or_a_one_line_error(method, layer, steps, shrinkage, lr, prefixes, corpus, tokens, seed):
    handle = _validation_model()
    stats_spec = StatsSpec(corpus=corpus, tokens=tokens, seed=seed)
    options = EditOptions(method=method, layer=layer, steps=steps, shrinkage=shrinkage, lr=lr, prefixes=prefixes, stats=stats_spec)
    ok, _ = _attempt(validate_edit_options, options, handle)
    if ok:  # what passes is runnable
        assert options.method in METHODS
        assert options.layer is None or (isinstance(options.layer, int) and 0 <= options.layer < handle.num_layers)
        assert isinstance(options.steps, int) and 1 <= options.steps <= 200
        assert math.isfinite(options.shrinkage) and options.shrinkage >= 0 and math.isfinite(options.lr) and options.lr >= 0
        assert all(1 <= length <= 64 and 0 <= count <= 100 for length, count in options.prefixes)
        assert isinstance(corpus, str) and (corpus in ("sample", "identity", "wikipedia") or corpus.startswith("text:"))
        assert corpus == "identity" or 256 <= tokens <= 10_000_000
        assert 0 <= seed < 2**31


@_settings("trace_options")
@given(
    kinds=st.lists(st.one_of(st.sampled_from(KINDS), hostile_text), max_size=4).map(tuple),
    samples=st.one_of(st.integers(-3, 80), st.sampled_from([0, 10**6, 2**63])),
    window=st.one_of(st.integers(-3, 80), st.sampled_from([0, 10**6])),
    noise=st.one_of(st.floats(0.1, 10), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1.0, 0.0, float("nan")])),
    target=st.one_of(st.none(), hostile_text),
    limits=st.one_of(
        st.just(TraceLimits()),
        st.builds(TraceLimits, max_samples=st.integers(-2, 100), max_window=st.integers(-2, 100), max_noise=_odd_numbers),
    ),
)
def test_trace_options_are_valid_or_a_one_line_error(kinds, samples, window, noise, target, limits):
    options = TraceOptions(kinds=kinds, samples=samples, window=window, noise=noise, target=target)
    ok, _ = _attempt(validate_trace_options, options, limits)
    if ok:
        assert options.kinds and all(kind in KINDS for kind in options.kinds)
        assert 1 <= options.samples <= limits.max_samples and 1 <= options.window <= limits.max_window
        assert math.isfinite(options.noise) and 0 < options.noise <= limits.max_noise
        assert target in (None, "") or clean_text(target, "target") == target


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_trace_seed_out_of_range_is_a_one_line_error(seed):
    handle = _validation_model()
    with pytest.raises(InputError):
        trace(handle, PROMPT, SUBJECT, TraceOptions(samples=2, kinds=("hidden",), seed=seed))


# ---------------------------------------------------------------- 2. the subject's token range

_clean_chars = st.characters(exclude_categories=("Cc", "Cs", "Co", "Cn"), include_characters="\t\n")
_printable = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", max_size=15)
_part = st.one_of(
    _printable,
    st.text(alphabet=_clean_chars, max_size=15),
    # special-token names typed as text stay text
    st.lists(st.one_of(st.sampled_from(["<bos>", "<eos>", "<pad>", " ", "\n"]), _printable), max_size=4).map("".join),
)


def _overlapping_tokens(tokenizer, text: str, span: tuple[int, int]) -> list[int]:
    """Indices of the non-special tokens whose characters intersect ``span``, from the tokenizer's offsets."""
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True, split_special_tokens=True)
    wanted = set(range(*span))
    specials = set(tokenizer.all_special_ids)
    return [
        i
        for i, (token, (begin, end)) in enumerate(zip(encoding["input_ids"], encoding["offset_mapping"]))
        if token not in specials and wanted & set(range(begin, end))
    ]


def _assert_exact_range(tokenizer, result: TokenizedPrompt, span: tuple[int, int]) -> None:
    start, end = result.subject_range
    assert 0 <= start < end <= result.length
    assert list(range(start, end)) == _overlapping_tokens(tokenizer, result.prompt, span)
    assert result.prompt[span[0] : span[1]] in _decoded(tokenizer, result.input_ids[0, start:end].tolist())
    if tokenizer is TOKENIZERS[True]:
        assert int(result.input_ids[0, 0]) == tokenizer.bos_token_id and start >= 1  # never the BOS
    assert tokenizer.bos_token_id not in result.input_ids[0, 1:].tolist()  # "<bos>" typed as text stays text


@_settings("subject_range")
@given(
    with_bos=st.booleans(),
    prefix=_part,
    subject=_part.filter(lambda text: text.strip()),
    suffix=_part,
    where=st.sampled_from(["start", "middle", "end"]),
)
def test_subject_range_is_exactly_the_tokens_over_its_characters(with_bos, prefix, subject, suffix, where):
    tokenizer = TOKENIZERS[with_bos]
    prefix = "" if where == "start" else prefix
    suffix = "" if where == "end" else suffix
    prompt = prefix + subject + suffix
    span = (len(prefix), len(prefix) + len(subject))
    _assert_exact_range(tokenizer, tokenize_at(tokenizer, prompt, subject, span), span)
    # The user-facing entry point: the stripped subject, at its first occurrence.
    stripped = subject.strip()
    if stripped == prompt.strip():
        with pytest.raises(InputError, match="whole prompt"):
            tokenize_prompt(tokenizer, prompt, subject)
        return
    first = prompt.find(stripped)
    _assert_exact_range(tokenizer, tokenize_prompt(tokenizer, prompt, subject), (first, first + len(stripped)))


@_settings("absent_subject")
@given(with_bos=st.booleans(), prompt=_part.filter(lambda text: text.strip()), subject=_part.filter(lambda text: text.strip()))
def test_absent_subject_is_a_one_line_error(with_bos, prompt, subject):
    assume(subject.strip() not in prompt)
    with pytest.raises(InputError, match="does not occur") as caught:
        tokenize_prompt(TOKENIZERS[with_bos], prompt, subject)
    _assert_one_line(caught.value)


# ---------------------------------------------------------------- 3. exact restoration


@functools.lru_cache(maxsize=None)
def _edited_model(family: str):
    """A tiny model, three edits computed on it (two ROME layers and one FT) and its original weights."""
    handle = build_tiny(family)
    edits = (
        edit_fact(EditSession(handle), REQUESTS[0], EditOptions(layer=1, **CHEAP)),
        edit_fact(EditSession(handle), REQUESTS[1], EditOptions(layer=2, **CHEAP)),
        edit_fact(EditSession(handle), REQUESTS[1], EditOptions(method="ft", layer=1, ft_steps=3, ft_norm=1e-2, ft_lr=1e-2)),
    )
    originals = {name: p.detach().clone() for name, p in handle.model.named_parameters()}
    matrices = {layer: handle.arch.mlp_out_weight(layer).detach().clone() for layer in range(handle.num_layers)}
    return handle, edits, originals, matrices


def _assert_pristine(handle, originals) -> None:
    for name, parameter in handle.model.named_parameters():
        assert torch.equal(parameter, originals[name]), f"{name} differs from the original"


def _assert_edited(handle, matrices, edits) -> None:
    """Inside applied(): each edited matrix is the original with the edits added in order, as applied() does."""
    for layer in {edit.layer for edit in edits}:
        expected = matrices[layer]
        for edit in edits:
            if edit.layer == layer:
                expected = (expected.double() + edit.update()).to(expected.dtype)
        assert torch.equal(handle.arch.mlp_out_weight(layer), expected)


def _session(handle, *edits) -> EditSession:
    """A session holding ``edits``, applied only inside its ``applied()``."""
    session = EditSession(handle)
    for edit in edits:
        session.add(edit)
    return session


def _assert_left_clean(handle, originals) -> None:
    """The original weights, no hook, and the model's lock free."""
    _assert_pristine(handle, originals)
    _assert_no_hooks(handle)
    _assert_unlocked(handle)


def _assert_no_hooks(handle) -> None:
    from torch.nn.modules import module as torch_module

    for name, module in handle.model.named_modules():
        for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, attribute), f"{name or 'model'} keeps {attribute}"
        assert "forward" not in module.__dict__, f"{name or 'model'} keeps a replaced forward"
    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks


def _assert_unlocked(handle) -> None:
    """No request left the model's lock held: another thread can take it."""
    taken = []

    def take() -> None:
        with handle.weights.locked():
            taken.append(True)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(10)
    assert taken == [True], "the model's lock is still held"


class _Boom(RuntimeError):
    pass


_operation = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2)),
    st.tuples(st.just("undo"), st.integers(-4, 4)),
    st.tuples(st.just("clear"), st.just(0)),
    st.tuples(st.just("apply"), st.sampled_from(["plain", "raise", "nested", "other"])),
    st.tuples(st.just("other"), st.lists(st.integers(0, 2), max_size=3)),
)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@_settings("session_ops")
@given(operations=st.lists(_operation, max_size=12), other=st.lists(st.integers(0, 2), max_size=3))
def test_any_sequence_of_session_operations_restores_the_weights_bit_for_bit(family, operations, other):
    handle, edits, originals, matrices = _edited_model(family)
    session, second = EditSession(handle), EditSession(handle)
    stack: list[int] = []
    for index in other:
        second.add(edits[index])
    for name, argument in operations:
        if name == "add":
            session.add(edits[argument])
            stack.append(argument)
        elif name == "undo":
            if -len(stack) <= argument < len(stack):
                assert session.undo(argument) is edits[stack.pop(argument)]
            else:
                with pytest.raises(InputError):
                    session.undo(argument)
        elif name == "clear":
            session.clear()
            stack.clear()
        elif name == "other":
            second.clear()
            for index in argument:
                second.add(edits[index])
            other = argument
        else:
            applied = [edits[i] for i in stack]
            try:
                with session.applied():
                    _assert_edited(handle, matrices, applied)
                    if argument == "raise":
                        raise _Boom("request failed")
                    if argument == "nested":  # re-entrant: the same edits once more, then back to once
                        with session.applied():
                            _assert_edited(handle, matrices, applied + applied)
                        _assert_edited(handle, matrices, applied)
                    if argument == "other":  # another session's edits on top, in the same thread
                        with second.applied():
                            _assert_edited(handle, matrices, applied + [edits[i] for i in other])
                        _assert_edited(handle, matrices, applied)
            except _Boom:
                assert argument == "raise"
        assert [edits.index(e) for e in session.edits] == stack
        _assert_pristine(handle, originals)
    _assert_no_hooks(handle)
    _assert_unlocked(handle)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hostile_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@functools.lru_cache(maxsize=None)
def _saved_edit_parts() -> tuple[dict, dict]:
    """The JSON header and the arrays of a real saved edit (llama, layer 1)."""
    _handle, edits, _originals, _matrices = _edited_model("llama")
    with tempfile.TemporaryDirectory() as folder:
        path = edits[0].save(Path(folder) / "edit.npz")
        with np.load(path) as data:
            return json.loads(str(data["header"])), {key: data[key].copy() for key in data.files if key != "header"}


@st.composite
def damaged_edit_file(draw) -> tuple[object, dict]:
    """A saved edit with one part damaged: the header, one of its fields, the request, or an array."""
    header, arrays = _saved_edit_parts()
    header, arrays = json.loads(json.dumps(header)), dict(arrays)
    part = draw(st.sampled_from(["header", "field", "request", "array", "no-array"]))
    if part == "header":
        header = draw(_json)
    elif part == "field":
        key = draw(st.sampled_from(sorted(header) + ["extra"]))
        if draw(st.booleans()):
            header.pop(key, None)
        else:
            header[key] = draw(_json)
    elif part == "request":
        texts = st.one_of(hostile_text, _json)
        fields = {name: texts for name in ("prompt", "subject", "target_new", "target_true")}
        header["request"] = draw(st.one_of(_json, st.fixed_dictionaries(fields), st.fixed_dictionaries({}, optional=fields)))
    elif part == "array":
        width = len(arrays["left"])
        shape = draw(st.lists(st.sampled_from([0, 1, width - 1, width, width + 1, 2 * width]), min_size=0, max_size=2))
        fill = draw(st.sampled_from([0.5, float("nan"), float("inf"), "x", 3]))
        arrays[draw(st.sampled_from(ARRAY_FIELDS))] = np.full(shape, fill)
    else:
        arrays.pop(draw(st.sampled_from(["right", "left"])))
    return header, arrays


@_settings("saved_edit")
@given(damaged=damaged_edit_file())
def test_a_damaged_saved_edit_is_refused_or_applies_and_undoes_cleanly(damaged):
    header, arrays = damaged
    handle, _edits, originals, _matrices = _edited_model("llama")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "edit.npz"
        np.savez(path, header=np.array(json.dumps(header)), **arrays)
        ok, edit = _attempt(load_edit, path)
    if not ok:
        return
    session = EditSession(handle)
    ok, _ = _attempt(session.add, edit)
    if ok:
        with session.applied():
            pass
    _assert_pristine(handle, originals)


# ---------------------------------------------------------------- 4. failures and cancels mid-pass

_REQUESTS_UNDER_TEST = {
    "trace": lambda handle, progress=no_progress: trace(handle, PROMPT, SUBJECT, TraceOptions(samples=2, window=3), progress=progress),
    "severed": lambda handle, progress=no_progress: trace_severed(handle, PROMPT, SUBJECT, TraceOptions(samples=2), progress=progress),
    "rome": lambda handle, progress=no_progress: edit_fact(EditSession(handle), REQUESTS[1], EditOptions(layer=2, **CHEAP), progress=progress),
    "ft": lambda handle, progress=no_progress: edit_fact(EditSession(handle), REQUESTS[0], EditOptions(method="ft", layer=1, ft_steps=2),
                                                         progress=progress),
    "score": lambda handle: target_probabilities(handle, [PROMPT], " Paris"),
    "generate": lambda handle: complete(handle, [PROMPT], new_tokens=3),
}
CANCELLABLE = ["trace", "severed", "rome", "ft"]  # the requests that report progress, which is how a job is stopped


def _count_calls(family: str, request: str, layer: int) -> int:
    """How often ``request`` calls block ``layer`` with two edits applied, once the model's derived values are cached."""
    return _steady_count(family, request, layer)


def _count_polls(family: str, request: str) -> int:
    """How often ``request`` reports progress (where it can be stopped), with two edits applied."""
    return _steady_count(family, request, None)


@functools.lru_cache(maxsize=None)
def _steady_count(family: str, request: str, layer: int | None) -> int:
    """Block ``layer``'s calls (or, for None, the progress reports) of one run of ``request``."""
    handle, edits, _originals, _matrices = _edited_model(family)
    counts = []
    for _ in range(2):  # the first run may also compute cached values (prefixes, statistics); the second is typical
        calls = itertools.count()
        session = _session(handle, edits[0], edits[1])
        with session.applied():
            if layer is None:
                _REQUESTS_UNDER_TEST[request](handle, progress=lambda _f, _m: next(calls))
            else:
                hook = handle.arch.block(layer).register_forward_hook(lambda *_: [next(calls)] and None)
                try:
                    _REQUESTS_UNDER_TEST[request](handle)
                finally:
                    hook.remove()
        counts.append(next(calls))
    return counts[-1]


# What the injected failures and cancels did, per test and family: SECURITY.md quotes these counts.
INJECTED: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_request_failing_mid_forward_leaves_the_model_unedited_and_unhooked(family):
    outcomes = INJECTED[f"failed_request[{family}]"]

    @_settings("failed_request")
    @given(request=st.sampled_from(sorted(_REQUESTS_UNDER_TEST)), layer=st.integers(0, 3), share=st.floats(0, 1))
    def check(request, layer, share):
        # Fail at one of the block's calls, chosen across all of them (the last share lets the request finish).
        fail_at = 1 + int(share * _count_calls(family, request, layer))
        handle, edits, originals, matrices = _edited_model(family)
        session = _session(handle, edits[0], edits[1])
        calls = itertools.count(1)

        def explode(_module, _inputs, _output):
            if next(calls) == fail_at:
                raise _Boom(f"block {layer} failed on call {fail_at}")

        try:
            with session.applied():
                hook = handle.arch.block(layer).register_forward_hook(explode)
                try:
                    _REQUESTS_UNDER_TEST[request](handle)
                finally:
                    hook.remove()
                _assert_edited(handle, matrices, list(edits[:2]))  # a finished request leaves the edits in place
            outcomes["finished"] += 1
        except _Boom:
            outcomes["failed"] += 1
        _assert_left_clean(handle, originals)

    check()
    print(f"failed_request[{family}]: {dict(outcomes)}")
    # Most examples must really fail mid-pass, or the property says little.
    assert outcomes["failed"] >= 0.8 * EXAMPLES["failed_request"], dict(outcomes)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_cancelled_request_leaves_the_model_unedited_and_unhooked(family):
    outcomes = INJECTED[f"cancelled_request[{family}]"]

    @_settings("cancelled_request")
    @given(request=st.sampled_from(CANCELLABLE), share=st.floats(0, 1))
    def check(request, share):
        # Stop at one of the request's polls, chosen across all of them (the last share lets it finish).
        stop_after = int(share * _count_polls(family, request))
        handle, edits, originals, _matrices = _edited_model(family)
        session = _session(handle, edits[1], edits[2])
        polls = itertools.count()

        def stop_at(poll: int) -> None:
            if poll >= stop_after:
                raise Cancelled("cancelled by the test")

        try:
            with session.applied():
                _REQUESTS_UNDER_TEST[request](handle, progress=lambda _f, _m: stop_at(next(polls)))
            outcomes["finished"] += 1
        except Cancelled:
            outcomes["cancelled"] += 1
        _assert_left_clean(handle, originals)

    check()
    print(f"cancelled_request[{family}]: {dict(outcomes)}")
    assert outcomes["cancelled"] >= 0.8 * EXAMPLES["cancelled_request"], dict(outcomes)


# ---------------------------------------------------------------- 5. damaged caches


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(root))
    return root


@functools.lru_cache(maxsize=None)
def _cache_model():
    return build_tiny("qwen2", seed=2)


def _truncate(path, _context):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _writer(content):
    def write(path, _context):
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(content(_context) if callable(content) else content))

    return write


_FILE_DAMAGE = {
    "truncated": _truncate,
    "empty": _writer(b""),
    "garbage": _writer(b"\x00\xffnot a cache\x80\n" * 10),
    "json-list": _writer([1, 2, 3]),
    "json-null": _writer(None),
    "json-string": _writer("layer"),
}


def _torch_writer(make):
    def write(path, width):
        torch.save(make(width), path)

    return write


def _stored_layer(matrix=lambda width: torch.eye(width), **fields):
    """A layer file as the cache writes it ({format, count, matrix}), with some fields replaced."""
    return _torch_writer(lambda width: {"format": stats.STATS_FORMAT, "count": 5, "matrix": matrix(width), **fields})


_STATS_LAYER_DAMAGE = {
    **{name: damage for name, damage in _FILE_DAMAGE.items() if not name.startswith("json")},
    "bare-tensor": _torch_writer(lambda width: torch.eye(width)),
    "wrong-width": _stored_layer(lambda width: torch.eye(width + 1)),
    "not-square": _stored_layer(lambda width: torch.ones(width, width + 2)),
    "vector": _stored_layer(lambda width: torch.ones(width)),
    "integers": _stored_layer(lambda width: torch.ones(width, width, dtype=torch.long)),
    "not-finite": _stored_layer(lambda width: torch.full((width, width), float("nan"))),
    "not-a-tensor": _stored_layer(lambda width: [1.0, 2.0]),
    "no-count": _torch_writer(lambda width: {"format": stats.STATS_FORMAT, "matrix": torch.eye(width)}),
    "count-negative": _stored_layer(count=-3),
    "count-zero": _stored_layer(count=0),
    "count-float": _stored_layer(count=2.5),
    "other-format": _stored_layer(format=stats.STATS_FORMAT + 1),
    "no-format": _torch_writer(lambda width: {"count": 5, "matrix": torch.eye(width)}),
}


@pytest.mark.parametrize("damage", sorted(_STATS_LAYER_DAMAGE))
def test_damaged_statistics_are_recomputed_and_rewritten(cache_dir, tmp_path, damage):
    handle = _cache_model()
    handle.weights.forget_derived()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Eiffel Tower is in Paris. The Colosseum is in Rome. Miles Davis plays the trumpet. " * 20)
    spec, layer = StatsSpec(corpus=f"text:{corpus}", tokens=300), 2
    fresh = second_moment(handle, layer, spec).matrix
    folder = stats_folder(handle, spec)
    handle.weights.forget_derived()
    cached = second_moment(handle, layer, spec).matrix
    assert torch.allclose(cached, fresh, atol=1e-6)
    width = handle.arch.mlp_out_weight(layer).shape[1]
    _STATS_LAYER_DAMAGE[damage](folder / f"layer_{layer}.pt", width)
    handle.weights.forget_derived()
    assert torch.equal(second_moment(handle, layer, spec).matrix, fresh), "the damaged cache was served"
    handle.weights.forget_derived()
    assert stats._load_layer(folder, layer, width) is not None, "the cache was not rewritten"
    assert torch.equal(second_moment(handle, layer, spec).matrix, cached)


_PREFIX_DAMAGE = {
    **_FILE_DAMAGE,
    "entry-number": _writer(lambda name: {name: 5}),
    "entry-too-few": _writer(lambda name: {name: ["only one"]}),
    "entry-braces": _writer(lambda name: {name: ["a {} b", "c"]}),
    "entry-newline": _writer(lambda name: {name: ["a\nb", "c"]}),
    "entry-not-text": _writer(lambda name: {name: [1, 2]}),
    "entry-dict": _writer(lambda name: {name: {"a": "b"}}),
}


@pytest.mark.parametrize("damage", sorted(_PREFIX_DAMAGE))
def test_damaged_prefix_cache_is_regenerated_and_rewritten(cache_dir, damage):
    handle = _cache_model()
    handle.weights.forget_derived()
    options = EditOptions(prefixes=((3, 2),), prefix_seed=4)
    fresh = context_prefixes(handle, options)
    path = cache_dir / "prefixes" / f"{model_fingerprint(handle)}.json"
    (name,) = json.loads(path.read_text())
    _PREFIX_DAMAGE[damage](path, name)
    handle.weights.forget_derived()
    assert context_prefixes(handle, options) == fresh, "the damaged cache was served"
    assert json.loads(path.read_text())[name] == fresh, "the cache was not rewritten"


_LAYER_DAMAGE = {
    **_FILE_DAMAGE,
    "no-layer": _writer({"facts": 3}),
    "layer-text": _writer({"layer": "two"}),
    "layer-negative": _writer({"layer": -1}),
    "layer-too-deep": _writer({"layer": 99}),
    "layer-bool": _writer({"layer": True}),
    "layer-float": _writer({"layer": 1.0}),
    "layer-list": _writer({"layer": [2]}),
}


@pytest.mark.parametrize("damage", sorted(_LAYER_DAMAGE))
def test_damaged_layer_cache_is_traced_again_and_rewritten(cache_dir, monkeypatch, damage):
    handle = _cache_model()
    handle.weights.forget_derived()
    traced = []

    def effects(_handle, facts_limit, progress=None):
        traced.append(facts_limit)
        return np.array([0.1, 0.2, 0.7, 0.0]), 3

    monkeypatch.setattr(aggregate, "last_subject_mlp_effects", effects)
    assert traced_peak_layer(handle, facts_limit=3) == 2 and len(traced) == 1
    handle.weights.forget_derived()
    assert traced_peak_layer(handle, facts_limit=3) == 2 and len(traced) == 1, "a sound cache is read, not traced again"
    path = cache_dir / "layers" / f"{model_fingerprint(handle)}-facts3.json"
    _LAYER_DAMAGE[damage](path, None)
    handle.weights.forget_derived()
    assert traced_peak_layer(handle, facts_limit=3) == 2 and len(traced) == 2, "the damaged cache was served"
    assert json.loads(path.read_text())["layer"] == 2, "the cache was not rewritten"
