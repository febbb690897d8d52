"""The tracing engine on the real default model: exact against the per-cell loop, and the paper's picture."""
import numpy as np
import pytest

from explorer.testing import oracle
from explorer.tracing import KINDS, TraceOptions, trace


@pytest.mark.parametrize("kind", KINDS)
def test_fast_engine_matches_the_per_cell_loop_on_the_default_model(default_model, kind):
    # Four samples keep the oracle's full-model loop affordable on 2 cores; exactness does not depend on it.
    prompt, subject = "The Eiffel Tower is in", "The Eiffel Tower"
    result = trace(default_model, prompt, subject, TraceOptions(kinds=(kind,), samples=4))
    expected = oracle.trace(
        default_model.model, default_model.tokenizer, prompt, subject, kinds=(kind,), samples=4, window_size=10, noise=3.0, seed=1
    )
    assert (result.subject_range, result.answer_id) == (expected.subject_range, expected.answer_id)
    assert result.noise_std == pytest.approx(3.0 * expected.sigma, rel=1e-6)
    np.testing.assert_allclose(result.scores[kind], expected.scores[kind], atol=1e-5, rtol=0)
    assert np.abs(expected.scores[kind] - expected.low_score).max() > 0.05  # restoring matters: not a vacuous comparison


def test_eiffel_tower_trace_shows_early_mlp_at_subject_and_late_hidden_at_last_token(default_model):
    result = trace(default_model, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    assert result.answer == " Paris" and result.high_score > 0.7 and result.low_score < 0.05
    start, end = result.subject_range
    mlp, hidden = result.indirect_effect("mlp"), result.indirect_effect("hidden")
    token, layer = np.unravel_index(mlp.argmax(), mlp.shape)
    assert start <= token < end and layer < default_model.num_layers // 2  # early-to-middle MLPs at the subject
    late = default_model.num_layers * 2 // 3
    assert hidden[-1, late:].mean() > 0.5 * (result.high_score - result.low_score)  # late hidden states at the last token
    assert hidden[-1, :4].max() < 0.1  # the last token's early states carry nothing yet


def test_average_over_known_facts_keeps_correct_ones_and_reports_effects(default_model):
    from explorer.core.facts import load_facts
    from explorer.tracing.aggregate import average_effects

    facts = [f for f in load_facts() if f.subject in ("The Eiffel Tower", "Vladimir Putin")][:2]
    result = average_effects(default_model, facts, TraceOptions(kinds=("hidden",), samples=3)).to_json()
    assert result["facts_total"] == len(facts) >= 1 and result["facts_correct"] >= 1
    last = result["hidden"]["last_token"]
    assert last["count"] == result["facts_correct"] and len(last["mean"]) == default_model.num_layers
    effect = np.array(last["indirect_effect"]["mean"])
    assert effect[-1] > 0.2 and effect[0] < 0.05  # the answer appears at the last token only in late layers


def test_streamed_trace_ends_as_the_plain_one_on_the_default_model(default_model):
    options = TraceOptions(samples=2)
    plain = trace(default_model, "The Eiffel Tower is located in the city of", "The Eiffel Tower", options)
    partials = []
    streamed = trace(default_model, "The Eiffel Tower is located in the city of", "The Eiffel Tower", options,
                     partial=partials.append)
    assert len(partials) >= 2
    for kind in plain.scores:
        np.testing.assert_allclose(streamed.scores[kind], plain.scores[kind], atol=1e-6, rtol=0)
