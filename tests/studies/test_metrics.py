"""An independent oracle for the CounterFact and zsRE metrics.

The oracle never calls ``explorer.core.scoring``, ``explorer.studies.metrics`` or ``explorer.studies.evaluate`` for its own numbers.
For each (prompt, target) it runs ONE plain forward pass ``model(input_ids=prompt + target)`` (no padding, no
batching), takes ``log_softmax`` in float64 and reads, at the position before each target token, that token's
log-probability and whether it is the top-1 token. Tokenisation mirrors the package's convention: the prompt with
the tokenizer's special tokens (a BOS where the tokenizer has one), the target without them. The metrics are then
written out from the definitions of "Locating and Editing Factual Associations in GPT" (Meng et al., 2022):

* P(target) = exp(-mean per-token NLL) (as ROME's reference code measures it; see below);
* ES / PS: share of rewrite / paraphrase prompts with P(new) > P(true); EM / PM: mean of P(new) - P(true);
* NS: share of neighbourhood prompts with P(true) > P(new) (the sign flip); NM: mean of P(true) - P(new);
* S: harmonic mean of ES, PS and NS, each first averaged over cases;
* zsRE: per-token top-1 accuracy of the target under teacher forcing.

Where the package departs from the paper's notation or ROME's reference code (the tests pin the package's choice):

* P(target) of a multi-token target is the geometric mean of its token probabilities (exp of minus the mean NLL),
  exactly as ROME's ``test_batch_prediction`` and ``summarize.py`` compute it; the paper's P[o] reads like the
  joint probability. With targets of different token counts, ES/PS/NS can differ between the two readings.
* zsRE's edit target is ``alt`` (EasyEdit/MEND's convention) and ``answers[0]`` the true object; ROME's
  ``MENDQADataset`` edits to ``answers[0]`` and never reads ``alt``.
* zsRE's neighbourhood prompt is ``loc`` as written; ROME's ``MENDQADataset`` appends ``"?"`` to it. Otherwise
  specificity is ROME's: the model's (edited or not) top-1 accuracy on the tokens of ``" " + loc_ans`` after the
  neighbourhood question, teacher-forced; it is not compared with the unedited model's predictions.
"""
from __future__ import annotations

import functools
import json
import math
import re

import numpy as np
import pytest
import torch

from explorer.core import scoring
from explorer.studies import evaluate as ev
from explorer.studies.metrics import rewrite_scores, rome_ngram_entropy
from tests.conftest import REPO, build_tiny, run_cli, save_tiny

FACTS = json.loads((REPO / "assets" / "known_facts.json").read_text(encoding="utf-8"))
FAMILIES = ("gpt2", "llama")  # gpt2's tokenizer adds no special tokens; llama's puts a BOS before the prompt
NLL_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # batched-vs-single float32 differs by ~1e-5 at most


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_models():
    """Tiny random models, built once per module: ``tiny_models(family, dtype)``."""
    built = {}

    def get(family: str, dtype: torch.dtype = torch.float64):
        if (family, dtype) not in built:
            handle = build_tiny(family)
            handle.model.to(dtype)
            built[family, dtype] = handle
        return built[family, dtype]

    return get


# ---------------------------------------------------------------- the oracle


def oracle_ids(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids with special tokens (BOS where the tokenizer has one), target ids without."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return list(prompt_ids), list(tokenizer(target, add_special_tokens=False)["input_ids"])


def oracle_tokens(model, tokenizer, prompt: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Per target token: (NLL, top-1 hit), from one unpadded forward pass over prompt + target."""
    prompt_ids, target_ids = oracle_ids(tokenizer, prompt, target)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + target_ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    nll, hit = [], []
    for j, token in enumerate(target_ids):
        row = logprobs[len(prompt_ids) + j - 1]  # the logits at position p predict the token at p + 1
        nll.append(-row[token].item())
        hit.append(int(row.argmax()) == token)
    return np.array(nll), np.array(hit)


def oracle_prob(model, tokenizer, prompt: str, target: str) -> float:
    """P(target | prompt) as the paper's code measures it: exp(-mean per-token NLL)."""
    return math.exp(-oracle_tokens(model, tokenizer, prompt, target)[0].mean())


def oracle_accuracy(model, tokenizer, prompt: str, target: str) -> float:
    """Share of the target's tokens that are the top-1 prediction under teacher forcing (zsRE)."""
    return float(oracle_tokens(model, tokenizer, prompt, target)[1].mean())


def oracle_counterfact(model, tokenizer, rewrite: str, paraphrases, neighbours, new: str, true: str) -> dict:
    """ES, PS, NS, EM, PM, NM of one case, written out from the paper's definitions."""
    def probs(prompts):
        return [(oracle_prob(model, tokenizer, p, new), oracle_prob(model, tokenizer, p, true)) for p in prompts]

    rewrite_p, para_p, neigh_p = probs([rewrite]), probs(paraphrases), probs(neighbours)
    return {
        "ES": sum(n > t for n, t in rewrite_p) / len(rewrite_p),
        "PS": sum(n > t for n, t in para_p) / len(para_p),
        "NS": sum(t > n for n, t in neigh_p) / len(neigh_p),  # neighbours should keep the true object ahead
        "EM": sum(n - t for n, t in rewrite_p) / len(rewrite_p),
        "PM": sum(n - t for n, t in para_p) / len(para_p),
        "NM": sum(t - n for n, t in neigh_p) / len(neigh_p),
        "target_new_prob": rewrite_p[0][0],
        "target_true_prob": rewrite_p[0][1],
    }


def oracle_zsre(model, tokenizer, record: dict, convention: str = "answers") -> dict:
    """zsRE's three accuracies of one record, as the package defines them (see the module docstring).

    ``answers`` is ROME's code: the target is answers[0] and the neighbour is asked as loc + "?";
    ``alt`` is EasyEdit's: the target is alt and loc is asked as written.
    """
    listed = lambda value: [value] if isinstance(value, str) else list(value)  # noqa: E731
    new = " " + (record["answers"][0] if convention == "answers" else record["alt"])
    answer = " " + record["loc_ans"]
    questions = [q + "?" if convention == "answers" else q for q in listed(record["loc"])]
    return {
        "efficacy": oracle_accuracy(model, tokenizer, record["src"], new),
        "paraphrase": float(np.mean([oracle_accuracy(model, tokenizer, p, new) for p in listed(record["rephrase"])])),
        "specificity": float(np.mean([oracle_accuracy(model, tokenizer, p, answer) for p in questions])),
    }


# ---------------------------------------------------------------- targets the model partly predicts


@functools.lru_cache(maxsize=None)
def _words(tokenizer) -> list[int]:
    """Ids of single-token words after a space (' by', ' the'): they stay one token between other such words."""
    out = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if text.startswith(" ") and text[1:].isalpha() and tokenizer(text, add_special_tokens=False)["input_ids"] == [i]:
            out.append(i)
    return out


def _top1(model, tokenizer, prompt: str, continuation: list[int]) -> int:
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    with torch.no_grad():
        return int(model(input_ids=torch.tensor([prompt_ids + continuation])).logits[0, -1].argmax())


def target_with_hits(model, tokenizer, prompt: str, pattern: str) -> str | None:
    """A target of whole words whose token k is the model's top-1 exactly where ``pattern[k]`` is 'H' (else 'M').

    None where a wanted hit is not a whole word. Random tiny models rarely predict any given text, so without
    such targets every accuracy would be 0 and an off-by-one or a swapped slice would go unnoticed.
    """
    words, chosen = _words(tokenizer), []
    for kind in pattern:
        top = _top1(model, tokenizer, prompt, chosen)
        if kind == "H":
            if top not in words:
                return None
            chosen.append(top)
        else:
            chosen.append(next(w for w in words if w != top))
    return tokenizer.decode(chosen)


ALT_PATTERNS = ("HM", "HMM", "HMMM")  # record i's target: efficacy 1/2, 1/3, 1/4
LOC_PATTERNS = ("HMM", "HM", "H")  # record i's neighbourhood answer: specificity 1/3, 1/2, 1


def zsre_records(model, tokenizer, count: int) -> list[dict]:
    """``count`` (at most 3) zsRE records in ROME's format, from the bundled facts, with partly predicted targets.

    Record i's alt follows ``ALT_PATTERNS[i]`` after src and its loc_ans ``LOC_PATTERNS[i]`` after loc; its
    rephrases are src itself (a trivial rephrase, scoring as src) and the first other fact's prompt where alt
    scores differently, so paraphrase lies strictly between 0 and 1 and differs from efficacy. The tests rely
    only on the oracle's values.
    """
    records = []
    for index, fact in enumerate(FACTS):
        alt = target_with_hits(model, tokenizer, fact["prompt"], ALT_PATTERNS[len(records)])
        if alt is None or any(r["subject"] == fact["subject"] for r in records):
            continue
        questions = ["nq question: " + f["prompt"] for f in FACTS[index + 1 :] if f["subject"] != fact["subject"]]
        loc, loc_ans = next((q, a) for q in questions if (a := target_with_hits(model, tokenizer, q, LOC_PATTERNS[len(records)])))
        efficacy = oracle_accuracy(model, tokenizer, fact["prompt"], alt)
        other = next(f["prompt"] for f in FACTS if f["subject"] != fact["subject"]
                     and oracle_accuracy(model, tokenizer, f["prompt"], alt) != efficacy)
        records.append({
            "subject": fact["subject"], "src": fact["prompt"], "pred": fact["attribute"],
            "rephrase": [fact["prompt"], other],
            "alt": alt.strip(), "answers": [fact["attribute"]], "loc": loc, "loc_ans": loc_ans.strip(), "cond": "",
        })
        if len(records) == count:
            return records
    raise AssertionError("the bundled facts hold too few prompts whose top-1 token is a whole word")


# ---------------------------------------------------------------- 1. score_targets against the oracle


PROMPTS = [
    "Paris is",
    "The Eiffel Tower is located in the city of",
    "Miles Davis plays the",
    "What university did Watts Humphrey attend? The answer, according to the records of the registrar, is",
]
TARGETS = [" the", " Paris", " University of Michigan", " saxophone"]  # one token, then 3, 15 and 8 tokens


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_score_targets_equals_one_plain_forward_pass_per_pair(tiny_models, family, dtype, monkeypatch):
    """``score_targets`` on right-padded batches gives, for every pair, the NLLs and top-1 hits of a plain pass.

    Mixed prompt lengths (so rows are padded), 1- to 15-token targets, and 18 pairs with ``ROWS_PER_PASS`` = 3
    (six batches). An off-by-one position, a BOS inside the target, a lost or reordered batch all change NLLs by
    far more than the tolerance (1e-9 in float64; 1e-4 in float32, where batching alone moves them ~1e-5).
    """
    handle = tiny_models(family, dtype)
    tokenizer = handle.tokenizer
    hit_pair = next((f["prompt"], t) for f in FACTS if (t := target_with_hits(handle.model, tokenizer, f["prompt"], "HM")))
    pairs = [(p, t) for p in PROMPTS for t in TARGETS] + [hit_pair] * 2  # 18 pairs; the last two: top-1, then not
    batches = []
    original = scoring._batch_scores
    monkeypatch.setattr(scoring, "ROWS_PER_PASS", 3)
    monkeypatch.setattr(scoring, "_batch_scores", lambda h, batch: batches.append(batch) or original(h, batch))

    scores = scoring.score_targets(handle, pairs)

    assert len(batches) == math.ceil(len(pairs) / 3) == 6
    assert any(len({len(p) + len(t) for p, t in batch}) > 1 for batch in batches)  # padding happened
    bos = tokenizer.bos_token_id
    hits = []
    for (prompt, target), score in zip(pairs, scores, strict=True):
        prompt_ids, target_ids = oracle_ids(tokenizer, prompt, target)
        assert (prompt_ids[0] == bos) == (family == "llama") and bos not in target_ids  # the convention mirrored
        nll, hit = oracle_tokens(handle.model, tokenizer, prompt, target)
        assert score.token_nll.shape == nll.shape, (prompt, target)
        np.testing.assert_allclose(score.token_nll, nll, rtol=0, atol=NLL_TOLERANCE[dtype], err_msg=f"{prompt!r} {target!r}")
        np.testing.assert_array_equal(score.token_hit, hit, err_msg=f"{prompt!r} {target!r}")
        assert score.mean_nll == pytest.approx(nll.mean(), abs=NLL_TOLERANCE[dtype]) and score.accuracy == hit.mean()
        hits += list(hit)
    assert 0 < np.mean(hits) < 1  # some top-1 hits and some misses: the hit comparison is not vacuous


# ---------------------------------------------------------------- 2. the metrics on hand-worked numbers


def test_rewrite_scores_on_hand_worked_numbers():
    """ES/PS/NS and EM/PM/NM of given (P(new), P(true)) pairs, worked out by hand (dyadic numbers: exact in floats).

    rewrite (0.75, 0.25): new ahead -> ES 1; EM 0.75 - 0.25 = 0.5.
    paraphrases (0.5, 0.25) ahead, (0.125, 0.375) behind, (0.375, 0.375) a tie (not a success), (0.75, 0.5) ahead
      -> PS 2/4 = 0.5; PM (0.25 - 0.25 + 0 + 0.25) / 4 = 0.0625.
    neighbours (0.25, 0.5) true ahead, (0.5, 0.125) new ahead, (0.0625, 0.5625) true ahead
      -> NS 2/3 (true ahead counts: the sign flip); NM ((0.5-0.25) + (0.125-0.5) + (0.5625-0.0625)) / 3
         = (0.25 - 0.375 + 0.5) / 3 = 0.125.
    """
    out = rewrite_scores(
        [(0.75, 0.25)],
        [(0.5, 0.25), (0.125, 0.375), (0.375, 0.375), (0.75, 0.5)],
        [(0.25, 0.5), (0.5, 0.125), (0.0625, 0.5625)],
    )
    assert out == {"ES": 1.0, "EM": 0.5, "PS": 0.5, "PM": 0.0625, "NS": 2 / 3, "NM": 0.125}
    # Ties fail both ways; a group without prompts has no score.
    assert rewrite_scores([(0.5, 0.5)], [], [(0.5, 0.5)]) == {"ES": 0.0, "EM": 0.0, "PS": None, "PM": None, "NS": 0.0, "NM": 0.0}


def test_summary_averages_cases_then_takes_the_harmonic_mean():
    """Per-case scores are averaged over cases (in percent), and S is the harmonic mean of those averages.

    ES (1, 0.5) -> 75; PS (0.5, 0.5) -> 50; NS (1, 0.5) -> 75; S = 3 / (1/0.75 + 1/0.5 + 1/0.75) = 3 / (14/3)
    = 9/14 = 64.2857...% (averaging per-case harmonic means instead would give (0.75 + 0.5) / 2 = 62.5%).
    EM (0.5, -0.25) -> 12.5; PM (0.25, 0.25) -> 25; NM (0.125, 0.125) -> 12.5.
    zsRE efficacy (0.5, 0.25) -> 50% and 25%: mean 37.5; stdev (ddof 1) 17.678 / sqrt(2) = 12.5; x 1.96 = 24.5.
    A case whose value is None (no neighbour prompt) is left out of that metric's mean.
    """
    cases = [
        {"after": {"ES": 1.0, "PS": 0.5, "NS": 1.0, "EM": 0.5, "PM": 0.25, "NM": 0.125, "fluency": None}},
        {"after": {"ES": 0.5, "PS": 0.5, "NS": 0.5, "EM": -0.25, "PM": 0.25, "NM": 0.125, "fluency": None}},
    ]
    summary = ev.summarise(cases, "after", "counterfact")
    assert summary["S"]["mean"] == pytest.approx(64.28571428571429, abs=1e-12)
    assert (summary["ES"]["mean"], summary["PS"]["mean"], summary["NS"]["mean"]) == (75.0, 50.0, 75.0)
    assert (summary["EM"]["mean"], summary["PM"]["mean"], summary["NM"]["mean"]) == (12.5, 25.0, 12.5)
    assert summary["fluency"] == {"mean": None, "ci95": None}
    zsre = ev.summarise([{"after": {"efficacy": 0.5, "paraphrase": 1.0, "specificity": 0.0}},
                         {"after": {"efficacy": 0.25, "paraphrase": 1.0, "specificity": None}}], "after", "zsre")
    assert zsre["efficacy"]["mean"] == 37.5 and zsre["efficacy"]["ci95"] == pytest.approx(24.5, abs=1e-12)
    assert zsre["paraphrase"] == {"mean": 100.0, "ci95": 0.0} and zsre["specificity"] == {"mean": 0.0, "ci95": 0.0}


# ---------------------------------------------------------------- 3. per-case metrics against the oracle


# The "true" object is Berlin, not Paris: on these random models it puts each group's prompts on both sides.
COUNTERFACT_RECORD = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                          "target_new": {"str": "Rome"}, "target_true": {"str": "Berlin"}},
    "paraphrase_prompts": ["The Eiffel Tower is in", "Where is the Eiffel Tower? It is in", "The Eiffel Tower, a landmark of",
                           "Tourists visit the Eiffel Tower in", "Eiffel"],
    "neighborhood_prompts": ["The Louvre is located in the city of", "The Colosseum is in", "Big Ben is located in",
                             "The Brandenburg Gate is located in the city of", "Notre-Dame is in"],
    "generation_prompts": [],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_counterfact_metrics_equal_the_oracle(tiny_models, family, monkeypatch):
    """``counterfact_metrics`` of a case equals the paper's ES..NM computed from plain-pass probabilities.

    The shares must match exactly, the magnitudes and P(new)/P(true) to 1e-9 (float64 model); the case is
    chosen so each group has prompts on both sides, so a missing sign flip or a swapped group shows.
    """
    handle = tiny_models(family)
    monkeypatch.setattr(scoring, "ROWS_PER_PASS", 3)
    case = ev.parse_case(COUNTERFACT_RECORD, "counterfact", 0)
    got = ev.counterfact_metrics(handle, case, generation=False, seed=0)
    rewrite = COUNTERFACT_RECORD["requested_rewrite"]
    want = oracle_counterfact(handle.model, handle.tokenizer, "The Eiffel Tower is located in the city of",
                              COUNTERFACT_RECORD["paraphrase_prompts"], COUNTERFACT_RECORD["neighborhood_prompts"],
                              " " + rewrite["target_new"]["str"], " " + rewrite["target_true"]["str"])
    assert 0 < want["PS"] < 1 and 0 < want["NS"] < 1  # both outcomes occur: the comparison can tell a sign apart
    assert {k: got[k] for k in ("ES", "PS", "NS")} == {k: want[k] for k in ("ES", "PS", "NS")}
    for key in ("EM", "PM", "NM", "target_new_prob", "target_true_prob"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["fluency"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_zsre_metrics_equal_the_oracle(tiny_models, family, monkeypatch):
    """``zsre_metrics`` equals the teacher-forced top-1 accuracies of plain passes, for each of the three metrics.

    efficacy: tokens of " " + alt after src; paraphrase: the same target after each rephrase (mean over rephrases);
    specificity: tokens of " " + loc_ans after loc (the neighbourhood question's own answer, not target_new).
    Targets are built to be partly predicted, so the three values are different and not all 0.
    """
    handle = tiny_models(family)
    monkeypatch.setattr(scoring, "ROWS_PER_PASS", 3)
    record = zsre_records(handle.model, handle.tokenizer, 1)[0]
    want = oracle_zsre(handle.model, handle.tokenizer, record, "alt")
    assert (want["efficacy"], want["specificity"]) == (1 / 2, 1 / 3)  # what the targets were built to give
    assert 0 < want["paraphrase"] < 1 and len(set(want.values())) == 3  # a swapped or shifted slice shows
    case = ev.parse_case(record, "zsre", 0, "alt")
    got = ev.zsre_metrics(handle, case)
    assert got == pytest.approx(want, abs=1e-12)
    # ROME's convention (the default): towards answers[0], the neighbour asked with a question mark
    case = ev.parse_case(record, "zsre", 0)
    assert (case.request.target_new, case.request.target_true) == (" " + record["answers"][0], None)
    assert case.neighborhood == (record["loc"] + "?",)
    assert ev.zsre_metrics(handle, case) == pytest.approx(oracle_zsre(handle.model, handle.tokenizer, record), abs=1e-12)


# ---------------------------------------------------------------- 4. the evaluate command on a zsRE file


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """The tiny llama (BOS-prefixing tokenizer) saved to a folder."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


def _run(*args):
    return run_cli(*args, one_thread=True)


def _oracle_folder_model(folder):
    """The saved tiny model read back with plain transformers calls (no explorer code), as the oracle's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_evaluate_command_on_zsre_matches_the_oracle(llama_folder, tmp_path):
    """``python -m explorer evaluate ZSRE.json --method none``: JSON keys, per-case values and summaries.

    Per case, before == after == the oracle's accuracies (the float32 model read back from the folder by plain
    transformers calls); each summary is 100 x the mean over cases with a 1.96 * stdev / sqrt(n) half-width.
    The records were built for efficacy (1/2, 1/3, 1/4) and specificity (1/3, 1/2, 1): means 13/36 and 11/18.
    """
    model, tokenizer = _oracle_folder_model(llama_folder)
    records = zsre_records(model, tokenizer, 3)
    data_file = tmp_path / "zsre.json"
    data_file.write_text(json.dumps(records), encoding="utf-8")
    want = [oracle_zsre(model, tokenizer, record, "alt") for record in records]

    out = _run("evaluate", str(data_file), "--model", str(llama_folder), "--method", "none", "--zsre-target", "alt",
               "--json", str(tmp_path / "none.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "none.json").read_text(encoding="utf-8"))
    assert set(data) == {"method", "settings", "zsre_target", "strengthened", "cases", "format", "metrics", "unedited", "per_case"}
    assert (data["method"], data["cases"], data["format"], data["zsre_target"]) == ("none", 3, "zsre", "alt")
    assert set(data["metrics"]) == set(data["unedited"]) == {"efficacy", "paraphrase", "specificity"}
    assert data["metrics"] == data["unedited"]
    for entry, expected, record in zip(data["per_case"], want, records, strict=True):
        assert (entry["subject"], entry["target_new"]) == (record["subject"], " " + record["alt"])
        assert entry["before"] == entry["after"] == pytest.approx(expected, abs=1e-12)
    for name in ("efficacy", "paraphrase", "specificity"):
        values = [100 * case[name] for case in want]
        half = 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values))
        assert data["unedited"][name] == pytest.approx({"mean": float(np.mean(values)), "ci95": half}, abs=1e-9), name
    assert data["unedited"]["efficacy"]["mean"] == pytest.approx(100 * 13 / 36)
    assert data["unedited"]["specificity"]["mean"] == pytest.approx(100 * 11 / 18)
    assert data["unedited"]["efficacy"]["ci95"] > 0


def test_rome_evaluation_on_zsre_runs_in_range(tiny_models):
    """``evaluate`` with ROME (2 steps, identity statistics) on the zsRE records: the unedited summary is the
    oracle's, every edited accuracy lies in [0, 100], each case reports its edit, and the weights come back.

    (Run in-process rather than through the command line: a second subprocess would double the test's time; the
    command line's zsRE path is the one above.)
    """
    from explorer.editing import EditOptions
    from explorer.editing.statistics import StatsSpec

    handle = tiny_models("gpt2", torch.float32)
    records = zsre_records(handle.model, handle.tokenizer, 2)
    cases = [ev.parse_case(record, "zsre", i, "alt") for i, record in enumerate(records)]
    weights = [p.detach().clone() for p in handle.model.parameters()]
    options = EditOptions(layer=1, steps=2, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))
    result = ev.evaluate(handle, cases, "zsre", ev.EvaluationSettings(method="rome", generation=False, edit=options))
    assert all(torch.equal(a, b) for a, b in zip(weights, handle.model.parameters()))
    want = [oracle_zsre(handle.model, handle.tokenizer, record, "alt") for record in records]
    for entry, expected in zip(result["per_case"], want, strict=True):
        assert entry["before"] == pytest.approx(expected, abs=1e-12) and entry["edit"]["layer"] == 1
        assert all(0 <= value <= 1 for value in entry["after"].values())
    assert result["unedited"]["efficacy"]["mean"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert all(0 <= value["mean"] <= 100 and value["ci95"] >= 0 for value in result["metrics"].values())


# ---------------------------------------------------------------- decoded success and the paper's GE


def oracle_greedy(model, tokenizer, prompt: str, tokens: int) -> str:
    """The greedy continuation, one unpadded forward pass per new token (no cache, no batching)."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    start = len(ids)
    with torch.no_grad():
        for _ in range(tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def oracle_begins_with(continuation: str, target: str) -> bool:
    """The continuation's first word (leading spaces aside) is the target: what the model *says* first."""
    return re.match(r"\s*" + re.escape(target.strip()) + r"(?![\w])", continuation) is not None


def first_word(text: str) -> str | None:
    """The continuation's first whitespace-delimited piece (tiny random models say bytes, not words)."""
    found = re.match(r"\s*([^\s\x00-\x1f]+)", text)
    return " " + found.group(1) if found else None


@pytest.mark.parametrize("family", FAMILIES)
def test_decoded_success_equals_greedy_decoding_one_prompt_at_a_time(tiny_models, family):
    """decoded_efficacy / _paraphrase / _neighborhood: shares of plain greedy continuations beginning with the
    new target (edit prompt, paraphrases) or the true one (neighbours). The targets are words the model does say
    after some prompts, so hits and misses both occur."""
    handle = tiny_models(family)
    model, tokenizer = handle.model, handle.tokenizer
    rewrite = "The Eiffel Tower is located in the city of"
    paraphrases, neighbours = COUNTERFACT_RECORD["paraphrase_prompts"], COUNTERFACT_RECORD["neighborhood_prompts"]
    said = {p: oracle_greedy(model, tokenizer, p, 8) for p in [rewrite, *paraphrases, *neighbours]}
    new = next(w for w in map(first_word, (said[p] for p in paraphrases)) if w)
    true = next(w for w in map(first_word, (said[p] for p in neighbours)) if w)
    record = json.loads(json.dumps(COUNTERFACT_RECORD))
    record["requested_rewrite"]["target_new"]["str"], record["requested_rewrite"]["target_true"]["str"] = new.strip(), true.strip()
    case = ev.parse_case(record, "counterfact", 0)
    got = ev.decoded_metrics(handle, case)
    want = {"decoded_efficacy": float(oracle_begins_with(said[rewrite], new)),
            "decoded_paraphrase": float(np.mean([oracle_begins_with(said[p], new) for p in paraphrases])),
            "decoded_neighborhood": float(np.mean([oracle_begins_with(said[p], true) for p in neighbours]))}
    assert want["decoded_paraphrase"] > 0 and want["decoded_neighborhood"] > 0
    assert got == pytest.approx(want)


def test_generation_entropy_on_hand_worked_texts():
    """ROME's n-gram entropy: NLTK word tokens, bigram and trigram entropies in bits, weighted 2/3 and 4/3, averaged."""
    # "a b a b": bigrams (a b) ×2, (b a) ×1; trigrams (a b a), (b a b)
    bigrams = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert rome_ngram_entropy("a b a b") == pytest.approx((2 / 3 * bigrams + 4 / 3 * 1.0) / 2)
    # punctuation is a token of its own, and case is kept: 5 distinct tokens, all n-grams distinct
    assert rome_ngram_entropy("The cat. the cat") == pytest.approx((2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)
    assert rome_ngram_entropy("word") == 0.0
