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

The modules, in the order an edit goes through them:

- ``requests``: :func:`make_request`, a checked :class:`~explorer.edits.EditRequest`.
- ``settings``: :class:`EditOptions` (what a caller asks for), :func:`validate_options`, the settings
  tables (paper, family, model), :func:`resolve_settings` into an :class:`EditSettings` of concrete
  values, and the edit's layer (:func:`default_layer`, :func:`traced_peak_layer`, cached on disk).
- ``prefixes``: the context prefixes the model generates itself (cached on disk) and the templates.
- ``batch``: the aligned batch k* and v* work on, its clean pass (:func:`precompute`) and the short pass
  each v* step runs (:func:`suffix_pass`), replaying what does not change.
- ``rome``: the v* loss and optimisation, the rank-one solve, and the strengthening of an edit that does
  not hold on its own prompt; ``ft``: the FT+L baseline.
- ``edit``: the entry point, :func:`prepare` and :func:`compute_edit`; ``stored``: the cache's JSON files.

Data flow: ``compute_edit(handle, request, options)`` → :func:`validate_options` → :func:`prepare` (layer,
prefixes, C on the model's own weights) → :func:`resolve_settings` (once: everything below takes the
resolved values) → ``compute_rome`` (rows → :func:`align` → :func:`precompute` → k* →
:func:`optimise_value` → :func:`rank_one_update` → :func:`edit_holds`, along :func:`scale_ladder`) or
``compute_ft`` → an :class:`~explorer.edits.Edit` (data; applying it is :mod:`explorer.edits`'s job).
"""
from __future__ import annotations

from .batch import (
    KL_TEMPLATE,
    AlignedBatch,
    Precomputed,
    PromptRow,
    align,
    context_keys_values,
    precompute,
    prefix_cache,
    prompt_row,
    replaying_below,
    suffix_pass,
)
from .edit import Prepared, compute_edit, prepare
from .ft import compute_ft
from .prefixes import PREFIX_FORMAT, context_prefixes, context_templates
from .requests import make_request
from .rome import (
    SCALE_STEP,
    LossLayout,
    ValueResult,
    compute_rome,
    edit_holds,
    loss_layout,
    optimise_value,
    rank_one_update,
    read_losses,
    scale_ladder,
)
from .settings import (
    FAMILY_SETTINGS,
    METHODS,
    MODEL_SETTINGS,
    PAPER_SETTINGS,
    PROJECT_PREFIXES,
    REFERENCE_LAYERS,
    REFERENCE_SETTINGS,
    SETTINGS,
    EditOptions,
    EditSettings,
    FtSettings,
    ValueSettings,
    default_layer,
    edit_layer,
    resolve_settings,
    resolved_method,
    resolved_setting,
    traced_peak_layer,
    validate_choices,
    validate_options,
    validate_templates,
)


__all__ = [
    "AlignedBatch",
    "EditOptions",
    "EditSettings",
    "FAMILY_SETTINGS",
    "FtSettings",
    "KL_TEMPLATE",
    "LossLayout",
    "METHODS",
    "MODEL_SETTINGS",
    "PAPER_SETTINGS",
    "PROJECT_PREFIXES",
    "REFERENCE_LAYERS",
    "REFERENCE_SETTINGS",
    "SETTINGS",
    "PREFIX_FORMAT",
    "Precomputed",
    "Prepared",
    "PromptRow",
    "SCALE_STEP",
    "ValueResult",
    "ValueSettings",
    "align",
    "compute_edit",
    "compute_ft",
    "compute_rome",
    "context_keys_values",
    "context_prefixes",
    "context_templates",
    "default_layer",
    "edit_holds",
    "edit_layer",
    "loss_layout",
    "make_request",
    "optimise_value",
    "precompute",
    "prefix_cache",
    "prepare",
    "prompt_row",
    "rank_one_update",
    "read_losses",
    "replaying_below",
    "resolve_settings",
    "resolved_method",
    "resolved_setting",
    "scale_ladder",
    "suffix_pass",
    "traced_peak_layer",
    "validate_choices",
    "validate_options",
    "validate_templates",
]
