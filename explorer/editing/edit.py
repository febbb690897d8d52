"""The one edit workflow, for every caller (the app, the CLI, the sweep, the sequential run, the evaluation).

:func:`plan_edit` validates the options once, resolves their settings once (the layer among them) and gets
what the edit needs from the model's own weights (context prefixes, key statistics); :func:`edit_fact` then
computes the edit under its session's lock, with that session's edits applied. A caller passes either
options (planned here) or a plan it made for many edits, never both, so nothing overrides anything.

The plan is made before the session's lock is taken: a request arriving while the app's start-up work
prepares the same values waits for that work instead of repeating it, and other sessions' passes run
meanwhile. Everything the edit reads of the weights (its key, its value, the matrix's norm) is read under
the lock, so no other session's edit can be seen.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..core.models import LoadedModel, model_fingerprint
from ..core.progress import Progress, no_progress, part_of
from ..core.scoring import target_ids
from .edits import Edit, EditRequest, EditSession
from .ft import compute_ft
from .prefixes import context_prefixes
from .rome import compute_rome
from .settings import EditOptions, EditSettings, edit_layer, resolve_settings, validate_options
from .statistics import SecondMoment, read_second_moment_file, second_moment


@dataclass(frozen=True)
class EditPlan:
    """An edit's resolved settings and what it needs from the model's own weights (the prefixes and C)."""

    settings: EditSettings
    prefixes: tuple[str, ...]
    moment: SecondMoment | None  # None for FT, which needs no statistics
    seconds: dict  # time spent getting each (near zero once cached)

    @property
    def layer(self) -> int:
        """The layer the edit changes."""
        return self.settings.layer


def plan_edit(handle: LoadedModel, options: EditOptions = EditOptions(), progress: Progress = no_progress) -> EditPlan:
    """Validate ``options``, resolve their settings and compute (or read from the caches) the prefixes and C."""
    validate_options(options, handle)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    settings = resolve_settings(handle, options, edit_layer(handle, options, progress))
    seconds["layer"] = time.perf_counter() - began
    if settings.method == "ft":
        return EditPlan(settings=settings, prefixes=(), moment=None, seconds=seconds)
    began = time.perf_counter()
    prefixes: list[str] = []
    if settings.templates is None:  # templates given instead (--prefixes-file) need no generated prefixes
        progress(0.0, "generating context prefixes")
        prefixes = context_prefixes(handle, settings, waiting=progress)
    seconds["prefixes"] = time.perf_counter() - began
    began = time.perf_counter()
    progress(0.1, f"key statistics for layer {settings.layer}")
    if settings.stats_file is not None:
        width = handle.arch.mlp_out_weight(settings.layer).shape[1]
        moment = read_second_moment_file(settings.stats_file, settings.layer, width)
    else:
        moment = second_moment(handle, settings.layer, settings.stats, part_of(progress, 0.1, 1))
    seconds["stats"] = time.perf_counter() - began
    return EditPlan(settings=settings, prefixes=tuple(prefixes), moment=moment, seconds=seconds)


def edit_fact(
    session: EditSession,
    request: EditRequest,
    options: EditOptions | EditPlan = EditOptions(),
    progress: Progress = no_progress,
) -> Edit:
    """The edit that rewrites ``request`` on the session's model with the session's edits applied.

    ``options`` are planned here (:func:`plan_edit`); pass an :class:`EditPlan` instead to reuse one. The edit
    is returned, not added: the caller adds it to the session (``session.add``) or only measures it.
    """
    began = time.perf_counter()
    handle = session.handle
    target_ids(handle, request.target_new)  # an empty target fails here, before any work
    plan = options if isinstance(options, EditPlan) else plan_edit(handle, options, part_of(progress, 0, 0.2))
    settings = plan.settings
    with session.applied():
        if settings.method == "ft":
            started = time.perf_counter()
            vectors = {"dense": compute_ft(handle, request, settings.layer, settings.ft)}
            stats: dict = {"corpus": None, "samples": 0}
            phases = {"ft": time.perf_counter() - started}
        else:
            vectors, stats, rome_phases = compute_rome(handle, request, settings, list(plan.prefixes), plan.moment, progress)
            phases = {"prefixes": plan.seconds["prefixes"], "stats": plan.seconds["stats"], **rome_phases}
        weight = handle.arch.mlp_out_values(settings.layer)
        weight_shape, weight_norm = tuple(weight.shape), float(weight.double().norm())
    edit = Edit(
        request=request,
        layer=settings.layer,
        method=settings.method,
        model=model_fingerprint(handle),
        weight_shape=weight_shape,
        right=vectors.get("right"),
        left=vectors.get("left"),
        dense=vectors.get("dense"),
        key=vectors.get("key"),
        value=vectors.get("value"),
        stats=stats,
        weight_norm=weight_norm,
        seconds=time.perf_counter() - began,
        phases=phases,
    )
    progress(1.0, "edit computed")
    return edit
