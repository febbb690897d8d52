import numpy as np
import pytest
import torch

from explorer.prompts import InputError
from explorer.tracing import KINDS, Cell, TraceOptions, plan_pass, trace, trace_severed, window_layers
from tests.conftest import FAMILIES, build_tiny
from tests.oracle import oracle_cell_score, oracle_trace

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


@pytest.mark.parametrize("family", FAMILIES + ["gemma3_text_short_window"])
def test_fast_engine_matches_the_per_cell_loop(family):
    handle = build_tiny(family)
    options = TraceOptions(samples=4, window=3, noise=3.0, seed=3)
    result = trace(handle, PROMPT, SUBJECT, options)
    for kind in KINDS:
        expected = oracle_trace(handle, result, kind)
        assert result.scores[kind].shape == expected.shape == (len(result.tokens), 4)
        np.testing.assert_allclose(result.scores[kind], expected, atol=1e-5, rtol=0, err_msg=f"{family} {kind}")
    # the restoration does something: some cell differs from the corrupted run
    assert np.abs(result.scores["hidden"] - result.low_score).max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text", "llama"])
def test_severed_paths_match_the_per_cell_loop(family):
    handle = build_tiny(family)
    options = TraceOptions(samples=3, seed=5)
    result = trace_severed(handle, PROMPT, SUBJECT, options)
    full = trace(handle, PROMPT, SUBJECT, TraceOptions(samples=3, seed=5, kinds=("hidden",)))
    ids = torch.tensor([handle.tokenizer(PROMPT)["input_ids"]])
    start, end = full.subject_range
    from explorer.tracing import subject_noise

    noise = torch.from_numpy(subject_noise(3, end - start, 64, 5)) * full.noise_std
    token = end - 1
    np.testing.assert_allclose(result.scores["ordinary"], full.scores["hidden"][token], atol=1e-5, rtol=0)
    for key, kind in (("mlp_severed", "mlp"), ("attn_severed", "attn")):
        for layer in range(4):
            freezes = [(kind, k, token) for k in range(layer + 1, 4)]
            expected = oracle_cell_score(handle, ids, full.subject_range, noise, full.answer_id, [("hidden", layer, token)], freezes)
            assert abs(result.scores[key][layer] - expected) < 1e-5, (key, layer)


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
    from explorer.tracing import TraceCancelled

    handle = build_tiny("llama")
    with pytest.raises(TraceCancelled):
        trace(handle, PROMPT, SUBJECT, TraceOptions(samples=2), cancel=lambda: True)
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in handle.model.modules())


@pytest.mark.parametrize("family", ["gptj", "gemma2", "llama"])  # head with a bias; logit softcapping; plain
def test_answer_probabilities_over_vocabulary_blocks_equal_a_float64_softmax(family, monkeypatch):
    from explorer import tracing

    handle = build_tiny(family)
    vocab, hidden = handle.arch.unembedding.weight.shape
    states = 3 * torch.randn(9, hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.softmax(handle.arch.logits(states).double(), dim=-1)
    # Blocks multiply float32 rounding differently from one product over the whole vocabulary: ~1e-6 in p.
    for block in (7, vocab - 1, vocab, 8192):  # ragged last block, one entry left over, one block, the default
        monkeypatch.setattr(tracing, "VOCAB_BLOCK", block)
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
    import explorer.tracing as tracing

    monkeypatch.setattr(tracing, "STREAM_ROWS", 8)  # score after every pass, so there are many partial results
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
