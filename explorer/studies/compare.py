"""Before and after an edit: target probabilities on the edit prompt, its paraphrases and neighbours,
and completions from the original and the edited model side by side."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..core.errors import InputError
from ..core.generation import GREEDY, Sampling, complete
from ..core.models import LoadedModel
from ..core.prompts import clean_text
from ..core.scoring import target_ids, target_probabilities, top_prediction
from ..editing.edits import Edit, EditRequest, EditSession
from .metrics import begins_with, ngram_entropy, rewrite_scores

GENERATION_TOKENS = 30
DECODED_TOKENS = 8  # greedy tokens after each prompt for decoded success (more when a target is longer)
DECODED_METRICS = ("decoded_efficacy", "decoded_paraphrase", "decoded_neighborhood")
# A drop of generation entropy this large (bits) after an edit means the text started to repeat itself.
ENTROPY_COLLAPSE_BITS = 1.0


@dataclass(frozen=True)
class Probes:
    """What to look at around an edit."""

    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    generate: tuple[str, ...] = ()
    new_tokens: int = GENERATION_TOKENS
    sampling: Sampling = GREEDY


def with_true_target(handle: LoadedModel, request: EditRequest, session: EditSession | None = None) -> EditRequest:
    """``request`` with target_true filled in from the model's own top-1 next token when it is missing."""
    if request.target_true is not None:
        return request
    if session is None:
        token = top_prediction(handle, request.filled)
    else:
        with session.applied():
            token = top_prediction(handle, request.filled)
    answer = handle.tokenizer.decode([token])
    try:
        clean_text(answer, "the model's answer")
    except InputError as error:  # the user typed no target: say whose text it is, and what to do
        raise InputError(f"the true target was left empty, so the model's own answer {answer!r} would stand in for "
                         f"it, but it cannot be a target ({error}); type the true target") from None
    return replace(request, target_true=answer)


def probabilities(handle: LoadedModel, request: EditRequest, probes: Probes) -> dict:
    """P(target_new) and P(target_true) on the edit prompt, paraphrases and neighbours, on the model as it is now
    (call inside a session's ``applied``)."""
    def probs(prompts: Sequence[str]) -> dict:
        if not prompts:
            return {"target_new_prob": [], "target_true_prob": []}
        return {
            "target_new_prob": target_probabilities(handle, prompts, request.target_new).tolist(),
            "target_true_prob": target_probabilities(handle, prompts, request.target_true).tolist(),
        }

    edit_prompt = probs([request.filled])
    return {
        "target_new_prob": edit_prompt["target_new_prob"][0],
        "target_true_prob": edit_prompt["target_true_prob"][0],
        "paraphrases": probs(probes.paraphrases),
        "neighborhood": probs(probes.neighborhood),
    }


def completions(handle: LoadedModel, request: EditRequest, probes: Probes) -> dict:
    """The model's completions of the generation prompts and its decoded success, as it is now."""
    texts = complete(handle, probes.generate, probes.new_tokens, probes.sampling) if probes.generate else []
    return {"generations": [{"prompt": p, "text": t} for p, t in zip(probes.generate, texts)],
            "decoded": decoded_success(handle, request, probes.paraphrases, probes.neighborhood)}


def snapshot(handle: LoadedModel, request: EditRequest, probes: Probes) -> dict:
    """Probabilities and generations of the model as it is now (call inside a session's ``applied``)."""
    return {**probabilities(handle, request, probes), **completions(handle, request, probes)}


def decoded_success(handle: LoadedModel, request: EditRequest, paraphrases: Sequence[str], neighborhood: Sequence[str]) -> dict:
    """What the model *says*: shares of greedy continuations that begin with target_new (edit prompt,
    paraphrases) or with target_true (neighbours); None where a group has no prompts (or no true target).

    Teacher-forced scores ask whether P(new) > P(true); a model can prefer the new target and still say
    something else first ("the", a date), so both are reported side by side.
    """
    targets = [request.target_new] + ([request.target_true] if request.target_true else [])
    tokens = max([DECODED_TOKENS] + [len(target_ids(handle, target)) + 1 for target in targets])
    groups = {"decoded_efficacy": ([request.filled], request.target_new),
              "decoded_paraphrase": (list(paraphrases), request.target_new),
              "decoded_neighborhood": (list(neighborhood) if request.target_true else [], request.target_true)}
    prompts = [prompt for group, _target in groups.values() for prompt in group]
    texts = iter(complete(handle, prompts, tokens)) if prompts else iter(())
    shares: dict[str, float | None] = {}
    for name, (group, target) in groups.items():
        hits = [begins_with(next(texts), target) for _ in group]
        shares[name] = float(np.mean(hits)) if hits else None
    return shares


def before_and_after(session: EditSession, edit: Edit, measure) -> tuple[dict, dict]:
    """``measure(handle, request)`` on the session's model without ``edit`` (its other edits only), then with it."""
    with session.applied():
        before = measure(session.handle, edit.request)
    with session.with_edit(edit).applied():
        after = measure(session.handle, edit.request)
    return before, after


def comparison(edit: Edit, before: dict, after: dict) -> dict:
    """The comparison of two sides (probabilities, with or without completions): scores and warnings."""
    def scores(side: dict) -> dict:
        return {**edit_scores(side), **side.get("decoded", {})}

    return {"before": before, "after": after, "metrics": {"before": scores(before), "after": scores(after)},
            "warnings": edit.warnings() + entropy_warnings(before, after)}


def compare(session: EditSession, edit: Edit, probes: Probes) -> dict:
    """``before`` (the session's other edits only) and ``after`` (with ``edit`` too), plus warnings."""
    return comparison(edit, *before_and_after(session, edit, lambda handle, request: snapshot(handle, request, probes)))


def edit_scores(side: dict) -> dict:
    """The paper's scores (ES, PS, NS and magnitudes) of one side of a comparison."""
    def pairs(group: dict) -> list[tuple[float, float]]:
        return list(zip(group["target_new_prob"], group["target_true_prob"]))

    rewrite = [(side["target_new_prob"], side["target_true_prob"])]
    return rewrite_scores(rewrite, pairs(side["paraphrases"]), pairs(side["neighborhood"]))


def entropy_warnings(before: dict, after: dict) -> list[str]:
    """A warning when the edited model's generations lost much of their n-gram entropy."""
    texts_before = [g["text"] for g in before.get("generations", []) if g["text"].strip()]
    texts_after = [g["text"] for g in after.get("generations", []) if g["text"].strip()]
    if not texts_before or not texts_after:
        return []
    drop = float(np.mean([ngram_entropy(t) for t in texts_before]) - np.mean([ngram_entropy(t) for t in texts_after]))
    if drop > ENTROPY_COLLAPSE_BITS:
        return [f"generation entropy fell by {drop:.2f} bits after the edit: the edited model repeats itself"]
    return []
