"""The paper's evaluation: CounterFact (ES, PS, NS, EM, PM, NM, S, fluency) and zsRE accuracies.

Data sets are read from three formats, detected from their records: CounterFact in ROME's format,
CounterFact in EasyEdit/MEND's format, and zsRE in ROME's format. Every case is edited from the
unedited model (the edit is applied only while that case is scored, then the weights are restored
exactly); the unedited model's numbers are computed once per case and data set, not per method.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..core.assets import ASSETS
from ..core.errors import InputError
from ..core.generation import Sampling, continuation_ids
from ..core.models import LoadedModel
from ..core.progress import Progress, no_progress, part_of
from ..core.prompts import read_json_input
from ..core.scoring import score_targets
from ..editing import EditOptions, edit_fact, make_request, plan_edit
from ..editing.edits import EditRequest, EditSession
from .compare import DECODED_METRICS, decoded_success
from .metrics import harmonic_mean, mean_ci95, ngram_entropy, rewrite_scores, rome_generation_text, rome_ngram_entropy

# Bundled data sets (assets/README.md has their sources and licences).
REAL_COUNTERFACT = ASSETS / "counterfact_real_2000.json"  # real CounterFact records, unfiltered: the headline's data
REAL_ZSRE = ASSETS / "zsre_train_1k.json"
HANDWRITTEN_CASES = ASSETS / "handwritten_counterfact_cases.json"  # written in CounterFact's format, known to the default model: the app's examples

FORMATS = {
    "counterfact": "CounterFact in ROME's format (requested_rewrite, paraphrase_prompts, neighborhood_prompts, ...)",
    "counterfact-easyedit": "CounterFact in EasyEdit/MEND's format (prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, ...)",
    "zsre": "zsRE in ROME's format (subject, src, pred, rephrase, alt, answers, loc, loc_ans)",
}
COUNTERFACT_METRICS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "fluency", "GE", *DECODED_METRICS)
ZSRE_METRICS = ("efficacy", "paraphrase", "specificity")
# zsRE conventions: ROME's code edits towards answers[0] and asks the neighbour as loc + "?"; EasyEdit's
# towards alt, asking loc as written.
ZSRE_TARGETS = ("answers", "alt")
FLUENCY_TOKENS = 100  # fluency: entropy of 100-token samples (top-k 5), as in the paper
GE_TOTAL_TOKENS = 100  # GE: ROME's generate_fast(max_out_len=100) counts the prompt's tokens in the 100
GENERATION_TOP_K = 5
BOOTSTRAP_SAMPLES = 1000
PERCENT_METRICS_SCALE = {"fluency": 1.0}  # bits, as measured; every other metric in percent (GE: the paper's ×100)


@dataclass(frozen=True)
class Case:
    """One evaluation case: the edit request and the prompts that probe it."""

    case_id: str
    request: EditRequest
    paraphrases: tuple[str, ...]
    neighborhood: tuple[str, ...]
    generation: tuple[str, ...] = ()
    neighborhood_answer: str | None = None  # zsRE: the neighbourhood question's own answer


def _json_type(value: object) -> str:
    """What a decoded JSON value is, in JSON's words (for messages about a record's fields)."""
    names = {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "text", list: "a list",
             dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _space(text: object, field: str) -> str:
    """CounterFact stores objects without their leading space; the model reads them after one."""
    if not isinstance(text, str):
        raise InputError(f"{field} must be text, not {_json_type(text)}")
    return text if text.startswith(" ") else " " + text


def detect_format(record: object) -> str:
    """The format name of one record, or :class:`InputError` naming the formats this reads."""
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if {"prompt", "subject", "target_new", "ground_truth"} <= record.keys():
            return "counterfact-easyedit"
        if {"src", "subject", "alt", "loc", "loc_ans"} <= record.keys():
            return "zsre"
    expected = "; ".join(FORMATS.values())
    raise InputError(f"unrecognised data set record; expected one of: {expected}")


def _as_list(value: object, field: str) -> tuple[str, ...]:
    """A field that holds one prompt or a list of them, as a tuple (none for a missing field)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise InputError(f"{field} must be text or a list of texts, not {_json_type(value)}")
    for item in value:
        if not isinstance(item, str):
            raise InputError(f"{field} must be text or a list of texts; it holds {_json_type(item)}")
    return tuple(value)


def _short_name(kind: str) -> str:
    return FORMATS[kind].split(" (")[0]


def rewrite_metric_names(kind: str) -> tuple[str, str, str]:
    """The names :func:`summarise` gives data set format ``kind``'s efficacy, paraphrase and neighbourhood scores."""
    if kind not in FORMATS:
        raise InputError(f"unknown data set format {kind!r}; the formats are {', '.join(FORMATS)}")
    return ZSRE_METRICS if kind == "zsre" else ("ES", "PS", "NS")


def parse_case(record: dict, kind: str, index: int, zsre_target: str = ZSRE_TARGETS[0]) -> Case:
    """A :class:`Case` from one record of format ``kind`` (zsRE read in the ``zsre_target`` convention).

    A record this cannot score is an :class:`InputError` naming it (its position in the file, and its
    case_id where it has one) and what is wrong with it, before any model is loaded.
    """
    if not isinstance(record, dict):
        raise InputError(f"record {index} is {_json_type(record)}, not an object of {_short_name(kind)}; check the file")
    name = f"record {index}" + (f" (case_id {record['case_id']})" if isinstance(record.get("case_id"), (int, str)) else "")
    try:
        own = detect_format(record)
    except InputError:
        own = kind  # a record of no known format: the fields it lacks are named below
    if own != kind:
        raise InputError(f"{name} is {_short_name(own)}, but the data set's first record is {_short_name(kind)}; "
                         "a data set holds records of one format")
    try:
        if kind in ("counterfact", "counterfact-easyedit"):
            return _counterfact_case(record, kind, index)
        return _zsre_case(record, index, zsre_target)
    except KeyError as error:
        raise InputError(f"{name} ({_short_name(kind)}) lacks field {error}; check the file") from None
    except (TypeError, IndexError) as error:
        raise InputError(f"{name} ({_short_name(kind)}) has a field of the wrong type ({error}); check the file") from None
    except InputError as error:
        raise InputError(f"{name}: {error}") from None


def _rome_object(rewrite: dict, name: str) -> str:
    """The text of one of ROME's objects, which its records write as ``{"str": "Paris", "id": "Q90"}``."""
    value = rewrite[name]
    if not isinstance(value, dict):
        raise InputError(f'requested_rewrite.{name} must be an object like {{"str": "Paris"}}, not {_json_type(value)}')
    return _space(value["str"], f"requested_rewrite.{name}.str")


def _counterfact_case(record: dict, kind: str, index: int) -> Case:
    if kind == "counterfact":
        rewrite = record["requested_rewrite"]
        true_field = "requested_rewrite.target_true.str"
        request = make_request(rewrite["prompt"], rewrite["subject"], _rome_object(rewrite, "target_new"), _rome_object(rewrite, "target_true"))
        paraphrases, neighborhood = ("paraphrase_prompts", "neighborhood_prompts")
    else:
        true_field = "ground_truth"
        request = make_request(record["prompt"], record["subject"], _space(record["target_new"], "target_new"),
                               _space(record["ground_truth"], true_field))
        paraphrases, neighborhood = ("rephrase_prompt", "locality_prompt")
    if request.target_true is None:
        # ES, PS and NS ask whether the new object is more likely than the true one: without it there is no score.
        raise InputError(f"{true_field} is empty; CounterFact's scores compare the new object with the true one")
    return Case(
        case_id=str(record.get("case_id", index)),
        request=request,
        paraphrases=_as_list(record.get(paraphrases), paraphrases),
        neighborhood=_as_list(record.get(neighborhood), neighborhood),
        generation=_as_list(record.get("generation_prompts"), "generation_prompts") if kind == "counterfact" else (),
    )


def _zsre_case(record: dict, index: int, zsre_target: str) -> Case:
    answers = _as_list(record.get("answers"), "answers")
    answer, answer_field = (answers[0], "answers") if answers else (record.get("pred"), "pred")
    if zsre_target == "answers":
        if not answer:
            raise KeyError("answers")
        request = make_request(record["src"], record["subject"], _space(answer, answer_field))
        neighbours = tuple(question + "?" for question in _as_list(record.get("loc"), "loc"))
    else:
        # Where the record's alternative is its answer (MEND's alt is the answer when the base model was
        # wrong), the edit has no distinct true object: zsRE's metrics do not read one.
        alt = _space(record["alt"], "alt")
        distinct = answer and str(answer).strip() != alt.strip()
        request = make_request(record["src"], record["subject"], alt, _space(answer, answer_field) if distinct else None)
        neighbours = _as_list(record.get("loc"), "loc")
    return Case(
        case_id=str(record.get("case_id", index)),
        request=request,
        paraphrases=_as_list(record.get("rephrase"), "rephrase"),
        neighborhood=neighbours,
        neighborhood_answer=_space(record["loc_ans"], "loc_ans"),
    )


def read_dataset(path: str | Path, limit: int | None = None, zsre_target: str = ZSRE_TARGETS[0]) -> tuple[str, list[Case]]:
    """The format name and the cases of a data set file (the first ``limit`` cases; zsRE in ``zsre_target``'s convention)."""
    if zsre_target not in ZSRE_TARGETS:
        raise InputError(f"unknown zsRE convention {zsre_target!r}: use one of {', '.join(ZSRE_TARGETS)}")
    path = Path(path)
    records = read_json_input(path, f"data set {path}", "a data set in one of the known formats")
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty JSON list of records")
    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    kind = detect_format(records[0])
    records = records[:limit] if limit else records
    # Under EasyEdit's convention a zsRE record without an alternative answer has nothing to edit towards
    # (2 of the bundled 1,000): it is left out, as EasyEdit's data loaders leave it out.
    usable = [(index, record) for index, record in enumerate(records)
              if not (kind == "zsre" and zsre_target == "alt" and isinstance(record, dict) and not str(record.get("alt", "x")).strip())]
    return kind, [parse_case(record, kind, index, zsre_target) for index, record in usable]


# ---------------------------------------------------------------- per-case metrics


def counterfact_metrics(handle: LoadedModel, case: Case, generation: bool, seed: int, decoded: bool = False) -> dict:
    """ES, EM, PS, PM, NS, NM (fluency and GE; decoded success) of the model as it is now, for one case."""
    request = case.request
    groups = {"rewrite": [request.filled], "paraphrase": list(case.paraphrases), "neighborhood": list(case.neighborhood)}
    pairs = [(p, t) for prompts in groups.values() for p in prompts for t in (request.target_new, request.target_true)]
    scores = iter(score_targets(handle, pairs))
    probs: dict[str, list[tuple[float, float]]] = {}
    for name, prompts in groups.items():
        probs[name] = [(np.exp(-next(scores).mean_nll), np.exp(-next(scores).mean_nll)) for _ in prompts]
    out: dict[str, float | None] = rewrite_scores(probs["rewrite"], probs["paraphrase"], probs["neighborhood"])
    out.update(generation_metrics(handle, case, seed) if generation else {"fluency": None, "GE": None})
    out.update(decoded_metrics(handle, case) if decoded else dict.fromkeys(DECODED_METRICS))
    out["target_new_prob"], out["target_true_prob"] = (float(v) for v in probs["rewrite"][0])
    return out


def generation_prompts(case: Case) -> tuple[str, ...]:
    """The prompts fluency and GE sample from: the record's generation prompts (CounterFact in ROME's
    format has ten), else its own prompts (edit prompt, paraphrases, neighbours) where it has none."""
    return case.generation or (case.request.filled, *case.paraphrases, *case.neighborhood)


def generation_metrics(handle: LoadedModel, case: Case, seed: int) -> dict:
    """``fluency`` (this project's: bits over the 100-token continuation, lowercased words) and ``GE`` (the
    paper's: ROME's entropy of prompt and continuation, 100 tokens in all), from the same samples."""
    prompts = generation_prompts(case)
    # The paper's protocol samples from the whole vocabulary (top-k 5); stored results were measured that way.
    samples = continuation_ids(handle, prompts, FLUENCY_TOKENS, Sampling(top_k=GENERATION_TOP_K, seed=seed), markup=True)
    decode = handle.tokenizer.decode
    fluency = [ngram_entropy(decode(tail, skip_special_tokens=True)) for _row, tail in samples]
    ge = [rome_ngram_entropy(rome_generation_text(decode(row + tail[: max(0, GE_TOTAL_TOKENS - len(row))], skip_special_tokens=True)))
          for row, tail in samples]
    return {"fluency": float(np.mean(fluency)), "GE": float(np.mean(ge))}


def decoded_metrics(handle: LoadedModel, case: Case) -> dict:
    """Decoded success on the case's edit prompt, paraphrases and neighbours (:func:`compare.decoded_success`)."""
    return decoded_success(handle, case.request, case.paraphrases, case.neighborhood)


def zsre_metrics(handle: LoadedModel, case: Case) -> dict:
    """Per-token top-1 accuracy of target_new on the prompt and its rephrase, and of the neighbour's answer."""
    request = case.request
    pairs = [(request.filled, request.target_new)] + [(p, request.target_new) for p in case.paraphrases]
    pairs += [(p, case.neighborhood_answer) for p in case.neighborhood]
    scores = score_targets(handle, pairs)
    rephrase = scores[1 : 1 + len(case.paraphrases)]
    neighbours = scores[1 + len(case.paraphrases) :]
    return {
        "efficacy": scores[0].accuracy,
        "paraphrase": float(np.mean([s.accuracy for s in rephrase])) if rephrase else None,
        "specificity": float(np.mean([s.accuracy for s in neighbours])) if neighbours else None,
    }


def case_metrics(handle: LoadedModel, case: Case, kind: str, generation: bool, seed: int, decoded: bool = False) -> dict:
    """The metrics of ``kind``'s data set for one case, on the model as it is now."""
    if kind == "zsre":
        return zsre_metrics(handle, case)
    return counterfact_metrics(handle, case, generation, seed, decoded)


# ---------------------------------------------------------------- summaries


def summarise(per_case: Sequence[dict], side: str, kind: str) -> dict[str, dict[str, float | None]]:
    """Mean and 95% CI per metric over cases (scores and magnitudes in percent), S bootstrapped."""
    names = ZSRE_METRICS if kind == "zsre" else COUNTERFACT_METRICS
    out = {}
    for name in names:
        if name == "S":
            continue
        values = [case[side][name] for case in per_case if case[side].get(name) is not None]
        scale = PERCENT_METRICS_SCALE.get(name, 100.0)
        out[name] = mean_ci95([scale * v for v in values])
    if kind != "zsre":
        out = {"S": _score_s(per_case, side), **out}
    return out


def _score_s(per_case: Sequence[dict], side: str) -> dict[str, float | None]:
    table = [[case[side][n] for n in ("ES", "PS", "NS")] for case in per_case]
    table = np.array([row for row in table if None not in row], dtype=float)
    if not len(table):
        return {"mean": None, "ci95": None}
    point = 100 * harmonic_mean(list(table.mean(axis=0)))
    rng = np.random.default_rng(0)
    draws = [harmonic_mean(list(table[rng.integers(0, len(table), len(table))].mean(axis=0))) for _ in range(BOOTSTRAP_SAMPLES)]
    low, high = np.percentile(100 * np.array(draws), [2.5, 97.5])
    return {"mean": float(point), "ci95": float((high - low) / 2)}


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation run does; part of the resume file's header."""

    method: str = "rome"  # or rome-original, ft, none
    generation: bool = True
    edit: EditOptions = EditOptions()
    decoded: bool = True  # decoded success beside the teacher-forced scores
    zsre_target: str = ZSRE_TARGETS[0]

    def header(self, dataset_digest: str, model: str) -> dict:
        """What must match for a run to resume from a per-case file."""
        return {"dataset": dataset_digest, "model": model, "method": self.method, "generation": self.generation,
                "decoded": self.decoded, "zsre_target": self.zsre_target,
                "edit": json.loads(json.dumps(asdict(self.edit), default=str))}


def dataset_digest(cases: Sequence[Case]) -> str:
    """A short hash of the cases' content."""
    return hashlib.sha256(json.dumps([asdict(c) for c in cases], sort_keys=True).encode()).hexdigest()[:16]


def _read_partial(path: Path | None, header: dict) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        first = json.loads(lines[0]) if lines else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # unreadable: start afresh (the file is rewritten)
    if first != header:
        return {}  # another run's file: start afresh
    done = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by the interruption
        if not isinstance(entry, dict) or "case_id" not in entry:
            break  # not a case this program wrote: keep what came before it
        done[entry["case_id"]] = entry
    return done


def evaluate(
    handle: LoadedModel,
    cases: Sequence[Case],
    kind: str,
    settings: EvaluationSettings = EvaluationSettings(),
    partial: Path | None = None,
    progress: Progress = no_progress,
) -> dict:
    """Edit every case from the unedited model, score before and after; the ``evaluate`` JSON."""
    from ..core.models import model_fingerprint

    header = settings.header(dataset_digest(cases), model_fingerprint(handle))
    done = _read_partial(partial, header)
    if partial is not None:
        with partial.open("w", encoding="utf-8") as out:
            out.write(json.dumps(header) + "\n")
            for entry in done.values():
                out.write(json.dumps(entry) + "\n")
    per_case = []
    generation = settings.generation and kind != "zsre"
    # One plan for every case: the settings, the layer, the prefixes and C are the same for all of them.
    plan = None if settings.method == "none" else plan_edit(handle, replace(settings.edit, method=settings.method))
    for index, case in enumerate(cases):
        if case.case_id in done:
            per_case.append(done[case.case_id])
            continue
        progress(index / len(cases), f"case {index + 1}/{len(cases)}: {case.request.subject}")
        session = EditSession(handle)
        with session.applied():  # no edits: the unedited model, under the lock
            before = case_metrics(handle, case, kind, generation, seed=index, decoded=settings.decoded)
        entry = {"case_id": case.case_id, "subject": case.request.subject, "target_new": case.request.target_new,
                 "target_true": case.request.target_true, "before": before}
        if settings.method == "none":
            entry["after"] = before
        else:
            inner = part_of(progress, index / len(cases), (index + 0.8) / len(cases), f"case {index + 1}/{len(cases)}: ")
            edit = edit_fact(session, case.request, plan, progress=inner)
            session.add(edit)
            with session.applied():
                entry["after"] = case_metrics(handle, case, kind, generation, seed=index, decoded=settings.decoded)
            entry["edit"] = {"layer": edit.layer, "delta_norm": edit.delta_norm, "seconds": edit.seconds,
                             "warnings": edit.warnings(), "stats": edit.stats}
        per_case.append(entry)
        if partial is not None:
            with partial.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")
    progress(1.0, "done")
    edited = [entry["edit"]["stats"] for entry in per_case if "edit" in entry]
    return {
        "method": settings.method,
        "settings": settings.edit.settings,
        "zsre_target": settings.zsre_target if kind == "zsre" else None,
        "cases": len(per_case),
        "format": kind,
        # Edits whose δ was scaled up or optimised again so that they hold on their own prompt (project settings).
        "strengthened": sum(1 for stats in edited if stats.get("delta_scale", 1.0) > 1.0 or stats.get("clamp_tries", 1) > 1),
        "metrics": summarise(per_case, "after", kind),
        "unedited": summarise(per_case, "before", kind),
        "per_case": per_case,
    }


def format_table(result: dict) -> str:
    """The paper-style table: one row for the unedited model, one for the method."""
    names = list(result["metrics"])
    lines = ["method".ljust(14) + "".join(n.rjust(15) for n in names)]
    for label, metrics in (("unedited", result["unedited"]), (result["method"], result["metrics"])):
        cells = []
        for name in names:
            value = metrics[name]
            cells.append("-".rjust(15) if value["mean"] is None else f"{value['mean']:.1f} ± {value['ci95']:.1f}".rjust(15))
        lines.append(label.ljust(14) + "".join(cells))
    return "\n".join(lines)
