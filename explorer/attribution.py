"""Attribution patching: every cell's restoration effect estimated from gradients, in seconds.

Restoring a cell replaces corrupted states s with clean ones s'; to first order the answer's probability
then changes by ∇ₛp · (s' − s), summed over the states the cell restores (a window kind restores one
output per layer of its window). One forward and backward pass of the corrupted runs gives ∇ₛp for every
state at once (Nanda 2023, "Attribution patching"). Where the corrupted run is saturated the gradient
there says little (Kramár et al. 2024, AtP*); averaging the gradients along the path from the corrupted
input to the clean one (integrated gradients over k points) is the remedy; which gradient serves each
kind best was chosen by measurement (docs/attribution.md). Estimates are scores on the trace's scale:
low_score plus the estimated effect.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from . import hooks
from .models import LoadedModel
from .progress import Progress, no_progress, part_of
from .tracing import (
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
# Per kind, the estimator that agreed best with the exact trace (docs/attribution.md has the comparison):
# the corrupted run's own gradient for hidden states and attention; integrated gradients for MLP outputs,
# where the corrupted run saturates and its one-step gradient misses the subject.
PER_KIND = {"hidden": "one-step", "mlp": "integrated-4", "attn": "one-step"}
DEFAULT_ESTIMATOR = "per-kind"


def state_gradients(
    handle: LoadedModel, runs, noise_shares: tuple[float, ...], progress: Progress = no_progress
) -> dict[str, list[torch.Tensor]]:
    """∂p(answer)/∂state per kind and layer, (samples, tokens, hidden), averaged over the path points."""
    arch, n_layers = handle.arch, handle.num_layers
    clean_embeds = arch.embedding(runs.prompt.input_ids.to(handle.device)).detach()
    offsets = runs.corrupted_embeds - clean_embeds  # the noise, (samples, tokens, hidden)
    names = {f"{kind}.{layer}": arch.state_module(kind, layer) for kind in KINDS for layer in range(n_layers)}
    sums: dict[str, list[torch.Tensor]] = {kind: [torch.zeros_like(state) for state in runs.corrupted[kind]] for kind in KINDS}
    for step, share in enumerate(noise_shares):
        progress(step / len(noise_shares), f"gradients at {share:.2f} of the noise")
        embeds = (clean_embeds + share * offsets).requires_grad_(True)
        with torch.enable_grad(), hooks.capture_outputs(names, detach=False) as states:
            final = arch.backbone(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
            for state in states.values():  # intermediate tensors of the graph: keep their gradients
                if state.requires_grad:
                    state.retain_grad()
            probability = torch.softmax(arch.logits(final, for_gradients=True).float(), dim=-1)[:, runs.answer_id]
            probability.sum().backward()
        for kind in KINDS:
            for layer in range(n_layers):
                grad = states[f"{kind}.{layer}"].grad
                if grad is not None:
                    sums[kind][layer] += grad.detach()
    return {kind: [total / len(noise_shares) for total in per_layer] for kind, per_layer in sums.items()}


def estimate_effects(handle: LoadedModel, runs, kinds: tuple[str, ...], window: int,
                     gradients: dict[str, list[torch.Tensor]]) -> dict[str, np.ndarray]:
    """Estimated indirect effect per kind, [token, layer]: gradient · (clean − corrupted), mean over samples."""
    n_layers = handle.num_layers
    effects = {}
    for kind in kinds:
        # Per layer and token, one restored state's first-order effect, averaged over the noise samples.
        single = torch.stack([
            (gradients[kind][layer] * (runs.clean[kind][layer].unsqueeze(0) - runs.corrupted[kind][layer])).sum(-1).mean(0)
            for layer in range(n_layers)
        ], dim=1).double()  # [token, layer]
        if kind == "hidden":
            effects[kind] = single.cpu().numpy()
            continue
        windowed = torch.stack([single[:, list(window_layers(layer, window, n_layers))].sum(1) for layer in range(n_layers)], dim=1)
        effects[kind] = windowed.cpu().numpy()
    return effects


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

    With ``partial``, the kinds whose estimator is cheapest are handed over first (the others NaN).
    """
    if estimator not in ESTIMATORS and estimator != "per-kind":
        raise ValueError(f"unknown estimator {estimator!r}: per-kind or one of {', '.join(ESTIMATORS)}")
    began = time.perf_counter()
    tokenized, guessed, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    chosen = {kind: PER_KIND[kind] if estimator == "per-kind" else estimator for kind in options.kinds}

    def result(scores: dict[str, np.ndarray]) -> TraceResult:
        found = trace_result(handle, tokenized, guessed, runs, options, noise_std, scores, time.perf_counter() - began)
        found.method = "atp"
        return found

    with handle.lock:
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        progress(0.2, "estimating every cell from gradients (attribution patching)")
        scores = {kind: np.full((tokenized.length, handle.num_layers), np.nan) for kind in options.kinds}
        for name in sorted(set(chosen.values()), key=lambda name: len(ESTIMATORS[name])):
            gradients = state_gradients(handle, runs, ESTIMATORS[name], part_of(progress, 0.2, 0.9, f"{name}: "))
            kinds = tuple(kind for kind in options.kinds if chosen[kind] == name)
            for kind, effect in estimate_effects(handle, runs, kinds, options.window, gradients).items():
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
