"""Attribution patching: in the linear regime (little noise) the estimate is the exact trace to first order."""
from __future__ import annotations

import json

import numpy as np
import pytest

from explorer import cli
from explorer.tracing import KINDS, TraceOptions, trace
from explorer.tracing.attribution import ESTIMATORS, agreement, estimate_trace
from tests.conftest import build_tiny

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("estimator", ["one-step", "integrated-4"])
def test_estimate_is_the_exact_trace_to_first_order(family, estimator):
    handle = build_tiny(family)
    # Noise this small keeps every restoration in the linear regime, where gradient × difference is exact to first order.
    options = TraceOptions(samples=3, window=1, noise=0.001, seed=4)
    exact = trace(handle, PROMPT, SUBJECT, options)
    estimate = estimate_trace(handle, PROMPT, SUBJECT, options, estimator=estimator)
    assert estimate.method == "atp" and exact.method == "exact"
    assert estimate.low_score == exact.low_score and estimate.tokens == exact.tokens
    report = agreement(exact, estimate)
    for kind in KINDS:
        effect = np.asarray(exact.scores[kind]) - exact.low_score
        assert np.abs(effect).max() > 1e-5, "the restorations must do something for this to test anything"
        assert report[kind]["correlation"] > 0.99, (kind, report[kind])
        assert report[kind]["max_abs_error"] < 0.05 * np.abs(effect).max(), (kind, report[kind])


def restored_window_effect(handle, runs, kind: str, layers) -> float:
    """Oracle: the answer's probability when ``kind``'s outputs of ``layers`` are all set to their clean values at
    every token of the corrupted runs, minus the corrupted runs' (mean over samples); hand-written hooks."""
    import contextlib

    import torch

    from explorer.core import hooks

    with torch.no_grad(), contextlib.ExitStack() as stack:
        for layer in layers:
            clean = runs.clean[kind][layer]
            stack.enter_context(hooks.on_output(handle.arch.state_module(kind, layer), lambda out, clean=clean: clean.expand_as(out)))
        final = handle.arch.backbone(inputs_embeds=runs.corrupted_embeds, use_cache=False).last_hidden_state[:, -1]
        probability = torch.softmax(handle.arch.logits(final).float(), dim=-1)[:, runs.answer_id]
    return float(probability.mean()) - runs.low_score


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_window_estimate_is_the_joint_restoration_to_first_order(family):
    """Restoring a window's outputs together overwrites the paths from one member through a later one, so to first
    order each member's gradient is taken with the others held fixed. Summed over tokens, the estimate of a window
    is then the first-order effect of restoring the window at every token (oracle above, noise 0.0003: linear
    regime); the old sum of each member's total gradient counts the member-to-member paths twice and fails."""
    from explorer.tracing import DEFAULT_LIMITS, window_layers
    from explorer.tracing.runs import run_clean_and_corrupted, validated_inputs

    handle = build_tiny(family)
    options = TraceOptions(samples=3, window=3, noise=0.0003, seed=4, kinds=("mlp", "attn"))
    tokenized, _, noise_std = validated_inputs(handle, PROMPT, SUBJECT, options, DEFAULT_LIMITS)
    runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
    estimate = estimate_trace(handle, PROMPT, SUBJECT, options, estimator="one-step")
    for kind in options.kinds:
        truth = np.array([restored_window_effect(handle, runs, kind, window_layers(layer, 3, handle.num_layers))
                          for layer in range(handle.num_layers)])
        assert np.abs(truth).max() > 1e-5, "the restorations must do something for this to test anything"
        guess = (np.asarray(estimate.scores[kind]) - estimate.low_score).sum(0)  # over tokens
        np.testing.assert_allclose(guess, truth, atol=0.05 * np.abs(truth).max(), err_msg=kind)  # second-order error: 2% at this noise, 4-8% at 0.001


def test_trace_command_with_method_atp_writes_the_estimate(tmp_path):
    folder = tmp_path / "tiny"
    tiny = build_tiny("gpt2")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    common = [PROMPT, "--subject", SUBJECT, "--model", str(folder), "--samples", "2", "--window", "2"]
    assert cli.main(["trace", *common, "--method", "atp", "--json", str(tmp_path / "atp.json")]) == 0
    assert cli.main(["trace", *common, "--json", str(tmp_path / "exact.json")]) == 0
    atp, exact = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("atp", "exact"))
    assert atp["method"] == "atp" and exact["method"] == "exact"
    assert set(atp) == set(exact) and atp["traces"].keys() == exact["traces"].keys()
    assert atp["traces"] != exact["traces"] and atp["low_score"] == exact["low_score"]
    assert sorted(ESTIMATORS) == sorted(["one-step", "clean-side", "endpoints", "integrated-2", "integrated-4", "integrated-8"])


def test_bad_options_are_the_traces_clear_errors():
    from explorer.core.errors import InputError

    handle = build_tiny("gpt2")
    with pytest.raises(InputError, match="unknown kind 'nonsense'"):
        estimate_trace(handle, PROMPT, SUBJECT, TraceOptions(kinds=("nonsense",)))
    with pytest.raises(InputError, match="does not occur"):
        estimate_trace(handle, PROMPT, "Big Ben", TraceOptions())
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate_trace(handle, PROMPT, SUBJECT, TraceOptions(), estimator="magic")
