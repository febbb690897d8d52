"""The same edit at every layer, beside the trace: does the layer tracing points to give the best edit?

Hase et al. ("Does Localization Inform Editing?", 2023) found that where causal tracing localises a fact
barely predicts which layer edits it best. A sweep computes one request's edit at each layer (always on
the model's own weights, or the session's, never on another layer's edit) and scores it as ``edit`` does,
next to the MLP indirect effect at the subject's last token for the same prompt.

A layer's ``score`` is the mean of the paper's magnitudes that the request has prompts for: EM (edit
prompt), PM (paraphrases) and NM (neighbours), each a difference of probabilities. It is continuous, so
layers that all make ES = 1 are still told apart; the best layer is the one with the highest score.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import numpy as np

from ..core.errors import InputError
from ..core.progress import Progress, no_progress, part_of
from ..editing import EditOptions, EditPlan, edit_fact, plan_edit, resolved_method, validate_options
from ..editing.edits import EditRequest, EditSession
from ..editing.statistics import cache_second_moments
from ..tracing import DEFAULT_LIMITS, TraceLimits, TraceOptions, last_subject_effects
from .compare import Probes, edit_scores, snapshot, with_true_target


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """Layers from ``"0-17"``, ``"2,4,6"`` or ``"1-3,8"`` (None or empty: every layer)."""
    if text is None or not str(text).strip():
        return list(range(num_layers))
    layers: list[int] = []
    for part in str(text).split(","):
        bounds = part.strip().split("-")
        try:
            first, last = (int(bounds[0]), int(bounds[-1])) if len(bounds) <= 2 else (None, None)
        except ValueError:
            first = last = None
        if first is None or last is None or first > last:
            raise InputError(f"layers must look like 0-17 or 2,4,6; got {part.strip()!r}")
        layers.extend(range(first, last + 1))
    wrong = [layer for layer in layers if not 0 <= layer < num_layers]
    if wrong:
        raise InputError(f"layer {wrong[0]} does not exist: the model has layers 0 to {num_layers - 1}")
    return list(dict.fromkeys(layers))


def layer_score(scores: dict) -> float | None:
    """The mean of the magnitudes EM, PM, NM that were measured (None when none was)."""
    values = [scores[name] for name in ("EM", "PM", "NM") if scores.get(name) is not None]
    return float(np.mean(values)) if values else None


def sweep_point(session: EditSession, request: EditRequest, probes: Probes, plan: EditPlan,
                progress: Progress = no_progress) -> dict:
    """The request's edit as ``plan`` says (at its layer) on the session's model, scored as ``edit`` scores it."""
    handle = session.handle
    began = time.perf_counter()
    edit = edit_fact(session, request, plan, progress=progress)
    layer = plan.layer
    with session.with_edit(edit).applied():
        after = snapshot(handle, request, replace(probes, generate=()))
    scores = edit_scores(after)
    return {"layer": layer, "new_prob": after["target_new_prob"], "true_prob": after["target_true_prob"],
            "ES": scores["ES"], "PS": scores["PS"], "NS": scores["NS"], "EM": scores["EM"], "PM": scores["PM"],
            "NM": scores["NM"], "score": layer_score(scores), "delta_norm": edit.delta_norm,
            "seconds": time.perf_counter() - began}


def sweep_layers(
    session: EditSession,
    request: EditRequest,
    probes: Probes = Probes(),
    layers: Sequence[int] | None = None,
    options: EditOptions = EditOptions(),
    progress: Progress = no_progress,
    on_point: Callable[[dict], None] | None = None,
    trace_options: TraceOptions = TraceOptions(),
    trace_limits: TraceLimits = DEFAULT_LIMITS,
) -> dict:
    """Edit ``request`` at each of ``layers`` and trace its MLP effect at the last subject token; the sweep's JSON.

    ``on_point`` gets the MLP effect first (``{"mlp_effect": [...]}``), then each layer's point as soon as
    it is computed.
    """
    handle = session.handle
    layers = list(range(handle.num_layers)) if layers is None else list(layers)
    if not layers:
        raise InputError("choose at least one layer to sweep")
    for layer in layers:  # every layer's options checked before any work
        validate_options(replace(options, layer=layer), handle)
    request = with_true_target(handle, request, session)
    with session.applied():
        effect = last_subject_effects(handle, request.filled, request.subject, "mlp", trace_options, trace_limits)
    if on_point is not None:
        on_point({"mlp_effect": effect.tolist()})
    # Everything an edit needs from the model's own weights, for every layer at once: the prefixes once,
    # and C for all layers in one pass over the corpus instead of one pass per layer.
    if resolved_method(options) != "ft" and options.stats_file is None:
        cache_second_moments(handle, layers, options.stats, part_of(progress, 0, 0.25, "key statistics: "))
    points = []
    for index, layer in enumerate(layers):
        step = part_of(progress, 0.25 + 0.75 * index / len(layers), 0.25 + 0.75 * (index + 1) / len(layers), f"layer {layer}: ")
        plan = plan_edit(handle, replace(options, layer=layer), part_of(step, 0, 0.05, "preparing: "))
        points.append(sweep_point(session, request, probes, plan, step))
        if on_point is not None:
            on_point(points[-1])
    scored = [point for point in points if point["score"] is not None]
    return {
        "request": asdict(request),
        "method": resolved_method(options),
        "settings": options.settings,
        "layers": points,
        "mlp_effect": effect.tolist(),
        "peak_layer": int(np.argmax(effect)),
        "best_layer": max(scored, key=lambda point: point["score"])["layer"] if scored else None,
    }
