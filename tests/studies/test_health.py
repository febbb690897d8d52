"""The health measures' disabling warnings, each condition built directly on a tiny model.

Leaked probe facts: probe facts whose true answer is something else, and an edit whose new target is the
model's own answer to them. The edit's update is zero, so the model answers as it always did: the leak is
in the probe set by construction, not hoped for from an edit going wrong. Lost fluency: a baseline above
what the model measures now.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.core.facts import Fact
from explorer.core.models import model_fingerprint
from explorer.editing import make_request
from explorer.editing.edits import Edit, EditSession
from explorer.studies.health import model_health
from tests.conftest import REPO, build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PROBES = 10
UNRELATED_SUBJECT = "Zorbulon Vexhaven"  # in no bundled prompt: no probe fact is about the edits' subject
WRONG_ANSWER = "Antarctica"


@pytest.fixture(scope="module")
def handle():
    return build_tiny("llama")


def _first_token(handle, text: str) -> int:
    return handle.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][0]


def _answered(handle, count: int) -> list[tuple[dict, str]]:
    """Bundled fact records with the model's own greedy answer (a whole word that reads back as the same token),
    from plain forward passes."""
    found, subjects = [], set()
    for record in json.loads((REPO / "assets" / "known_facts.json").read_text()):
        ids = handle.tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(handle.model(input_ids=ids).logits[0, -1].argmax())
        answer = handle.tokenizer.decode([top]).strip()
        if (answer and _first_token(handle, answer) == top and _first_token(handle, WRONG_ANSWER) != top
                and record["subject"] not in subjects):
            found.append((record, answer))
            subjects.add(record["subject"])
        if len(found) == count:
            return found
    raise AssertionError("the tiny model answers too few bundled prompts with a whole word")


def _fact(record: dict, attribute: str) -> Fact:
    return Fact(known_id=record["known_id"], subject=record["subject"], attribute=attribute, template=record["template"],
                prediction="", prompt=record["prompt"], relation_id=record["relation_id"])


def _edit_towards(handle, target: str) -> Edit:
    """An edit of layer 1 whose new target is ``target`` and whose update is zero: the model's answers stay its own."""
    out, width = handle.arch.mlp_out_weight(1).shape
    return Edit(request=make_request("{} is located in", UNRELATED_SUBJECT, " " + target), layer=1, method="rome",
                model=model_fingerprint(handle), weight_shape=(out, width), right=np.zeros(out), left=np.zeros(width), dense=None,
                stats={}, weight_norm=float(handle.arch.mlp_out_weight(1).detach().double().norm()))


@pytest.mark.parametrize("leaking", [2, 3])
def test_probe_facts_answered_with_an_edits_target_warn_of_disabling(handle, leaking):
    answered = _answered(handle, PROBES)
    # The first ``leaking`` facts' true answer is something else; the model answers them with an edit's new target.
    probes = [_fact(record, WRONG_ANSWER if i < leaking else answer) for i, (record, answer) in enumerate(answered)]
    session = EditSession(handle)
    for _record, answer in answered[:leaking]:
        session.add(_edit_towards(handle, answer))
    health = model_health(session, probes)
    assert health.leaked == tuple(record["prompt"] for record, _answer in answered[:leaking])
    assert (health.probes_right, health.probes_total) == (PROBES - leaking, PROBES)
    assert health.warnings == (f"disabling: {leaking} of {PROBES} unrelated facts are now answered with an edit's new target; "
                               "switch edits off to find which",)


def test_one_leaked_fact_in_ten_is_below_the_disabling_share(handle):
    answered = _answered(handle, PROBES)
    probes = [_fact(record, WRONG_ANSWER if i == 0 else answer) for i, (record, answer) in enumerate(answered)]
    session = EditSession(handle)
    session.add(_edit_towards(handle, answered[0][1]))
    health = model_health(session, probes)
    assert health.leaked == (answered[0][0]["prompt"],) and health.warnings == ()


def test_a_wrong_answer_that_is_no_edits_target_is_not_a_leak(handle):
    answered = _answered(handle, PROBES)
    probes = [_fact(record, WRONG_ANSWER) for record, _answer in answered]  # all wrong, none towards an edit's target
    session = EditSession(handle)
    session.add(_edit_towards(handle, WRONG_ANSWER))
    health = model_health(session, probes)
    assert health.leaked == () and health.probes_right == 0 and health.warnings == ()


def test_completions_below_the_baseline_fluency_warn_of_disabling(handle):
    session = EditSession(handle)
    now = model_health(session, []).fluency
    assert now > 0  # the tiny model's completions are not one word repeated
    lost = model_health(session, [], baseline_fluency=now + 1.25)
    assert lost.warnings == ("disabling: completions lost 1.25 bits of n-gram entropy; the model repeats itself",)
    # Up to the threshold (1 bit) a lower fluency is no warning, nor is a run without a baseline.
    assert model_health(session, [], baseline_fluency=now + 0.99).warnings == ()
    assert model_health(session, [], baseline_fluency=now - 3.0).warnings == ()
    assert model_health(session, []).warnings == ()
