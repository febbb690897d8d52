"""The entry point: :func:`prepare` what an edit needs from the model's own weights, then :func:`compute_edit`."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..edits import Edit, EditRequest
from ..models import LoadedModel, model_fingerprint
from ..progress import Progress, no_progress, part_of
from ..scoring import target_ids
from ..stats import SecondMoment, read_second_moment_file, second_moment
from .ft import compute_ft
from .prefixes import context_prefixes
from .rome import compute_rome
from .settings import EditOptions, edit_layer, resolve_settings, validate_options


@dataclass
class Prepared:
    """What an edit needs that depends on the model's own weights only: the layer, the prefixes and C."""

    layer: int
    prefixes: list[str]
    moment: SecondMoment | None  # None for FT, which needs no statistics
    seconds: dict[str, float]  # time spent getting each (near zero once cached)


def prepare(handle: LoadedModel, options: EditOptions, progress: Progress = no_progress) -> Prepared:
    """The edit's layer, context prefixes and key statistics, computed (and cached) on the model's own weights.

    The app calls this before taking its session's edits onto the model, so that a request arriving
    while the start-up preparation runs waits for that work instead of repeating it.
    """
    validate_options(handle, options)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    settings = resolve_settings(handle, options, edit_layer(handle, options, progress))
    seconds["layer"] = time.perf_counter() - began
    if settings.method == "ft":
        return Prepared(layer=settings.layer, prefixes=[], moment=None, seconds=seconds)
    began = time.perf_counter()
    prefixes = []
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
    return Prepared(layer=settings.layer, prefixes=prefixes, moment=moment, seconds=seconds)


def compute_edit(
    handle: LoadedModel,
    request: EditRequest,
    options: EditOptions = EditOptions(),
    progress: Progress = no_progress,
    prepared: Prepared | None = None,
) -> Edit:
    """Compute (not apply) the edit that rewrites ``request`` on the model's current weights (a session's
    edits included); the model is left exactly as it was. ``prepared`` comes from :func:`prepare`."""
    began = time.perf_counter()
    validate_options(handle, options)
    target_ids(handle, request.target_new)  # an empty target fails here, before any work
    prepared = prepared or prepare(handle, options, part_of(progress, 0, 0.2))
    settings = resolve_settings(handle, options, prepared.layer)
    with handle.lock:
        if settings.method == "ft":
            started = time.perf_counter()
            vectors = {"dense": compute_ft(handle, request, settings.layer, settings.ft)}
            stats: dict = {"corpus": None, "samples": 0}
            phases = {"ft": time.perf_counter() - started}
        else:
            vectors, stats, rome_phases = compute_rome(handle, request, settings, prepared.prefixes, prepared.moment, progress)
            phases = {"prefixes": prepared.seconds["prefixes"], "stats": prepared.seconds["stats"], **rome_phases}
    weight = handle.arch.mlp_out_values(settings.layer)
    edit = Edit(
        request=request,
        layer=settings.layer,
        method=settings.method,
        model=model_fingerprint(handle),
        weight_shape=tuple(weight.shape),
        right=vectors.get("right"),
        left=vectors.get("left"),
        dense=vectors.get("dense"),
        key=vectors.get("key"),
        value=vectors.get("value"),
        stats=stats,
        weight_norm=float(weight.double().norm()),
        seconds=time.perf_counter() - began,
        phases=phases,
    )
    progress(1.0, "edit computed")
    return edit
