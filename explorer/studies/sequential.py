"""Many edits, one after another, on the same model: where retention, knowledge and fluency stand.

Each case of a data set is edited on the model that already carries every earlier edit (as a user who
keeps editing would), and every ``every`` edits a checkpoint measures, on the model as it is then:

* **ES / PS**: efficacy and paraphrase success of *all* edits so far (do old edits still hold?);
* **NS**: neighbourhood success of all edits so far (do their neighbours keep their answers?);
* **probe_retained**, **fluency**, **relative_norm**: :mod:`explorer.studies.health`'s measures (facts the
  unedited model knew, n-gram entropy of fixed completions, ‖ΔW‖ / ‖W₀‖ of the edited layers).

Scores are percentages, as in ``evaluate``; zsRE cases report its token accuracies under the same keys.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..core.errors import InputError
from ..core.facts import Fact
from ..core.models import LoadedModel
from ..core.progress import Progress, no_progress, part_of
from ..editing import EditOptions, edit_fact, plan_edit
from ..editing.edits import EditSession
from .evaluate import Case, case_metrics, rewrite_metric_names, summarise
from .health import PROBE_FACTS, baseline_fluency, model_health, probe_facts

# A checkpoint's keys for its efficacy, paraphrase and neighbourhood scores, whatever the data set calls them.
SCORE_KEYS = ("ES", "PS", "NS")


@dataclass(frozen=True)
class SequentialSettings:
    """How a sequential run edits and how often it measures."""

    method: str = "rome"  # rome, rome-original or ft
    every: int = 10  # a checkpoint after this many edits (and after the last)
    edit: EditOptions = EditOptions()
    probes: int = PROBE_FACTS

    def validate(self, cases: int) -> None:
        if not 1 <= self.every:
            raise InputError(f"--every must be 1 or more, got {self.every}")
        if cases < 1:
            raise InputError("the data set has no cases to edit")
        if not 1 <= self.probes <= 1000:
            raise InputError(f"the probe set must hold 1 to 1000 facts, got {self.probes}")


def checkpoint_scores(handle: LoadedModel, cases: Sequence[Case], kind: str) -> dict[str, float | None]:
    """ES, PS and NS (percent) of ``cases`` on the model as it is now (inside ``applied()``)."""
    names = rewrite_metric_names(kind)
    if not cases:
        return dict.fromkeys(SCORE_KEYS)
    per_case = [{"now": case_metrics(handle, case, kind, generation=False, seed=index)} for index, case in enumerate(cases)]
    summary = summarise(per_case, "now", kind)
    return {key: summary[name]["mean"] for key, name in zip(SCORE_KEYS, names)}


def sequential_run(
    handle: LoadedModel,
    cases: Sequence[Case],
    kind: str,
    settings: SequentialSettings = SequentialSettings(),
    progress: Progress = no_progress,
    on_checkpoint: Callable[[dict], None] | None = None,
    probe_set: Sequence[Fact] | None = None,
) -> dict:
    """Edit ``cases`` one after another and measure every ``settings.every`` edits; the run's JSON.

    The probe facts are the first ``settings.probes`` of ``probe_set`` (default: the bundled fact set)
    that the unedited model completes correctly. The model is left as it was: the edits live in a
    session of this run only.
    """
    settings.validate(len(cases))
    rewrite_metric_names(kind)  # an unknown format is refused before the edits are prepared
    plan = plan_edit(handle, replace(settings.edit, method=settings.method), part_of(progress, 0, 0.01, "preparing: "))
    began = time.perf_counter()
    session = EditSession(handle)
    # Facts about the subjects this run edits are not unrelated knowledge: the probe set leaves them out.
    probes = probe_facts(handle, settings.probes, probe_set, [case.request.subject for case in cases])
    unedited_fluency = baseline_fluency(handle)

    def measure(done: int) -> dict:
        health = model_health(session, probes, unedited_fluency)
        with session.applied():
            scores = checkpoint_scores(handle, cases[:done], kind)
        point = {"edits": done, **scores, "probe_retained": health.probe_retained, "fluency": health.fluency,
                 "relative_norm": health.relative_change, "seconds": time.perf_counter() - began,
                 "warnings": list(health.warnings)}
        if on_checkpoint is not None:
            on_checkpoint(point)
        return point

    checkpoints, records = [measure(0)], []
    for index, case in enumerate(cases):
        step = part_of(progress, index / len(cases), (index + 1) / len(cases), f"edit {index + 1}/{len(cases)}: ")
        edit = edit_fact(session, case.request, plan, progress=step)
        session.add(edit)
        records.append({"case_id": case.case_id, "subject": case.request.subject, "target_new": case.request.target_new,
                        "layer": edit.layer, "delta_norm": edit.delta_norm, "relative_norm": edit.summary()["relative_norm"],
                        "seconds": edit.seconds})
        if (index + 1) % settings.every == 0 or index + 1 == len(cases):
            checkpoints.append(measure(index + 1))
    return {"cases": len(cases), "method": settings.method, "settings": settings.edit.settings, "layer": records[0]["layer"], "every": settings.every,
            "probes": len(probes), "checkpoints": checkpoints, "edits": records}
