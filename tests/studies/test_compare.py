"""The comparison's warning about generations that lost their entropy, on texts whose entropy is known by hand.

A text of n different words has n − 1 different bigrams and n − 2 different trigrams, each once, so its
entropy is the paper's weighted mean (2/3 · log2(n − 1) + 4/3 · log2(n − 2)) / 2; one word repeated has none.
"""
from __future__ import annotations

import math

import pytest

from explorer.studies.compare import entropy_warnings

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
REPEATED = "again " * 12


def _distinct(n: int) -> str:
    return " ".join(WORDS[:n])


def _entropy_of_distinct(n: int) -> float:
    return (2 / 3 * math.log2(n - 1) + 4 / 3 * math.log2(n - 2)) / 2


def _side(*texts: str) -> dict:
    return {"generations": [{"prompt": f"prompt {i}", "text": text} for i, text in enumerate(texts)]}


def _warning(drop: float) -> list[str]:
    return [f"generation entropy fell by {drop:.2f} bits after the edit: the edited model repeats itself"]


def test_generations_that_start_repeating_themselves_warn_with_the_drop():
    assert entropy_warnings(_side(_distinct(10)), _side(REPEATED)) == _warning(_entropy_of_distinct(10))


def test_the_drop_is_between_the_means_over_each_sides_texts():
    before = _side(_distinct(10), _distinct(4))
    assert entropy_warnings(before, _side(REPEATED, REPEATED)) == _warning((_entropy_of_distinct(10) + _entropy_of_distinct(4)) / 2)
    # One text of the edited model still varied: the mean fell by less than a bit.
    assert (_entropy_of_distinct(10) + _entropy_of_distinct(4)) / 2 - _entropy_of_distinct(10) / 2 < 1
    assert entropy_warnings(before, _side(REPEATED, _distinct(10))) == []


def test_blank_generations_are_left_out_of_the_means():
    # Counted as texts of no entropy, a blank would lower its side's mean and change the drop.
    before, after = _side(_distinct(10), "   "), _side(REPEATED, "", _distinct(10))
    assert entropy_warnings(before, after) == _warning(_entropy_of_distinct(10) - _entropy_of_distinct(10) / 2)


@pytest.mark.parametrize("before, after", [
    (_side(_distinct(3)), _side(REPEATED)),  # a third of a bit lost: within the threshold (1 bit)
    (_side(REPEATED), _side(_distinct(10))),  # more entropy after the edit
    (_side(_distinct(10)), _side(_distinct(10))),
    (_side(_distinct(10)), _side("  ")),  # nothing generated after the edit
    (_side(), _side(REPEATED)),
    ({}, {}),  # probabilities only, no generations
])
def test_no_warning_without_a_drop_of_more_than_a_bit(before, after):
    assert entropy_warnings(before, after) == []


def test_an_empty_true_target_whose_stand_in_answer_is_a_control_character_says_so():
    """The user left the true target empty; the model's answer decodes to a control character: the message
    names the model's answer and asks for a true target, instead of blaming text the user never typed."""
    import pytest

    from explorer.core.errors import InputError
    from explorer.editing import make_request
    from explorer.studies.compare import with_true_target
    from tests.conftest import build_tiny

    handle = build_tiny("llama")
    request = make_request("{} is in", "The Louvre", " Rome")
    handle.tokenizer.decode = lambda ids, **kwargs: "\x03"
    with pytest.raises(InputError, match=r"true target was left empty.*model's own answer '\\x03'.*type the true target"):
        with_true_target(handle, request)
