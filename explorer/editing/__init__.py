"""ROME: rewrite one fact with a rank-one update of one MLP output projection; FT+L as the baseline.

For a request (prompt template, subject, target_new):

1. **k\\*** — the input of the projection W at the subject's last token, averaged over the bare prompt
   and prompts that start with short model-generated prefixes ("{prefix}. {prompt}").
2. **v\\*** — the MLP output there plus a vector δ, optimised so that the model predicts target_new
   after every prefixed prompt, with a KL term that keeps "{subject} is a" as it was and a decay on δ.
3. **Update** — ΔW = Λ (C⁻¹k\\*)ᵀ with Λ = (v\\* − W k\\*) / ((C⁻¹k\\*)ᵀ k\\*), C the keys' second moment
   (``rome``); ``rome-original`` uses the bare prompt's key inside Λ, as the original code did.

During the optimisation nothing below the edited layer changes, and nothing before the subject's last
token changes anywhere: both are computed once (their block outputs and keys/values are replayed),
and each step runs only the positions from the subject's last token on, through the layers from the
edited one up. How an edit is computed and why its settings are what they are: docs/editing.md.

The package exports the workflow, its options, requests and results; the steps inside are imported from
their modules. The modules, in the order an edit goes through them:

- ``requests``: :func:`make_request`, a checked :class:`~explorer.editing.edits.EditRequest`.
- ``settings``: :class:`EditOptions` (what a caller asks for), :func:`validate_options`, the settings
  tables (paper, family, model), :func:`resolve_settings` into an :class:`EditSettings` of concrete
  values, and the edit's layer (:func:`default_layer`, :func:`traced_peak_layer`, cached on disk).
- ``prefixes``: the context prefixes the model generates itself (cached on disk) and the templates.
- ``batch``: the aligned batch k* and v* work on, its clean pass (:func:`precompute`) and the short pass
  each v* step runs (:func:`suffix_pass`), replaying what does not change.
- ``rome``: the v* loss and optimisation, the rank-one solve, and the strengthening of an edit that does
  not hold on its own prompt; ``ft``: the FT+L baseline.
- ``edit``: the one edit workflow, :func:`plan_edit` (validate once, resolve once, prefixes and C) and
  :func:`edit_fact` (compute under the session's lock); ``stored``: the cache's JSON files.
- ``edits``: an :class:`Edit` as data (saved, loaded) and :class:`EditSession`, one user's stack of edits
  over a shared model, applied and undone exactly (through the model's weights owner).
- ``statistics``: the keys' second moment C of a layer, computed once per model, corpus and size, on disk;
  ``corpora``: the texts it is computed over (offline Wikipedia, sampled text, a user's files).

Data flow: ``edit_fact(session, request, options)`` → :func:`plan_edit` (:func:`validate_options` once,
:func:`resolve_settings` once with the layer: everything below takes the resolved values; prefixes and C on
the model's own weights) → under ``session.applied()``: ``compute_rome`` (rows → :func:`align` → :func:`precompute` → k* →
:func:`optimise_value` → :func:`rank_one_update` → :func:`edit_holds`, along :func:`scale_ladder`) or
``compute_ft`` → an :class:`~explorer.editing.edits.Edit` (data; applying it is :mod:`explorer.editing.edits`'s job).
"""
from __future__ import annotations

from .corpora import StatsSpec
from .edit import EditPlan, edit_fact, plan_edit
from .edits import Edit, EditRequest, EditSession, load_edit
from .requests import make_request
from .settings import (
    METHODS,
    SETTINGS,
    EditOptions,
    EditSettings,
    default_layer,
    resolved_method,
    traced_peak_layer,
    validate_options,
)
from .statistics import SecondMoment

__all__ = [
    "METHODS",
    "SETTINGS",
    "Edit",
    "EditOptions",
    "EditPlan",
    "EditRequest",
    "EditSession",
    "EditSettings",
    "SecondMoment",
    "StatsSpec",
    "default_layer",
    "edit_fact",
    "load_edit",
    "make_request",
    "plan_edit",
    "resolved_method",
    "traced_peak_layer",
    "validate_options",
]
