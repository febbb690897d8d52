"""Attribution patching: every cell's restoration effect estimated from gradients, in seconds.

Restoring a cell replaces corrupted states s with clean ones s'; to first order the answer's probability
then changes by ∇ₛp · (s' − s) (Nanda 2023, "Attribution patching"). A window kind restores one output per
layer of its window together: to first order that is Σⱼ ∂p/∂sⱼ · Δsⱼ with each member's gradient taken with
the other members held fixed (a restored member no longer depends on the earlier ones), got by cutting the
members' outputs from their inputs in the backward pass; summing the members' *total* gradients instead
counts the paths from one member through a later one twice (kept as the ``/total`` estimators). The cut is
made at every token, which is exact for a window restored at every token and an approximation for a cell,
which restores one token (docs/attribution.md). Where the corrupted run is saturated its gradient says
little; averaging the gradients along the path from the corrupted input to the clean one is integrated
gradients (Sundararajan et al. 2017; for circuit edges EAP-IG, Hanna et al. 2024). AtP* (Kramár et al. 2024)
fixes saturation differently (recomputing attention's softmax, "QK fix", and GradDrop), not implemented
here. Which estimator serves each kind was chosen on 10 known facts of the bundled set and judged on 10 others
(docs/attribution.md). Estimates are scores on the trace's scale: low_score plus the estimated effect.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from ..core import hooks
from ..core.models import LoadedModel
from ..core.progress import Progress, no_progress, part_of
from . import (
    DEFAULT_LIMITS,
    KINDS,
    TraceLimits,
    TraceOptions,
    TraceResult,
    run_clean_and_corrupted,
    trace_result,
    validated_inputs,
    window_layers,
)

# Path points for each estimator, as the share of the noise still applied (1: the corrupted run, 0: clean).
ESTIMATORS: dict[str, tuple[float, ...]] = {
    "one-step": (1.0,),  # the gradient at the corrupted run (attribution patching as published)
    "clean-side": (0.0,),  # the gradient at the clean run
    "endpoints": (1.0, 0.0),  # the mean of the two (trapezoid rule with one interval)
    **{f"integrated-{k}": tuple(1 - (i + 0.5) / k for i in range(k)) for k in (2, 4, 8)},  # midpoint rule, k points
}
# Per kind, the estimator chosen on the selection half of the bundled facts (highest peak-token agreement, then
# correlation, then cost; docs/attribution.md): the corrupted run's own gradient for hidden states and attention
# (attention's window members cut), integrated gradients over 2 points on total gradients for MLP outputs, where
# the corrupted run saturates and the one-step gradient misses the subject (cut members or not).
PER_KIND = {"hidden": "one-step", "mlp": "integrated-2/total", "attn": "one-step"}
OLD_WINDOW = "/total"  # suffix: a window kind's members estimated with their total gradients (the old estimate)
DEFAULT_ESTIMATOR = "per-kind"


def window_ends(kind: str, window: int, n_layers: int) -> tuple[int, ...]:
    """The distinct last-layer-plus-one of ``kind``'s windows (hidden restores one state: none).

    A window member's gradient with the later members held fixed depends only on where the window ends, so
    one backward pass per distinct end serves every window ending there (14 ends for window 10 of 18 layers).
    """
    if kind == "hidden":
        return ()
    return tuple(sorted({window_layers(layer, window, n_layers).stop for layer in range(n_layers)}))


def _replicas(kinds: tuple[str, ...], window: int, n_layers: int, joint: bool) -> list[tuple[str | None, int]]:
    """One copy of the corrupted batch per backward pass needed: (None, 0) for the plain gradient (hidden), and
    (kind, end) for each window end of a window kind, in which every ``kind`` output below ``end`` is cut off
    from its input so that the gradient at one member excludes the paths through the other members."""
    if not joint:
        return [(None, 0)]
    plain = [(None, 0)] if "hidden" in kinds else []
    return plain + [(kind, end) for kind in kinds for end in window_ends(kind, window, n_layers)]


def state_gradients(
    handle: LoadedModel, runs, noise_shares: tuple[float, ...], kinds: tuple[str, ...] = KINDS, window: int = 1,
    joint: bool = True, progress: Progress = no_progress,
) -> dict[str, dict[int, list[torch.Tensor]]]:
    """∂p(answer)/∂state averaged over the path points: per kind, per window end (0: the plain gradient), per
    layer a (samples, tokens, hidden) tensor. For a window kind and end e, the gradient at layer j < e holds the
    kind's other outputs below e fixed (the joint restoration's first-order coefficient). Without ``joint``,
    only the plain (total) gradient, key 0 for every kind: the old sum of single-state estimates.

    All copies run as one batch: (1 + 2 * ends) copies of the corrupted samples per path point.
    """
    arch, n_layers, samples = handle.arch, handle.num_layers, runs.corrupted_embeds.shape[0]
    replicas = _replicas(kinds, window, n_layers, joint)
    clean_embeds = arch.embedding(runs.prompt.input_ids.to(handle.device)).detach()
    offsets = runs.corrupted_embeds - clean_embeds  # the noise, (samples, tokens, hidden)
    sums: dict[str, dict[int, list[torch.Tensor]]] = {kind: {} for kind in kinds}
    for step, share in enumerate(noise_shares):
        progress(step / len(noise_shares), f"gradients at {share:.2f} of the noise")
        embeds = (clean_embeds + share * offsets).repeat(len(replicas), 1, 1).requires_grad_(True)
        with torch.enable_grad(), _cut_window_members(handle, kinds, replicas, samples) as states:
            final = arch.backbone(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
            probability = torch.softmax(arch.logits(final, for_gradients=True).float(), dim=-1)[:, runs.answer_id]
            probability.sum().backward()
        for index, (cut_kind, end) in enumerate(replicas):
            rows = slice(index * samples, (index + 1) * samples)
            for kind in kinds if cut_kind is None else (cut_kind,):
                if joint and (kind == "hidden") != (cut_kind is None):
                    continue
                per_layer = sums[kind].setdefault(end, [torch.zeros_like(state) for state in runs.corrupted[kind]])
                for layer in range(end if cut_kind else n_layers):
                    grad = states[(kind, layer)].grad
                    if grad is not None:
                        per_layer[layer] += grad[rows].detach()
    return {kind: {end: [total / len(noise_shares) for total in per_layer] for end, per_layer in ends.items()}
            for kind, ends in sums.items()}


@contextmanager
def _cut_window_members(handle: LoadedModel, kinds: tuple[str, ...], replicas, samples: int):
    """Hooks that, in the copy for (kind, end), pass each ``kind`` output below ``end`` on with no gradient back
    into its input (the output becomes a leaf of its own), and keep every state's output to read its gradient.

    Cutting a member at every token is exact for a window restored at every token; a cell restores one token,
    so paths from one member through another member at a *different* token are dropped too (an approximation).
    """
    states: dict[tuple[str, int], torch.Tensor] = {}

    def cut(kind: str, layer: int):
        mask = torch.tensor([cut_kind == kind and layer < end for cut_kind, end in replicas for _ in range(samples)],
                            device=handle.device).view(-1, 1, 1)

        def replace(output: torch.Tensor) -> torch.Tensor:
            state = torch.where(mask, output.detach(), output) if mask.any() else output
            if state.requires_grad:
                state.retain_grad()
            states[(kind, layer)] = state
            return state

        return replace

    with ExitStack() as stack:
        for kind in kinds:
            for layer in range(handle.num_layers):
                stack.enter_context(hooks.on_output(handle.arch.state_module(kind, layer), cut(kind, layer)))
        yield states


def estimate_effects(handle: LoadedModel, runs, kinds: tuple[str, ...], window: int,
                     gradients: dict[str, dict[int, list[torch.Tensor]]], joint: bool = True) -> dict[str, np.ndarray]:
    """Estimated indirect effect per kind, [token, layer]: gradient · (clean − corrupted), mean over samples,
    summed over a window's members with each member's gradient taken with the others held fixed."""
    n_layers = handle.num_layers

    def single(kind: str, end: int, layer: int) -> torch.Tensor:  # [token]
        delta = runs.clean[kind][layer].unsqueeze(0) - runs.corrupted[kind][layer]
        return (gradients[kind][end][layer] * delta).sum(-1).mean(0).double()

    effects = {}
    for kind in kinds:
        if kind == "hidden":
            columns = [single(kind, 0, layer) for layer in range(n_layers)]
        else:
            spans = [window_layers(layer, window, n_layers) for layer in range(n_layers)]
            columns = [sum(single(kind, span.stop if joint else 0, member) for member in span) for span in spans]
        effects[kind] = torch.stack(columns, dim=1).cpu().numpy()
    return effects


def passes(name: str, kinds: tuple[str, ...], window: int, n_layers: int) -> int:
    """Copies of the corrupted batch that estimator ``name`` runs forward and backward for ``kinds``: its cost."""
    joint = not name.endswith(OLD_WINDOW)
    return len(ESTIMATORS[name.removesuffix(OLD_WINDOW)]) * len(_replicas(kinds, window, n_layers, joint))


def estimate_trace(
    handle: LoadedModel,
    prompt: str,
    subject: str | None = None,
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
    estimator: str = DEFAULT_ESTIMATOR,
    progress: Progress = no_progress,
    partial: Callable[[TraceResult], None] | None = None,
) -> TraceResult:
    """The trace of ``prompt`` estimated by attribution patching (``method`` "atp"): same layout as :func:`tracing.trace`.

    With ``partial``, the kinds whose estimator is cheapest are handed over first (the others NaN). An estimator
    name ending in ``/total`` gives the old window estimate (each member's total gradient, joint=False).
    """
    if estimator.removesuffix(OLD_WINDOW) not in ESTIMATORS and estimator != "per-kind":
        raise ValueError(f"unknown estimator {estimator!r}: per-kind or one of {', '.join(ESTIMATORS)}"
                         f" (optionally with {OLD_WINDOW})")
    began = time.perf_counter()
    tokenized, guessed, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    chosen = {kind: PER_KIND[kind] if estimator == "per-kind" else estimator for kind in options.kinds}

    def result(scores: dict[str, np.ndarray]) -> TraceResult:
        found = trace_result(handle, tokenized, guessed, runs, options, noise_std, scores, time.perf_counter() - began)
        found.method = "atp"
        return found

    with handle.weights.locked():
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        progress(0.2, "estimating every cell from gradients (attribution patching)")
        scores = {kind: np.full((tokenized.length, handle.num_layers), np.nan) for kind in options.kinds}
        groups = {name: tuple(kind for kind in options.kinds if chosen[kind] == name) for name in set(chosen.values())}
        for name in sorted(groups, key=lambda name: (passes(name, groups[name], options.window, handle.num_layers), name)):
            kinds = groups[name]
            shares, joint = ESTIMATORS[name.removesuffix(OLD_WINDOW)], not name.endswith(OLD_WINDOW)
            gradients = state_gradients(handle, runs, shares, kinds, options.window, joint,
                                        part_of(progress, 0.2, 0.9, f"{name}: "))
            for kind, effect in estimate_effects(handle, runs, kinds, options.window, gradients, joint).items():
                scores[kind] = runs.low_score + effect
            if partial is not None and any(np.isnan(grid).any() for grid in scores.values()):
                partial(result(scores))
    progress(1.0, "estimate done")
    return result(scores)


def agreement(exact: TraceResult, estimate: TraceResult) -> dict[str, dict]:
    """Per kind, how far an estimate was from the exact trace: correlation of the indirect effects over all
    cells, the largest absolute error, and whether the peak cell (and its token) is the same."""
    report = {}
    for kind in exact.scores:
        if kind not in estimate.scores:
            continue
        truth = np.asarray(exact.scores[kind], dtype=float) - exact.low_score
        guess = np.asarray(estimate.scores[kind], dtype=float) - estimate.low_score
        truth_peak = tuple(int(i) for i in np.unravel_index(np.argmax(truth), truth.shape))
        guess_peak = tuple(int(i) for i in np.unravel_index(np.argmax(guess), guess.shape))
        spread = truth.std() * guess.std()
        report[kind] = {
            "correlation": float(((truth - truth.mean()) * (guess - guess.mean())).mean() / spread) if spread > 0 else float("nan"),
            "max_abs_error": float(np.abs(truth - guess).max()),
            "peak_cell_agrees": truth_peak == guess_peak,
            "peak_token_agrees": truth_peak[0] == guess_peak[0],
            "exact_peak": truth_peak,
            "estimate_peak": guess_peak,
        }
    return report
