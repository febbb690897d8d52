"""How the model is doing after edits: facts it knew, fluency, how far the weights moved, and warnings.

The same measures serve the app's health line after each edit and the checkpoints of a sequential run
(:mod:`explorer.studies.sequential`):

* **probe facts**: a fixed set of facts from the bundled fact set that the *unedited* model completes
  correctly; the share it still completes correctly is what unrelated knowledge survived. A probe fact
  about a subject that an applied edit rewrites is not unrelated: it is left out of the count.
* **fluency**: the paper's n-gram entropy of greedy completions of fixed prompts (low: the model repeats
  itself).
* **relative change**: ‖W − W₀‖ / ‖W₀‖ over the edited layers' MLP output matrices together.

An edit is *disabling* (Gupta et al.'s term for edits that break the model) when the new target of an
edit becomes the answer to probe facts it has nothing to do with, or the completions lose much of their
entropy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.facts import Fact, load_facts
from ..core.generation import complete
from ..core.models import LoadedModel
from ..core.scoring import answer_starts_with, predicts, target_ids, top_predictions
from ..editing.edits import Edit, EditSession
from .compare import ENTROPY_COLLAPSE_BITS
from .metrics import ngram_entropy

PROBE_FACTS = 20  # facts the unedited model knows, checked after each edit
FLUENCY_PROMPTS = ("My favourite city is", "The history of science is", "Yesterday I went to the")
FLUENCY_TOKENS = 30
# Share of probe facts whose answer became an edit's new target: above this an edit leaks into unrelated facts.
LEAK_SHARE = 0.1


@dataclass(frozen=True)
class Health:
    """The measures of one state of the model (an edited one, or the model's own)."""

    probes_right: int
    probes_total: int
    fluency: float
    relative_change: float
    leaked: tuple[str, ...] = ()  # probe prompts now answered with an edit's new target
    warnings: tuple[str, ...] = field(default=())

    @property
    def probe_retained(self) -> float | None:
        """The share of probe facts still right (None without probe facts: a model that knows none of them)."""
        return self.probes_right / self.probes_total if self.probes_total else None

    def to_json(self) -> dict:
        return {"probe_retained": self.probe_retained, "probes_right": self.probes_right, "probes_total": self.probes_total,
                "fluency": self.fluency, "relative_norm": self.relative_change, "leaked": list(self.leaked),
                "warnings": list(self.warnings)}


def probe_facts(handle: LoadedModel, count: int = PROBE_FACTS, facts: Sequence[Fact] | None = None,
                excluded_subjects: Sequence[str] = ()) -> tuple[Fact, ...]:
    """The first ``count`` facts that the model's own weights complete correctly, among ``facts`` (default: the
    bundled fact set; then cached per model) about none of ``excluded_subjects``."""
    if facts is not None or excluded_subjects:
        pool = load_facts() if facts is None else facts
        return _known(handle, [fact for fact in pool if not _about(fact, excluded_subjects)], count)
    return handle.weights.derived(("probe_facts", count), lambda: _known(handle, load_facts(), count))


def _about(fact: Fact, subjects: Sequence[str]) -> bool:
    """Whether ``fact`` is about one of ``subjects`` (its subject, or one of them named in its prompt)."""
    return any(subject.strip().lower() == fact.subject.lower() or subject.strip().lower() in fact.prompt.lower()
               for subject in subjects if subject.strip())


def _known(handle: LoadedModel, facts: Sequence[Fact], count: int) -> tuple[Fact, ...]:
    known: list[Fact] = []
    with handle.weights.own():
        for fact in facts:
            if len(known) == count:
                break
            if predicts(handle, fact):
                known.append(fact)
    return tuple(known)


def fluency(handle: LoadedModel, prompts: Sequence[str] = FLUENCY_PROMPTS, tokens: int = FLUENCY_TOKENS) -> float:
    """Mean n-gram entropy of greedy completions of ``prompts`` on the model as it is now."""
    return float(np.mean([ngram_entropy(text) for text in complete(handle, list(prompts), tokens)]))


def relative_change(handle: LoadedModel, edits: Sequence[Edit]) -> float:
    """‖ΔW‖ / ‖W₀‖ over the MLP output matrices ``edits`` change, with all of them applied together."""
    layers = sorted({edit.layer for edit in edits})
    if not layers:
        return 0.0
    change = own = 0.0
    for layer in layers:
        total = sum(edit.update().double() for edit in edits if edit.layer == layer)
        change += float(torch.linalg.matrix_norm(total)) ** 2
        own += next(edit.weight_norm for edit in edits if edit.layer == layer) ** 2
    return (change / own) ** 0.5 if own else float("inf")


def baseline_fluency(handle: LoadedModel) -> float:
    """The fluency of the model's own weights (cached per model): what later measures are compared with."""
    return handle.weights.derived(("baseline_fluency",), lambda: fluency(handle))


def model_health(session: EditSession, probes: Sequence[Fact], baseline_fluency: float | None = None) -> Health:
    """The health of the session's model with its applied edits (call inside or outside ``applied()``)."""
    handle = session.handle
    edits = session.applied_edits()
    probes = [fact for fact in probes if not _about(fact, [edit.request.subject for edit in edits])]
    new_first_tokens = {target_ids(handle, edit.request.target_new)[0] for edit in edits}
    with session.applied():
        tops = top_predictions(handle, [fact.prompt for fact in probes])
        right = sum(answer_starts_with(handle, fact, top) for fact, top in zip(probes, tops))
        leaked = tuple(fact.prompt for fact, top in zip(probes, tops)
                       if not answer_starts_with(handle, fact, top) and top in new_first_tokens)
        fluent = fluency(handle)
    warnings = []
    if probes and len(leaked) > LEAK_SHARE * len(probes):
        warnings.append(f"disabling: {len(leaked)} of {len(probes)} unrelated facts are now answered with an edit's "
                        "new target; switch edits off to find which")
    if baseline_fluency is not None and baseline_fluency - fluent > ENTROPY_COLLAPSE_BITS:
        warnings.append(f"disabling: completions lost {baseline_fluency - fluent:.2f} bits of n-gram entropy; "
                        "the model repeats itself")
    return Health(right, len(probes), fluent, relative_change(handle, edits), leaked, tuple(warnings))

