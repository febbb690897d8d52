"""Evaluation: the three data set formats, the metric functions, and runs on a tiny model (restore, resume)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from explorer.core.errors import InputError
from explorer.editing import EditOptions
from explorer.editing.statistics import StatsSpec
from explorer.studies import evaluate as ev
from explorer.studies.metrics import harmonic_mean, mean_ci95, ngram_entropy
from tests.conftest import REPO, build_tiny

SAMPLE = REPO / "assets" / "handwritten_counterfact_cases.json"
FAST = EditOptions(layer=1, steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))


def test_sample_set_is_valid_counterfact():
    kind, cases = ev.read_dataset(SAMPLE)
    assert kind == "counterfact" and len(cases) >= 40
    assert len({c.request.prompt for c in cases}) > 10
    for case in cases:
        assert len(case.paraphrases) >= 2 and len(case.neighborhood) >= 2 and case.generation
        assert case.request.target_new.startswith(" ") and case.request.target_true.startswith(" ")


def test_the_bundled_real_records_read_in_both_zsre_conventions():
    """The real data sets the README's numbers come from: 2,000 CounterFact records, 1,000 zsRE questions."""
    raw = json.loads(ev.REAL_COUNTERFACT.read_text(encoding="utf-8"))
    kind, cases = ev.read_dataset(ev.REAL_COUNTERFACT)
    assert kind == "counterfact-easyedit" and len(cases) == len(raw) == 2000 and len({c.case_id for c in cases}) == 2000
    for record, case in zip(raw, cases):
        assert case.request.filled == record["prompt"] and case.request.target_new.strip() == record["target_new"]
        assert case.request.target_true.strip() == record["ground_truth"] and len(case.paraphrases) == len(case.neighborhood) == 1
    questions = json.loads(ev.REAL_ZSRE.read_text(encoding="utf-8"))
    _, rome_style = ev.read_dataset(ev.REAL_ZSRE, zsre_target="answers")
    _, easyedit_style = ev.read_dataset(ev.REAL_ZSRE, zsre_target="alt")
    assert len(rome_style) == len(questions) == 1000
    assert len(easyedit_style) == sum(1 for record in questions if record["alt"].strip()) == 998  # 2 have no alt
    easyedit_style = iter(easyedit_style)
    for record, rome_case in zip(questions, rome_style):
        if not record["alt"].strip():
            continue
        easy_case = next(easyedit_style)
        assert rome_case.request.target_new.strip() == record["answers"][0].strip() and easy_case.request.target_new.strip() == record["alt"].strip()
        assert rome_case.neighborhood == (record["loc"] + "?",) and easy_case.neighborhood == (record["loc"],)
        assert easy_case.request.target_true in (None, " " + record["answers"][0].strip(), record["answers"][0]) and easy_case.request.target_true != easy_case.request.target_new


def test_easyedit_and_zsre_formats(tmp_path):
    easy = [{"case_id": 7, "prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
             "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "The Eiffel Tower is in",
             "locality_prompt": "The Louvre is in", "locality_ground_truth": "Paris"}]
    (tmp_path / "easy.json").write_text(json.dumps(easy))
    kind, cases = ev.read_dataset(tmp_path / "easy.json")
    assert kind == "counterfact-easyedit"
    assert cases[0].request.prompt == "{} is located in the city of" and cases[0].request.target_true == " Paris"
    assert cases[0].paraphrases == ("The Eiffel Tower is in",) and cases[0].case_id == "7"
    zsre = [{"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Yale",
             "rephrase": "What university did Watts Humphrey go to?", "alt": "University of Michigan",
             "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father",
             "loc_ans": "Hugo Weaving", "cond": ""}]
    (tmp_path / "zsre.json").write_text(json.dumps(zsre))
    kind, cases = ev.read_dataset(tmp_path / "zsre.json")
    assert kind == "zsre" and cases[0].request.prompt == "What university did {} attend?"
    assert cases[0].neighborhood_answer == " Hugo Weaving"


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{\"foo\": 1}]", "unrecognised data set record"),
        ("not json", "is not JSON"),
        ("[]", "non-empty JSON list"),
        ("[{\"requested_rewrite\": {\"prompt\": \"{} is\"}}]", "lacks field"),
    ],
)
def test_bad_data_sets_are_clear_errors(tmp_path, content, message):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(InputError, match=message):
        ev.read_dataset(tmp_path / "d.json")


def test_metric_functions():
    # "a b a b a b": bigrams (a,b)x3 (b,a)x2 -> H2; trigrams (a,b,a)x2 (b,a,b)x2 -> H3 = 1 bit
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert ngram_entropy("a b a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("same same same same") == 0.0
    assert harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(3 / (1 + 2 + 2))
    assert harmonic_mean([1.0, 0.0]) == 0.0
    assert mean_ci95([1.0, 1.0])["ci95"] == 0.0
    summary = ev.summarise(
        [{"after": {"ES": 1.0, "PS": 0.5, "NS": 1.0, "EM": 0.2, "PM": 0.1, "NM": 0.3, "fluency": 5.0}}] * 2, "after", "counterfact"
    )
    assert summary["ES"]["mean"] == 100.0 and summary["S"]["mean"] == pytest.approx(100 * 3 / (1 + 2 + 1))
    assert summary["fluency"]["mean"] == 5.0


def test_run_restores_the_model_and_resumes(tmp_path, monkeypatch):
    handle = build_tiny("gemma3_text")
    _, cases = ev.read_dataset(SAMPLE, limit=2)
    before = [p.detach().clone() for p in handle.model.parameters()]
    settings = ev.EvaluationSettings(method="rome", generation=False, edit=FAST)
    partial = tmp_path / "run.partial.jsonl"
    result = ev.evaluate(handle, cases, "counterfact", settings, partial)
    assert all(torch.equal(a, b) for a, b in zip(before, handle.model.parameters()))
    assert result["cases"] == 2 and set(result["metrics"]) == set(ev.COUNTERFACT_METRICS)
    unedited = ev.evaluate(handle, cases, "counterfact", ev.EvaluationSettings(method="none", generation=False))
    assert unedited["unedited"] == result["unedited"]  # the same unedited numbers whatever the method
    first = result["per_case"][0]
    assert first["after"]["target_new_prob"] != first["before"]["target_new_prob"]
    # Resume: every case is in the per-case file, so a rerun edits nothing.
    monkeypatch.setattr(ev, "edit_fact", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = ev.evaluate(handle, cases, "counterfact", settings, partial)
    assert again["per_case"] == json.loads(json.dumps(result["per_case"]))
    # A different method does not reuse another run's cases.
    other = ev.EvaluationSettings(method="rome-original", generation=False, edit=FAST)
    with pytest.raises(AssertionError, match="recomputed"):
        ev.evaluate(handle, cases, "counterfact", other, partial)


def test_fluency_uses_generations():
    handle = build_tiny("llama")
    _, cases = ev.read_dataset(SAMPLE, limit=1)
    metrics = ev.counterfact_metrics(handle, cases[0], generation=True, seed=0)
    assert metrics["fluency"] is not None and metrics["fluency"] > 0
    assert 0 <= metrics["ES"] <= 1 and metrics["NS"] is not None and np.isfinite(metrics["NM"])


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", b"{not json\n", b"", b'{"method": "rome"}\n[1, 2]\n"text"\n'])
def test_a_damaged_resume_file_means_starting_afresh(tmp_path, content):
    header = {"method": "rome", "format": "counterfact"}
    path = tmp_path / "run.partial.jsonl"
    path.write_bytes(content)
    assert ev._read_partial(path, header) == {}
    path.write_text(json.dumps(header) + "\n" + json.dumps({"case_id": "7", "x": 1}) + "\n[1]\n" + json.dumps({"case_id": "8"}) + "\n")
    assert list(ev._read_partial(path, header)) == ["7"]  # entries after a foreign line are not trusted


def test_sampling_seed_out_of_range_is_a_clear_error():
    from explorer.core.errors import InputError
    from explorer.core.generation import Sampling

    for seed in (-1, 2**64, 1.5):
        with pytest.raises(InputError, match="sampling seed must be a whole number"):
            Sampling(top_k=50, seed=seed)
    assert Sampling(top_k=50, seed=2**63 - 1).seed == 2**63 - 1
