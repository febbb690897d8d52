"""What an edit is asked for (:class:`EditOptions`), the checks on it, and what it resolves to on one model.

Two sets of settings (``EditOptions.settings``):

- ``project`` (the default): the paper's GPT-2 XL values where nothing was measured, and for the
  embedded model and its family the values measured on CounterFact (docs/editing.md), with the
  strengthening of an edit that does not hold on its own prompt.
- ``reference``: every choice as ROME's reference code makes it, for any model (REFERENCE_SETTINGS):
  ``rome-original``, its hyperparameters, its context templates, its layer where it names one (else the
  traced peak, as the paper chose it), and no strengthening.

Settings that ``EditOptions`` leaves open (None) come from the chosen set: for ``project``, the model's
measured settings, else its family's, else the paper's; :func:`resolve_settings` fills them in once, with
the edit's layer, into an :class:`EditSettings` of concrete values that the rest of the package takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.models import EMBEDDED_FINGERPRINT, LoadedModel, cache_root, model_fingerprint
from ..core.progress import Progress, no_progress
from ..core.prompts import is_whole_number, quoted
from .statistics import StatsSpec
from .stored import read_json, write_json

METHODS = ("rome", "rome-original", "ft")
SETTINGS = ("project", "reference")
# The paper's GPT-2 XL settings that models may override; per-family and per-model settings below are
# measured with the evaluation metrics (docs/evaluation.md; the figures: docs/editing.md#measured-choices).
# A model's own settings win over its family's.
PAPER_SETTINGS: dict[str, float] = {"weight_decay": 0.5, "clamp_factor": 4.0, "loss_stop": 0.05}
FAMILY_SETTINGS: dict[str, dict] = {
    # Gemma 3's MLP outputs are far smaller than GPT-2 XL's, so the paper's decay term 0.5·‖δ‖/‖out‖² stays
    # large and the loss never reaches the early stop; a small decay edits as well, in fewer steps.
    "gemma3_text": {"weight_decay": 1e-3},
}
# Keyed by what a model is (its fingerprint), not by the name it was loaded under.
MODEL_SETTINGS: dict[str, dict] = {
    # The embedded model: edits at its MLP effect's peak layer spill onto other subjects, so the layer is the
    # measured one. δ always ends on its clamp there and what reaches a neighbour grows with ‖δ‖, so the clamp
    # is small; an edit that then does not hold on its own prompt is strengthened along δ (scale_ladder).
    # On the clamp the loss creeps down slowly without changing the outcome, hence the early stop.
    EMBEDDED_FINGERPRINT: {"layer": 1, "clamp_factor": 0.5, "loss_stop": 0.3},
}


# ROME's reference code (github kmeng01/rome, hparams/ROME/*.json and rome/*.py), as `--settings reference`.
# Its context templates come from generate_fast(max_out_len=5 and 10) after one start token: 4 and 9 new tokens.
REFERENCE_SETTINGS: dict = {
    "method": "rome-original", "weight_decay": 0.5, "clamp_factor": 4.0, "loss_stop": 0.05,
    "prefixes": ((4, 10), (9, 10)), "strengthen": False,
}
# The layers the reference's hyperparameter files name; any other model edits at its traced MLP peak. Keyed by
# the model's shape (family, blocks, width), not by the name it was loaded under, so that a local copy of
# gpt2-xl edits at layer 17 too.
REFERENCE_LAYERS: dict[tuple[str, int, int], int] = {
    ("gpt2", 24, 1024): 8,  # gpt2-medium
    ("gpt2", 36, 1280): 12,  # gpt2-large
    ("gpt2", 48, 1600): 17,  # gpt2-xl
    ("gptj", 28, 4096): 5,  # EleutherAI/gpt-j-6B
    ("gpt_neox", 44, 6144): 15,  # EleutherAI/gpt-neox-20b
}
PROJECT_PREFIXES = ((5, 10), (10, 10))  # (tokens, how many)


@dataclass(frozen=True)
class EditOptions:
    """How an edit is computed; what is left None comes from ``settings`` (see the module's docstring)."""

    method: str | None = None  # None: rome (project settings) or rome-original (reference settings)
    settings: str = "project"  # or "reference": every choice as ROME's reference code makes it
    layer: int | None = None  # None: the model's default layer (peak MLP effect at the last subject token)
    steps: int = 20
    lr: float = 0.5
    loss_stop: float | None = None  # stop v* once its loss is below this; None: measured or paper's
    clamp_factor: float | None = None  # ‖δ‖ ≤ clamp_factor × ‖MLP output at the subject‖; None: measured or paper's
    kl_factor: float = 0.0625
    weight_decay: float | None = None  # None: the model's or family's measured setting, else the paper's 0.5
    prefixes: tuple[tuple[int, int], ...] | None = None  # (tokens, how many); None: the settings' own
    prefix_seed: int = 0
    # Context templates (each with one {}, the first "{}") used instead of generated prefixes: to compare with
    # another implementation's templates exactly.
    templates: tuple[str, ...] | None = None
    stats: StatsSpec = field(default_factory=StatsSpec)
    stats_file: str | None = None  # C read from this file (the project's layer file or a runningstats .npz)
    strengthen: bool | None = None  # scale δ until the edit holds on its own prompt; None: the settings' own
    shrinkage: float = 0.0  # ridge on C, as a share of its mean diagonal
    ft_steps: int = 25  # FT+L: Adam steps on W with the change clamped to an L∞ ball
    ft_lr: float = 5e-4
    ft_norm: float = 5e-4


@dataclass(frozen=True)
class ValueSettings:
    """How v* is optimised: Adam on δ for at most ``steps``, stopping once the loss is below ``loss_stop``."""

    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_factor: float  # ‖δ‖ ≤ clamp_factor × ‖MLP output at the subject‖
    loss_stop: float


@dataclass(frozen=True)
class FtSettings:
    """FT+L: Adam steps on W, the change clamped to ‖ΔW‖∞ ≤ ``norm``."""

    steps: int
    lr: float
    norm: float


@dataclass(frozen=True)
class EditSettings:
    """One edit's settings resolved for one model: the layer and every value concrete."""

    method: str
    layer: int
    value: ValueSettings
    ft: FtSettings
    shrinkage: float  # ridge on C, as a share of its mean diagonal
    prefixes: tuple[tuple[int, int], ...]  # (tokens, how many)
    prefix_seed: int
    stats: StatsSpec
    settings: str = "project"
    strengthen: bool = True
    templates: tuple[str, ...] | None = None
    stats_file: str | None = None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def chosen_prefixes(options: EditOptions):
    """The (tokens, how many) pairs of context prefixes ``options`` ask for, else their settings' own."""
    if options.prefixes is not None:
        return options.prefixes
    return REFERENCE_SETTINGS["prefixes"] if options.settings == "reference" else PROJECT_PREFIXES


def resolved_method(options: EditOptions) -> str:
    """The method ``options`` ask for: theirs, else their settings' (rome, or rome-original for reference)."""
    if options.method is not None:
        return options.method
    return REFERENCE_SETTINGS["method"] if options.settings == "reference" else "rome"


def validate_options(options: EditOptions, handle: LoadedModel | None = None) -> None:
    """Raise :class:`InputError` for options the engine cannot run, before touching the model.

    Without ``handle``, the checks that need no model (the CLI runs them before loading one, so a typo costs
    no wait); with it, also that the layer exists in that model.
    """
    if options.settings not in SETTINGS:
        raise InputError(f"unknown settings {quoted(str(options.settings))}: use one of {', '.join(SETTINGS)}")
    if options.method is not None and options.method not in METHODS:
        raise InputError(f"unknown method {quoted(str(options.method))}: use one of {', '.join(METHODS)}")
    if options.settings == "reference" and resolved_method(options) != REFERENCE_SETTINGS["method"]:
        raise InputError("--settings reference is the reference code's method, rome-original: leave the method out "
                         "(or name rome-original), or use the project settings for rome and ft")
    if not (is_whole_number(options.steps) and is_whole_number(options.ft_steps) and 1 <= options.steps <= 200 and 1 <= options.ft_steps <= 500):
        raise InputError("steps must be between 1 and 200 (ft: 500)")
    if not (_is_number(options.shrinkage) and options.shrinkage >= 0):
        raise InputError("shrinkage must be a number, 0 or more")
    numbers = {"lr": options.lr, "ft_lr": options.ft_lr, "ft_norm": options.ft_norm, "kl_factor": options.kl_factor}
    for name in PAPER_SETTINGS:
        if getattr(options, name) is not None:
            numbers[name] = getattr(options, name)
    for name, value in numbers.items():
        if not (_is_number(value) and value >= 0):
            raise InputError(f"{name} must be a number, 0 or more")
    prefixes = chosen_prefixes(options)
    if not (
        isinstance(prefixes, (tuple, list))
        and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(is_whole_number(n) for n in p) for p in prefixes)
        and all(1 <= length <= 64 and 0 <= count <= 100 for length, count in prefixes)
        and is_whole_number(options.prefix_seed)
        and 0 <= options.prefix_seed < 2**31
    ):
        raise InputError("prefixes must be (tokens 1 to 64, how many 0 to 100) pairs, and the prefix seed 0 or more")
    if options.templates is not None:
        validate_templates(options.templates)
    if handle is not None and options.layer is not None and not (is_whole_number(options.layer) and 0 <= options.layer < handle.num_layers):
        shown = options.layer if is_whole_number(options.layer) else quoted(str(options.layer))
        raise InputError(f"layer {shown} is out of range; this model has layers 0 to {handle.num_layers - 1}")
    if options.strengthen not in (None, True, False):
        raise InputError("strengthen must be true, false or left out")
    if options.stats_file is not None and not Path(str(options.stats_file)).expanduser().is_file():
        raise InputError(f"statistics file {quoted(str(options.stats_file))} does not exist; give a .pt layer file or a .npz")
    options.stats.validate()


def validate_templates(templates: object) -> None:
    """Context templates must be a list of one-line texts with exactly one {}, the first of them "{}"."""
    if not (isinstance(templates, (tuple, list)) and templates and all(isinstance(t, str) for t in templates)):
        raise InputError("context templates must be a non-empty list of texts, each with one {}")
    for template in templates:
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
            raise InputError(f"context template {quoted(template)} must contain {{}} exactly once and no other braces")
        if "\n" in template or "\r" in template:
            raise InputError(f"context template {quoted(template)} must be one line")
    if templates[0] != "{}":
        raise InputError('the first context template must be "{}" (the bare prompt), as in the reference code: '
                         "v* starts from the MLP output there")


def resolved_setting(handle: LoadedModel, options: EditOptions, name: str) -> float:
    """A setting of PAPER_SETTINGS: the option when set; for reference settings the reference's; else the
    model's, else the family's, else the paper's."""
    if getattr(options, name) is not None:
        return getattr(options, name)
    if options.settings == "reference":
        return REFERENCE_SETTINGS[name]
    for measured in (MODEL_SETTINGS.get(model_fingerprint(handle), {}), FAMILY_SETTINGS.get(handle.arch.model_type, {})):
        if name in measured:
            return measured[name]
    return PAPER_SETTINGS[name]


def resolve_settings(handle: LoadedModel, options: EditOptions, layer: int) -> EditSettings:
    """``options`` (already validated) at ``layer`` (see :func:`edit_layer`), with its open settings filled in."""
    value = ValueSettings(
        steps=options.steps,
        lr=options.lr,
        kl_factor=options.kl_factor,
        weight_decay=resolved_setting(handle, options, "weight_decay"),
        clamp_factor=resolved_setting(handle, options, "clamp_factor"),
        loss_stop=resolved_setting(handle, options, "loss_stop"),
    )
    reference = options.settings == "reference"
    prefixes = chosen_prefixes(options)
    strengthen = options.strengthen if options.strengthen is not None else not reference
    return EditSettings(
        method=resolved_method(options),
        layer=layer,
        value=value,
        ft=FtSettings(steps=options.ft_steps, lr=options.ft_lr, norm=options.ft_norm),
        shrinkage=options.shrinkage,
        prefixes=tuple((int(length), int(count)) for length, count in prefixes),
        prefix_seed=options.prefix_seed,
        stats=options.stats,
        settings=options.settings,
        strengthen=bool(strengthen),
        templates=tuple(options.templates) if options.templates is not None else None,
        stats_file=str(options.stats_file) if options.stats_file is not None else None,
    )


# ---------------------------------------------------------------- the edit's layer


def edit_layer(handle: LoadedModel, options: EditOptions, progress: Progress = no_progress) -> int:
    """The layer ``options`` asks for, else the settings' layer: :func:`default_layer`, or for reference
    settings the reference's layer for the model (else its traced peak, as the paper chose layers)."""
    if options.layer is not None:
        return options.layer
    if options.settings == "reference":
        shape = (handle.arch.model_type, handle.num_layers, handle.model.config.hidden_size)
        if shape in REFERENCE_LAYERS:
            return REFERENCE_LAYERS[shape]
        return traced_peak_layer(handle, progress=progress)
    return default_layer(handle, progress=progress)


def default_layer(handle: LoadedModel, facts_limit: int = 40, progress: Progress = no_progress) -> int:
    """The layer edits use unless told: a measured choice where there is one, else the traced peak."""
    measured = MODEL_SETTINGS.get(model_fingerprint(handle), {})
    if "layer" in measured:
        return measured["layer"]
    return traced_peak_layer(handle, facts_limit, progress)


def traced_peak_layer(handle: LoadedModel, facts_limit: int = 40, progress: Progress = no_progress) -> int:
    """The layer where the MLP indirect effect at the last subject token peaks, averaged over known facts.

    Computed once per model with the tracing engine on the model's own weights, over the first
    ``facts_limit`` facts of the project's fact set that the model completes correctly, and cached on disk.
    """
    return handle.weights.derived(("traced_peak_layer", facts_limit), lambda: _stored_peak_layer(handle, facts_limit, progress), progress)


def _stored_peak_layer(handle: LoadedModel, facts_limit: int, progress: Progress) -> int:
    path = cache_root() / "layers" / f"{model_fingerprint(handle)}-facts{facts_limit}.json"
    stored = read_json(path)
    layer = stored.get("layer") if isinstance(stored, dict) else None
    if is_whole_number(layer) and 0 <= layer < handle.num_layers:
        return int(layer)
    # Missing or damaged (not JSON, no layer, a layer this model lacks): traced again and rewritten.
    from ..tracing.aggregate import last_subject_mlp_effects  # here: the tracing engine loads only when a layer must be traced

    effects, used = last_subject_mlp_effects(handle, facts_limit, progress)
    layer = int(np.argmax(effects))
    write_json(path, {"layer": layer, "facts": used, "mlp_effect_by_layer": effects.tolist()})
    return layer
