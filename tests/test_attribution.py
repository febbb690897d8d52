"""Attribution patching: in the linear regime (little noise) the estimate is the exact trace to first order."""
from __future__ import annotations

import json

import numpy as np
import pytest

from explorer import cli
from explorer.attribution import ESTIMATORS, agreement, estimate_trace
from explorer.tracing import KINDS, TraceOptions, trace
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


def test_estimate_of_a_window_sums_its_layers():
    handle = build_tiny("llama")
    single = estimate_trace(handle, PROMPT, SUBJECT, TraceOptions(samples=2, window=1, kinds=("mlp",)))
    wide = estimate_trace(handle, PROMPT, SUBJECT, TraceOptions(samples=2, window=3, kinds=("mlp",)))
    per_layer = np.asarray(single.scores["mlp"]) - single.low_score
    expected = np.stack([per_layer[:, max(0, l - 1): l + 2].sum(1) for l in range(handle.num_layers)], axis=1)
    np.testing.assert_allclose(np.asarray(wide.scores["mlp"]) - wide.low_score, expected, atol=1e-9)


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
    from explorer.prompts import InputError

    handle = build_tiny("gpt2")
    with pytest.raises(InputError, match="unknown kind 'nonsense'"):
        estimate_trace(handle, PROMPT, SUBJECT, TraceOptions(kinds=("nonsense",)))
    with pytest.raises(InputError, match="does not occur"):
        estimate_trace(handle, PROMPT, "Big Ben", TraceOptions())
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate_trace(handle, PROMPT, SUBJECT, TraceOptions(), estimator="magic")
