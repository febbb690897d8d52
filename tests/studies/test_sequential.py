"""Sequential editing: many edits on one model, measured at checkpoints, against a recomputation from scratch.

The oracle scores with plain forward passes of the model (prompt + target, float64 log-softmax) and reads
the weights directly; it shares nothing with the scoring and health code it checks.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from explorer.core.errors import InputError
from explorer.core.facts import Fact
from explorer.editing import EditOptions, edit_fact, make_request
from explorer.editing.edits import EditSession
from explorer.editing.statistics import StatsSpec
from explorer.studies.evaluate import Case
from explorer.studies.sequential import SequentialSettings, sequential_run
from tests.conftest import REPO, build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = EditOptions(layer=1, steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))
REQUESTS = [
    ("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
    ("{} plays the", "Miles Davis", " guitar", " trumpet"),
    ("{} was born in", "Marie Curie", " Oslo", " Warsaw"),
    ("The mother tongue of {} is", "Danielle Darrieux", " English", " French"),
]
CASES = [
    Case(case_id=str(i), request=make_request(prompt, subject, new, true),
         paraphrases=(f"Some text. {prompt.format(subject)}", f"Other words here. {prompt.format(subject)}"),
         neighborhood=(prompt.format("The Louvre"), prompt.format("Louis Armstrong")))
    for i, (prompt, subject, new, true) in enumerate(REQUESTS)
]


def _top(handle, prompt: str) -> int:
    ids = handle.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return int(handle.model(input_ids=ids).logits[0, -1].argmax())


def _probability(handle, prompt: str, target: str) -> float:
    """exp(−mean NLL) of ``target``'s tokens after ``prompt``: one plain forward pass."""
    prompt_ids = handle.tokenizer(prompt)["input_ids"]
    target_ids = handle.tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = handle.model(input_ids=ids).logits[0].double().log_softmax(-1)
    nll = [-float(logits[len(prompt_ids) - 1 + i, token]) for i, token in enumerate(target_ids)]
    return math.exp(-sum(nll) / len(nll))


def _scores(handle, cases) -> dict:
    """ES, PS, NS in percent: per case the share of prompts where the wanted target is ahead, averaged over cases."""
    def ahead(prompts, request, new_wins):
        shares = [(_probability(handle, p, request.target_new) > _probability(handle, p, request.target_true)) == new_wins
                  for p in prompts]
        return sum(shares) / len(shares)

    return {
        "ES": 100 * sum(ahead([c.request.filled], c.request, True) for c in cases) / len(cases),
        "PS": 100 * sum(ahead(c.paraphrases, c.request, True) for c in cases) / len(cases),
        "NS": 100 * sum(ahead(c.neighborhood, c.request, False) for c in cases) / len(cases),
    }


def _known_probes(handle, count: int = 6) -> list[Fact]:
    """Bundled prompts whose attribute is the tiny model's own top-1 token: facts it knows."""
    probes = []
    for record in json.loads((REPO / "assets" / "known_facts.json").read_text()):
        answer = handle.tokenizer.decode([_top(handle, record["prompt"])]).strip()
        if answer and handle.tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0] == _top(handle, record["prompt"]):
            probes.append(Fact(**{**record, "attribute": answer, "prediction": ""}))
        if len(probes) == count:
            return probes
    raise AssertionError("the tiny model completes too few bundled prompts with a whole token")


def test_checkpoints_equal_scores_recomputed_from_scratch_on_the_final_model():
    handle = build_tiny("llama")
    probes = _known_probes(handle)
    own = [handle.arch.mlp_out_weight(layer).detach().clone() for layer in range(handle.num_layers)]
    seen = []
    run = sequential_run(handle, CASES, "counterfact", SequentialSettings(every=3, edit=FAST), on_checkpoint=seen.append,
                         probe_set=probes)
    assert run["cases"] == 4 and run["method"] == "rome" and run["layer"] == 1 and run["probes"] == 6
    assert [point["edits"] for point in run["checkpoints"]] == [0, 3, 4] and seen == run["checkpoints"]
    assert [record["case_id"] for record in run["edits"]] == ["0", "1", "2", "3"]
    first = run["checkpoints"][0]
    assert first["ES"] is None and first["probe_retained"] == 1.0 and first["relative_norm"] == 0.0
    # The run leaves the model as it was.
    assert all(torch.equal(a, handle.arch.mlp_out_weight(layer)) for layer, a in enumerate(own))

    # From scratch: a fresh copy of the model, the same edits made one after another, scored by the oracle.
    fresh = build_tiny("llama")
    session = EditSession(fresh)
    for case in CASES:
        with session.applied():
            session.add(edit_fact(EditSession(fresh), case.request, FAST))
    with session.applied():
        expected = _scores(fresh, CASES)
        retained = sum(_top(fresh, fact.prompt) == fresh.tokenizer(" " + fact.attribute, add_special_tokens=False)["input_ids"][0]
                       for fact in probes) / len(probes)
        edited = fresh.arch.mlp_out_weight(1).detach().double()
    last = run["checkpoints"][-1]
    for key in ("ES", "PS", "NS"):
        assert last[key] == pytest.approx(expected[key], abs=1e-9), key
    assert last["probe_retained"] == pytest.approx(retained)
    original = own[1].double()
    assert last["relative_norm"] == pytest.approx(float((edited - original).norm() / original.norm()), rel=1e-5)
    # The edits really moved the model: the scores are not those of the unedited one.
    assert expected != _scores(handle, CASES) and last["relative_norm"] > 0.01


@pytest.mark.parametrize("settings, message", [
    (SequentialSettings(every=0), "--every must be 1 or more"),
    (SequentialSettings(method="memit"), "unknown method"),
    (SequentialSettings(probes=0), "probe set"),
])
def test_bad_settings_are_clear_errors_before_any_edit(settings, message):
    handle = build_tiny("gpt2")
    with pytest.raises(InputError, match=message):
        sequential_run(handle, CASES, "counterfact", settings)
    with pytest.raises(InputError, match="no cases"):
        sequential_run(handle, [], "counterfact")


def test_sequential_command_writes_its_json_and_refuses_bad_input(tmp_path):
    from tests.conftest import run_cli, save_tiny

    folder = save_tiny(tmp_path / "gpt2", "gpt2")
    records = [{"case_id": i, "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": {"str": new.strip()},
                                                    "target_true": {"str": true.strip()}},
                "paraphrase_prompts": [f"Text. {prompt.format(subject)}"], "neighborhood_prompts": [prompt.format("The Louvre")]}
               for i, (prompt, subject, new, true) in enumerate(REQUESTS[:3])]
    (tmp_path / "cases.json").write_text(json.dumps(records))
    out = run_cli("sequential", str(tmp_path / "cases.json"), "--every", "2", "--layer", "1", "--stats-corpus", "identity",
                  "--steps", "2", "--model", str(folder), "--json", str(tmp_path / "run.json"), one_thread=True)
    assert out.returncode == 0, out.stderr
    run = json.loads((tmp_path / "run.json").read_text())
    assert set(run) == {"cases", "method", "settings", "zsre_target", "layer", "every", "probes", "checkpoints", "edits"}
    assert run["cases"] == 3 and [point["edits"] for point in run["checkpoints"]] == [0, 2, 3]
    assert set(run["checkpoints"][-1]) == {"edits", "ES", "PS", "NS", "probe_retained", "fluency", "relative_norm", "seconds",
                                           "warnings"}
    assert "after 3 edits: ES" in out.stderr
    bad = run_cli("sequential", str(tmp_path / "cases.json"), "--every", "0", "--model", str(folder), one_thread=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: --every must be 1 or more, got 0"
    missing = run_cli("sequential", str(tmp_path / "none.json"), "--model", str(folder), one_thread=True)
    assert missing.returncode == 2 and "none.json" in missing.stderr.strip().splitlines()[-1]


def test_probe_facts_about_an_edited_subject_are_not_counted_as_unrelated():
    from explorer.studies.health import model_health, probe_facts

    handle = build_tiny("llama")
    probes = _known_probes(handle)
    edited = probes[0]
    assert edited not in probe_facts(handle, 6, probes, [edited.subject])
    session = EditSession(handle)
    assert model_health(session, probes).probes_total == len(probes)
    session.add(edit_fact(EditSession(handle), make_request(edited.template, edited.subject, " Rome"), FAST))
    health = model_health(session, probes)
    assert health.probes_total == len(probes) - 1 and health.relative_change > 0
