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


def _real_records(tmp_path, name: str, count: int, changes: dict[int, dict] | None = None):
    """The first ``count`` bundled records of ``name`` in a file of their own, ``changes[i]`` merged into record i."""
    records = json.loads((REPO / "assets" / name).read_text(encoding="utf-8"))[:count]
    for index, fields in (changes or {}).items():
        records[index] = {**records[index], **fields}
    path = tmp_path / f"records-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(records))
    return path


def _from_scratch(family: str, cases):
    """A fresh copy of the model with ``cases``' edits made one after another (as a sequential run makes them)."""
    fresh = build_tiny(family)
    session = EditSession(fresh)
    for case in cases:
        with session.applied():
            session.add(edit_fact(EditSession(fresh), case.request, FAST))
    return fresh, session


def test_easyedit_layout_records_run_through_sequential_with_es_ps_ns_at_every_checkpoint(tmp_path):
    """Real CounterFact records in EasyEdit's layout (the bundled 2,000 are in it), read as evaluate reads them."""
    from explorer.studies.evaluate import read_dataset

    kind, cases = read_dataset(_real_records(tmp_path, "counterfact_real_2000.json", 3))
    assert kind == "counterfact-easyedit" and [len(case.paraphrases) for case in cases] == [1, 1, 1]
    handle = build_tiny("llama")
    run = sequential_run(handle, cases, kind, SequentialSettings(every=2, edit=FAST), probe_set=_known_probes(handle))
    assert [point["edits"] for point in run["checkpoints"]] == [0, 2, 3]
    assert [record["case_id"] for record in run["edits"]] == [case.case_id for case in cases]
    first, *later = run["checkpoints"]
    assert (first["ES"], first["PS"], first["NS"]) == (None, None, None)
    fresh, session = _from_scratch("llama", cases)
    with session.applied():
        expected = _scores(fresh, cases)
    for key in ("ES", "PS", "NS"):
        assert all(isinstance(point[key], float) and 0 <= point[key] <= 100 for point in later), key
        assert later[-1][key] == pytest.approx(expected[key], abs=1e-9), key


def _accuracy(handle, prompt: str, target: str) -> float:
    """Share of ``target``'s tokens that are the top-1 token after ``prompt`` and the target tokens before them."""
    prompt_ids = handle.tokenizer(prompt)["input_ids"]
    target_ids = handle.tokenizer(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = handle.model(input_ids=torch.tensor([prompt_ids + target_ids])).logits[0]
    return sum(int(logits[len(prompt_ids) - 1 + i].argmax()) == token for i, token in enumerate(target_ids)) / len(target_ids)


def _greedy_text(handle, prompt: str, tokens: int) -> str:
    ids = handle.tokenizer(prompt)["input_ids"]
    for _ in range(tokens):
        with torch.no_grad():
            ids = ids + [int(handle.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    return handle.tokenizer.decode(ids[-tokens:])


def test_zsre_records_report_their_accuracies_under_the_es_ps_ns_keys(tmp_path):
    """zsRE's efficacy, paraphrase and specificity land under ES, PS and NS, each under its own key.

    Real records whose targets are made partly the model's own greedy tokens, so that the three accuracies
    differ from each other and a swap of two keys shows.
    """
    from explorer.studies.evaluate import read_dataset

    handle = build_tiny("llama")
    records = []
    for record in json.loads((REPO / "assets" / "zsre_train_1k.json").read_text(encoding="utf-8")):
        alt, loc_ans = _greedy_text(handle, record["src"], 2), _greedy_text(handle, record["loc"], 1)
        if all(text.startswith(" ") and all(word.isalpha() for word in text.split()) for text in (alt, loc_ans)):  # words, no bytes
            records.append({**record, "alt": alt, "loc_ans": loc_ans + " zebra"})
        if len(records) == 2:
            break
    (tmp_path / "zsre.json").write_text(json.dumps(records))
    kind, cases = read_dataset(tmp_path / "zsre.json", zsre_target="alt")
    assert kind == "zsre"
    run = sequential_run(handle, cases, kind, SequentialSettings(every=2, edit=FAST), probe_set=_known_probes(handle, 3))
    fresh, session = _from_scratch("llama", cases)
    with session.applied():
        accuracies = {"ES": [_accuracy(fresh, case.request.filled, case.request.target_new) for case in cases],
                      "PS": [_accuracy(fresh, case.paraphrases[0], case.request.target_new) for case in cases],
                      "NS": [_accuracy(fresh, case.neighborhood[0], case.neighborhood_answer) for case in cases]}
    expected = {key: 100 * sum(values) / len(values) for key, values in accuracies.items()}
    assert len(set(expected.values())) == 3, expected
    last = run["checkpoints"][-1]
    assert last["edits"] == 2
    for key in ("ES", "PS", "NS"):
        assert last[key] == pytest.approx(expected[key], abs=1e-9), key


def test_an_unknown_data_set_format_is_refused_before_any_preparation(monkeypatch):
    from explorer.studies import sequential

    monkeypatch.setattr(sequential, "plan_edit", lambda *a, **k: pytest.fail("prepared edits for cases of an unknown format"))
    with pytest.raises(InputError, match="unknown data set format 'counterfact-mend'"):
        sequential_run(build_tiny("gpt2"), CASES, "counterfact-mend", SequentialSettings(edit=FAST))


# Records sequential (like evaluate) cannot score, each changed from a real EasyEdit-layout record, and the reason given.
UNUSABLE = [
    ({"ground_truth": ""}, "ground_truth is empty; CounterFact's scores compare the new object with the true one"),
    ({"ground_truth": None}, "ground_truth must be text, not null"),
    ({"target_new": ["piano"]}, "target_new must be text, not a list"),
    ({"target_new": 7}, "target_new must be text, not a number"),
    ({"rephrase_prompt": {"text": "x"}}, "rephrase_prompt must be text or a list of texts, not an object"),
    ({"locality_prompt": ["fine", 3]}, "locality_prompt must be text or a list of texts; it holds a number"),
    ({"subject": "Nobody Here"}, "the subject 'Nobody Here' does not occur in it"),
    ({"target_new": "Spain"}, "target_new is the same as target_true"),
]


@pytest.mark.parametrize("change, reason", UNUSABLE, ids=[reason.split(";")[0][:30] for _change, reason in UNUSABLE])
def test_a_record_sequential_cannot_use_is_one_line_naming_it_and_why(tmp_path, change, reason):
    from explorer.studies.evaluate import read_dataset

    case_id = json.loads((REPO / "assets" / "counterfact_real_2000.json").read_text(encoding="utf-8"))[1]["case_id"]
    with pytest.raises(InputError) as error:
        read_dataset(_real_records(tmp_path, "counterfact_real_2000.json", 3, {1: change}))
    message = str(error.value)
    assert message.startswith(f"record 1 (case_id {case_id}): ") and reason in message and "\n" not in message, message


@pytest.mark.parametrize("record, message", [
    ("just text", "record 2 is text, not an object of CounterFact in EasyEdit/MEND's format"),
    (["a", "list"], "record 2 is a list, not an object"),
    ({"subject": "X", "src": "Where is X?", "alt": "Rome", "loc": "q", "loc_ans": "a"},
     "record 2 is zsRE in ROME's format, but the data set's first record is CounterFact in EasyEdit/MEND's format"),
    ({"case_id": 9, "prompt": "X is in", "subject": "X"}, "record 2 (case_id 9) (CounterFact in EasyEdit/MEND's format) lacks field"),
])
def test_a_record_of_another_shape_than_the_first_is_named(tmp_path, record, message):
    from explorer.studies.evaluate import read_dataset

    records = json.loads((REPO / "assets" / "counterfact_real_2000.json").read_text(encoding="utf-8"))[:2] + [record]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_dataset(tmp_path / "mixed.json")


def test_sequential_command_runs_easyedit_records_and_refuses_an_unusable_one_in_one_line(tmp_path):
    from tests.conftest import run_cli, save_tiny

    broken = _real_records(tmp_path, "counterfact_real_2000.json", 3, {2: {"ground_truth": "  "}})
    case_id = json.loads(broken.read_text())[2]["case_id"]
    refused = run_cli("sequential", str(broken), "--model", str(tmp_path / "never-loaded"), one_thread=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (f"error: record 2 (case_id {case_id}): ground_truth is empty; "
                                      "CounterFact's scores compare the new object with the true one"), refused.stderr

    folder = save_tiny(tmp_path / "gpt2", "gpt2")
    out = run_cli("sequential", str(_real_records(tmp_path, "counterfact_real_2000.json", 3)), "--every", "2", "--layer", "1",
                  "--stats-corpus", "identity", "--steps", "2", "--probes", "3", "--model", str(folder),
                  "--json", str(tmp_path / "run.json"), one_thread=True)
    assert out.returncode == 0, out.stderr
    run = json.loads((tmp_path / "run.json").read_text())
    assert [point["edits"] for point in run["checkpoints"]] == [0, 2, 3]
    assert all(isinstance(point[key], float) for point in run["checkpoints"][1:] for key in ("ES", "PS", "NS"))
    assert "after 2 edits: ES" in out.stderr and "after 3 edits: ES" in out.stderr
