import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer.core.errors import InputError
from explorer.testing import oracle
from explorer.testing.reference_trace import reference_scores
from explorer.tracing import (
    DEFAULT_LIMITS,
    KINDS,
    SEVERED_KEYS,
    Cell,
    TraceOptions,
    cells_for_kind,
    embedding_std,
    plan_pass,
    run_clean_and_corrupted,
    score_cells,
    severed_cells,
    subject_noise,
    trace,
    trace_severed,
    validated_inputs,
    window_layers,
)
from tests.conftest import FAMILIES, build_tiny

# Generated cases per family for the fuzzed comparison with the oracle.
TRACE_EXAMPLES = 20



pytestmark = pytest.mark.usefixtures("one_thread")


PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


# The hand-worked window table: (layer, window, layers) -> restored layers, from the paper's definition
# (w layers centred on l: l - w//2 up to l + ceil(w/2), clipped to the model).
WINDOWS = {
    (0, 1, 4): [0], (3, 1, 4): [3],
    (0, 2, 4): [0], (1, 2, 4): [0, 1], (3, 2, 4): [2, 3],
    (0, 3, 4): [0, 1], (1, 3, 4): [0, 1, 2], (2, 3, 4): [1, 2, 3], (3, 3, 4): [2, 3],
    (0, 4, 4): [0, 1], (2, 4, 4): [0, 1, 2, 3], (3, 4, 4): [1, 2, 3],
    (0, 10, 4): [0, 1, 2, 3], (3, 10, 4): [0, 1, 2, 3], (2, 9, 4): [0, 1, 2, 3],
    (5, 10, 18): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], (6, 10, 18): [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    (17, 10, 18): [12, 13, 14, 15, 16, 17], (13, 10, 18): [8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
}


@pytest.mark.parametrize("case", sorted(WINDOWS))
def test_window_bounds_follow_the_papers_definition(case):
    assert oracle.window(*case) == WINDOWS[case]
    assert list(window_layers(*case)) == WINDOWS[case]


def test_noise_draws_are_the_pinned_stream():
    """Seed 1's first draws of the legacy numpy generator (known values): the convention both sides follow."""
    np.testing.assert_allclose(oracle.noise_draws(1, 1, 3, 1).ravel(), [1.62434536, -0.61175641, -0.52817175], atol=1e-8)
    np.testing.assert_array_equal(subject_noise(2, 3, 5, 7), oracle.noise_draws(2, 3, 5, 7))


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])  # a plain embedding, a scaled one (Gemma multiplies by √d)
def test_sigma_is_the_std_of_the_subjects_embedding_outputs(family):
    handle = build_tiny(family)
    expected = oracle.sigma(handle.model, handle.tokenizer)
    assert embedding_std(handle) == pytest.approx(expected, rel=1e-6)
    result = trace(handle, PROMPT, SUBJECT, TraceOptions(samples=1, kinds=("hidden",), noise=2.5))
    assert result.noise_std == pytest.approx(2.5 * expected, rel=1e-6)


def _assert_matches_oracle(handle, prompt, subject, options, result, tolerance, least_move):
    """The engine's trace equals the oracle's per-cell loop, and every kind's comparison has something to compare."""
    expected = oracle.trace(
        handle.model, handle.tokenizer, prompt, subject, kinds=options.kinds, samples=options.samples,
        window_size=options.window, noise=options.noise, seed=options.seed, target=options.target,
    )
    assert result.subject_range == expected.subject_range
    assert result.answer_id == expected.answer_id
    assert result.high_score == pytest.approx(expected.high_score, abs=tolerance)
    assert result.low_score == pytest.approx(expected.low_score, abs=tolerance)
    for kind in options.kinds:
        np.testing.assert_allclose(result.scores[kind], expected.scores[kind], atol=tolerance, rtol=0, err_msg=kind)
        # Not vacuous: restoring moves the answer's probability by far more than the tolerance somewhere.
        assert np.abs(expected.scores[kind] - expected.low_score).max() > least_move, kind


@pytest.mark.parametrize("family", FAMILIES + ["gemma3_text_short_window"])
def test_fast_engine_matches_the_per_cell_loop(family):
    handle = build_tiny(family)
    options = TraceOptions(samples=4, window=3, noise=3.0, seed=3)
    result = trace(handle, PROMPT, SUBJECT, options)
    _assert_matches_oracle(handle, PROMPT, SUBJECT, options, result, tolerance=1e-5, least_move=1e-3)


@functools.lru_cache(maxsize=None)
def _float64(family: str):
    handle = build_tiny(family)
    handle.model.double()
    return handle


# Subjects the tiny tokenizers know (trained on the bundled prompts); "Paris" is one token in both.
SUBJECTS = ["Eiffel Tower", "Paris", "Steve Jobs", "the Louvre"]
TEMPLATES = {  # where the subject sits: first (token 0 without a BOS), inside, or last
    "first": "{} is located in the city of",
    "inside": "The famous {} is located in the city of",
    "last": "The city of the famous {}",
}


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text_short_window"])
@settings(max_examples=TRACE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=st.sampled_from(SUBJECTS),
    where=st.sampled_from(sorted(TEMPLATES)),
    window=st.sampled_from([1, 2, 3, 4, 9]),  # 9 is wider than twice the 4 layers
    samples=st.sampled_from([1, 3]),
    memory_mb=st.sampled_from([0, 1, 1024]),  # one cell per pass, a few, all
    seed=st.integers(0, 2**32 - 1),
    streamed=st.booleans(),
)
def test_fuzzed_traces_match_the_independent_oracle(family, subject, where, window, samples, memory_mb, seed, streamed):
    """In float64 the only difference left is the engine's float32 softmax (within 3e-7 of float64, by design):
    a slip of a cell, a window, a token or a draw shows far above that."""
    handle = _float64(family)
    prompt = TEMPLATES[where].format(subject)
    options = TraceOptions(samples=samples, window=window, seed=seed, memory_mb=memory_mb)
    result = trace(handle, prompt, subject, options, partial=(lambda _partial: None) if streamed else None)
    _assert_matches_oracle(handle, prompt, subject, options, result, tolerance=5e-7, least_move=5e-5)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text", "llama"])
def test_severed_paths_match_the_per_cell_loop(family):
    handle = build_tiny(family)
    result = trace_severed(handle, PROMPT, SUBJECT, TraceOptions(samples=3, noise=6.0, seed=2))
    expected = oracle.severed(handle.model, handle.tokenizer, PROMPT, SUBJECT, samples=3, noise=6.0, seed=2)
    for key, curve in expected.items():
        np.testing.assert_allclose(result.scores[key], curve, atol=1e-5, rtol=0, err_msg=key)
    # Freezing changes something, by far more than the tolerance: the comparison of the severed curves is not vacuous.
    for key in ("mlp_severed", "attn_severed"):
        assert np.abs(expected[key] - expected["ordinary"]).max() > 1e-3, key


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_batched_engine_equals_the_reference_executor_for_every_kind(family):
    """The batched passes (cached prefix, skipped blocks and rows, copied outputs, donors) score every cell as
    one plain forward pass per cell does (tracing/reference.py): each kind, windows of 3, the severed cells."""
    handle = build_tiny(family)
    options = TraceOptions(samples=2, window=3, noise=6.0, seed=2)
    tokenized, _guessed, noise_std = validated_inputs(handle, PROMPT, SUBJECT, options, DEFAULT_LIMITS)
    runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
    cells = {kind: list(cells_for_kind(kind, tokenized, handle.num_layers, options.window).values()) for kind in KINDS}
    # As trace schedules them: every kind's cells together, so cells of different kinds share passes.
    together = score_cells(handle, runs, [cell for kind in KINDS for cell in cells[kind]])
    engine = dict(zip(KINDS, np.split(together, np.cumsum([len(cells[kind]) for kind in KINDS])[:-1])))
    for key, severed_kind in SEVERED_KEYS.items():  # as trace_severed schedules them: one analysis at a time
        cells[key] = list(severed_cells(tokenized, handle.num_layers, severed_kind).values())
        engine[key] = score_cells(handle, runs, cells[key])
    assert any(len(cell.restores) > 1 for cell in cells["mlp"]) and any(cell.freezes for cell in cells["attn_severed"])
    for key, group in cells.items():
        expected = reference_scores(handle, runs, group)
        np.testing.assert_allclose(engine[key], expected, atol=1e-5, rtol=0, err_msg=key)
        # Not vacuous: restoring moves the answer's probability by far more than the tolerance somewhere,
        # and freezing moves the severed curves away from the ordinary one.
        assert np.abs(expected - runs.low_score).max() > 1e-3, key
        if SEVERED_KEYS.get(key):
            assert np.abs(expected - engine["ordinary"]).max() > 1e-3, key


def test_subject_tokens_bos_and_no_bos():
    with_bos, without = build_tiny("llama"), build_tiny("gpt2")
    a = trace(with_bos, PROMPT, SUBJECT, TraceOptions(samples=2, kinds=("hidden",)))
    b = trace(without, PROMPT, SUBJECT, TraceOptions(samples=2, kinds=("hidden",)))
    assert a.tokens[0] == "<bos>" and b.tokens[0] != "<bos>"
    for result in (a, b):
        start, end = result.subject_range
        assert "".join(result.tokens[start:end]).strip() == SUBJECT


def test_same_seed_same_result_and_other_seed_differs():
    handle = build_tiny("qwen2")
    first = trace(handle, PROMPT, SUBJECT, TraceOptions(samples=3, kinds=("mlp",), seed=7))
    again = trace(handle, PROMPT, SUBJECT, TraceOptions(samples=3, kinds=("mlp",), seed=7))
    other = trace(handle, PROMPT, SUBJECT, TraceOptions(samples=3, kinds=("mlp",), seed=8))
    assert np.array_equal(first.scores["mlp"], again.scores["mlp"])
    assert not np.array_equal(first.scores["mlp"], other.scores["mlp"])


def test_small_memory_cap_degrades_to_smaller_batches_with_the_same_numbers():
    handle = build_tiny("gemma3_text")
    big = trace(handle, PROMPT, SUBJECT, TraceOptions(samples=3, memory_mb=1024))
    small = trace(handle, PROMPT, SUBJECT, TraceOptions(samples=3, memory_mb=1))
    for kind in KINDS:
        np.testing.assert_allclose(big.scores[kind], small.scores[kind], atol=1e-6, rtol=0)


def test_subject_is_guessed_when_missing():
    handle = build_tiny("llama")
    result = trace(handle, PROMPT, None, TraceOptions(samples=2, kinds=("hidden",)))
    assert result.subject == "The Eiffel Tower" and result.subject_guessed


def test_target_sets_the_answer():
    handle = build_tiny("llama")
    result = trace(handle, PROMPT, SUBJECT, TraceOptions(samples=2, kinds=("hidden",), target=" Paris"))
    assert result.answer_id == handle.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]


@pytest.mark.parametrize(
    "prompt, subject, options, message",
    [
        ("", "x", TraceOptions(), "prompt is empty"),
        ("   ", "x", TraceOptions(), "prompt is empty"),
        (PROMPT, "Louvre", TraceOptions(), "does not occur"),
        (PROMPT, PROMPT, TraceOptions(), "whole prompt"),
        (PROMPT, SUBJECT, TraceOptions(kinds=("neurons",)), "unknown kind"),
        (PROMPT, SUBJECT, TraceOptions(window=0), "window"),
        (PROMPT, SUBJECT, TraceOptions(samples=0), "samples"),
        (PROMPT, SUBJECT, TraceOptions(samples=10**6), "samples"),
        (PROMPT, SUBJECT, TraceOptions(noise=-1), "noise"),
        (PROMPT * 20, SUBJECT, TraceOptions(), "tokens long"),
        ("The Eiffel\x00 Tower is in", "Tower", TraceOptions(), "control characters"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_no_hook(prompt, subject, options, message):
    handle = build_tiny("llama")
    with pytest.raises(InputError, match=message):
        trace(handle, prompt, subject, options)
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in handle.model.modules())


def test_cancel_stops_a_trace_and_leaves_no_hook():
    from explorer.core.progress import Cancelled

    def cancel(_fraction, _message):
        raise Cancelled("cancelled by the test")

    handle = build_tiny("llama")
    with pytest.raises(Cancelled):
        trace(handle, PROMPT, SUBJECT, TraceOptions(samples=2), progress=cancel)
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in handle.model.modules())


@pytest.mark.parametrize("family", ["gptj", "gemma2", "llama"])  # head with a bias; logit softcapping; plain
def test_answer_probabilities_over_vocabulary_blocks_equal_a_float64_softmax(family, monkeypatch):
    from explorer import tracing
    from explorer.tracing import unembedding

    handle = build_tiny(family)
    vocab, hidden = handle.arch.unembedding.weight.shape
    states = 3 * torch.randn(9, hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.softmax(handle.arch.logits(states).double(), dim=-1)
    # Blocks multiply float32 rounding differently from one product over the whole vocabulary: ~1e-6 in p.
    for block in (7, vocab - 1, vocab, 8192):  # ragged last block, one entry left over, one block, the default
        monkeypatch.setattr(unembedding, "VOCAB_BLOCK", block)  # read there, where answer_probabilities lives
        for answer in (0, 6, 7, vocab - 1):
            for memory_mb in (0, 1024):  # one row at a time, all rows at once
                got = tracing.answer_probabilities(handle, states, answer, memory_mb)
                np.testing.assert_allclose(got, expected[:, answer].numpy(), atol=2e-6, rtol=0, err_msg=f"block {block}")


def test_windows_clipped_at_the_first_layer_share_their_common_blocks():
    """Cells whose windows start at layer 0 agree below their window ends: each enters where it differs."""
    layers, window = 18, 10
    cells = [Cell(3, window_layers(l, window, layers).start, tuple(("mlp", k) for k in window_layers(l, window, layers))) for l in range(layers)]
    plan = plan_pass(cells, layers)
    entry = {index: plan.entry[slot] for slot, index in enumerate(plan.order)}
    donor = {index: plan.donor[slot] for slot, index in enumerate(plan.order)}
    # windows [0,5), [0,6), ..., [0,10): the cell with window [0,e) takes over from [0,e-1) at block e-1
    assert [entry[l] for l in range(6)] == [0, 5, 6, 7, 8, 9]
    assert donor[0] is None and all(plan.order[donor[l]] == l - 1 for l in range(1, 6))
    # from layer 6 on, windows start above 0 and agree with no other cell below their start
    assert all(entry[l] == l - window // 2 and donor[l] is None for l in range(6, layers))
    assert plan.entry == sorted(plan.entry)  # rows in order of entry: each block computes a leading slice
    # a window cell entering at its own first layer starts from the corrupted state there (fresh: its first
    # block copies what did not change); one entering from a donor carries the donor's changes
    fresh = {index: plan.fresh[slot] for slot, index in enumerate(plan.order)}
    assert fresh[0] and not any(fresh[l] for l in range(1, 6)) and all(fresh[l] for l in range(6, layers))
    # a hidden cell enters above the state it restores, so its first input already differs; within one
    # entry block the rows that are not fresh come first, so the block computes a leading slice of them
    mixed = plan_pass([Cell(3, 2, (("mlp", 2),)), Cell(3, 2, (("hidden", 1),)), Cell(3, 1, (("attn", 1),))], 4)
    assert mixed.order == [2, 1, 0] and mixed.fresh == [True, False, True]
    # windows wider than the model agree everywhere: the copies still compute the last block themselves
    same = plan_pass([Cell(3, 0, tuple(("mlp", k) for k in range(4))) for _ in range(3)], 4)
    assert same.entry == [0, 3, 3] and same.donor == [None, 0, 0]
    hidden = [Cell(3, l + 1, (("hidden", l),)) for l in range(layers)]
    assert all(d is None for d in plan_pass(hidden, layers).donor)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_streamed_trace_fills_in_the_informative_tokens_first_and_ends_as_the_plain_one(family, monkeypatch):
    from explorer.tracing import scheduling

    monkeypatch.setattr(scheduling, "STREAM_ROWS", 8)  # score after every pass, so there are many partial results
    handle = build_tiny(family)
    options = TraceOptions(samples=3, window=3, seed=2)
    plain = trace(handle, PROMPT, SUBJECT, options)
    partials = []
    streamed = trace(handle, PROMPT, SUBJECT, options, partial=partials.append)
    for kind in KINDS:
        np.testing.assert_allclose(streamed.scores[kind], plain.scores[kind], atol=1e-6, rtol=0)
        assert not np.isnan(streamed.scores[kind]).any()
    assert len(partials) >= 3
    missing = [sum(int(np.isnan(p.scores[kind]).sum()) for kind in KINDS) for p in partials]
    assert missing == sorted(missing, reverse=True) and missing[0] > 0 and missing[-1] == 0
    for earlier, later in zip(partials, partials[1:]):  # a computed cell keeps its value
        for kind in KINDS:
            known = ~np.isnan(earlier.scores[kind])
            assert np.array_equal(earlier.scores[kind][known], later.scores[kind][known])
    # The first partial result holds the subject's last token in every kind (its whole row), and nothing
    # computed at the other subject tokens yet.
    first, last_subject = partials[0], plain.subject_range[1] - 1
    for kind in KINDS:
        assert not np.isnan(first.scores[kind][last_subject]).any(), kind
        np.testing.assert_allclose(first.scores[kind][last_subject], plain.scores[kind][last_subject], atol=1e-6, rtol=0)
        assert np.isnan(first.scores[kind][plain.subject_range[0]]).any(), kind
    # Before the rest of the prompt, the prompt's last token is done.
    last_token_done = next(i for i, p in enumerate(partials) if not np.isnan(p.scores["mlp"][-1]).any())
    other_done = next(i for i, p in enumerate(partials) if not np.isnan(p.scores["mlp"][plain.subject_range[0]]).any())
    assert last_token_done < other_done
