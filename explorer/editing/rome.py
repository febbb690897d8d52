"""ROME: k*, the v* optimisation and its loss, the rank-one solve, and the strengthening of an edit that
does not hold on its own prompt."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core import hooks
from ..core.generation import pad_token
from ..core.models import LoadedModel
from ..core.progress import Progress
from ..core.scoring import target_ids
from .batch import AlignedBatch, Precomputed, align, context_keys_values, precompute, prompt_row, suffix_pass
from .edits import EditRequest
from .prefixes import context_templates
from .settings import PAPER_SETTINGS, EditSettings, ValueSettings
from .statistics import SecondMoment, solve

SCALE_STEP = 1.1  # an edit that does not hold is tried again with δ × 1.1, 1.21, … (scale_ladder)

Update = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # δ → (Λ, u)


# ---------------------------------------------------------------- the v* loss


@dataclass
class LossLayout:
    """Which suffix states the value loss reads: target-predicting positions, then the KL position."""

    rows: list[int]
    columns: list[int]
    tokens: list[int]  # the target token each (row, column) predicts
    weights: torch.Tensor  # per target token: 1 / (tokens in its row × rows), so each prompt counts once
    kl: bool  # whether the last (row, column) is the KL prompt's subject-last position


def loss_layout(batch: AlignedBatch, rewrite_rows: Sequence[int], kl_row: int | None) -> LossLayout:
    """The :class:`LossLayout` of ``batch``: targets of ``rewrite_rows``, and ``kl_row``'s subject-last position.

    The KL term reads the distribution where δ is added (the subject's last token of "{} is a"), as the
    reference code does (its ``lookup_idxs``), not after the prompt's last token.
    """
    rows, columns, tokens, weights = [], [], [], []
    for i in rewrite_rows:
        row = batch.rows[i]
        prompt_length = len(row.ids) - len(row.targets) + 1
        for j, token in enumerate(row.targets):
            rows.append(i)
            columns.append(batch.column(i, prompt_length - 1 + j) - batch.split)
            tokens.append(token)
            weights.append(1.0 / (len(row.targets) * len(rewrite_rows)))
    if kl_row is not None:
        rows.append(kl_row)
        columns.append(batch.column(kl_row, batch.rows[kl_row].subject_last) - batch.split)
    return LossLayout(rows, columns, tokens, torch.tensor(weights), kl_row is not None)


def read_losses(handle: LoadedModel, layout: LossLayout, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean target NLL, and the KL position's next-token log-probabilities (one unembedding for both)."""
    logprobs = torch.log_softmax(handle.arch.logits(states[layout.rows, layout.columns]).float(), -1)
    count = len(layout.tokens)
    wanted = torch.tensor(layout.tokens, device=logprobs.device).unsqueeze(1)
    token_nll = -logprobs[:count].gather(1, wanted).squeeze(1)
    nll = (token_nll * layout.weights.to(token_nll.device)).sum()
    return nll, (logprobs[count].double() if layout.kl else None)


# ---------------------------------------------------------------- v*


@dataclass
class ValueResult:
    """The optimised δ (v* = the MLP output at the bare prompt + δ) and what it took.

    ``losses[i]`` is the loss after ``i`` optimiser updates; the last is the loss of the δ returned.
    """

    delta: torch.Tensor
    steps: int  # losses evaluated (forward passes); the updates are one fewer
    losses: list[float]


def optimise_value(
    handle: LoadedModel, batch: AlignedBatch, layer: int, pre: Precomputed, settings: ValueSettings, kl_row: int
) -> ValueResult:
    """v*: δ added to W's output at each subject's last token, trained so the targets follow.

    ‖δ‖ is clamped to ``settings.clamp_factor`` × the MLP output's norm. As in the reference code, at most
    ``settings.steps`` losses are evaluated and the loop ends before updating after the last of them (or
    once a loss is below ``loss_stop``): at most steps − 1 updates, and the δ returned is the one whose loss
    was recorded last.
    """
    rewrite_rows = [i for i in range(len(batch.rows)) if i != kl_row]
    initial = pre.outputs[0].detach()
    delta = torch.zeros_like(initial, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=settings.lr)
    max_norm = settings.clamp_factor * float(initial.norm())
    losses: list[float] = []

    def add_delta(output: torch.Tensor) -> torch.Tensor:
        added = torch.zeros_like(output)
        added[:, 0] = delta  # column 0 of the suffix is every row's subject-last token
        return output + added

    layout = loss_layout(batch, rewrite_rows, kl_row)
    with hooks.on_output(handle.arch.mlp_out(layer), add_delta), suffix_pass(handle, batch, layer, pre) as run:
        for step in range(settings.steps):
            loss = _value_loss(handle, layout, run(), pre, delta, initial, settings)
            losses.append(float(loss.detach()))
            if not torch.isfinite(loss):
                raise FloatingPointError("the value optimisation diverged (loss is not finite); try a lower learning rate")
            if losses[-1] < settings.loss_stop or step == settings.steps - 1:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                norm = float(delta.norm())
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    return ValueResult(delta=delta.detach(), steps=len(losses), losses=losses)


def _value_loss(
    handle: LoadedModel,
    layout: LossLayout,
    states: torch.Tensor,
    pre: Precomputed,
    delta: torch.Tensor,
    initial: torch.Tensor,
    settings: ValueSettings,
) -> torch.Tensor:
    """Target NLL + kl_factor × KL(p ‖ p₀) + the decay on δ (the paper's equation 4).

    p is the edited next-token distribution at the KL position, p₀ the unedited one: the reference code's
    ``kl_div(p₀, p, log_target=True)``, whose gradient flows through both factors of Σ p (log p − log p₀).
    """
    nll, kl_logprobs = read_losses(handle, layout, states)
    if pre.kl_reference is None:  # the first step's δ is zero: this is the unedited distribution
        pre.kl_reference = kl_logprobs.detach()
    kl = torch.sum(kl_logprobs.exp() * (kl_logprobs - pre.kl_reference))
    decay = settings.weight_decay * delta.norm() / initial.norm() ** 2
    return nll + settings.kl_factor * kl.float() + decay


# ---------------------------------------------------------------- the update


def rank_one_update(
    handle: LoadedModel,
    layer: int,
    key: torch.Tensor,
    value: torch.Tensor,
    moment: SecondMoment,
    shrinkage: float,
    lambda_key: torch.Tensor | None = None,
    lambda_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ, u) with u = C⁻¹k* and Λ = (v* − W k − b)/(uᵀk), so that ΔW = Λ uᵀ; float64 throughout.

    ``k`` is k* itself (the paper's equation) unless ``lambda_key`` (with the layer's output at it) is
    given, which is the original code's variant.
    """
    u = solve(moment, key, shrinkage)
    if lambda_key is None:
        with torch.no_grad():
            lambda_key = key
            lambda_output = handle.arch.mlp_out(layer)(key.unsqueeze(0).to(handle.device))[0]
    denominator = float(u @ lambda_key.double().cpu())
    if not np.isfinite(denominator) or abs(denominator) < 1e-12:
        raise FloatingPointError("the key is orthogonal to C⁻¹k*; the update is undefined (try another layer)")
    residual = value.double().cpu() - lambda_output.double().cpu()
    return residual / denominator, u


def scale_ladder(clamp: float) -> list[float]:
    """Multiples of δ tried in turn until the edit holds: 1, then ×1.1 while within the paper's clamp."""
    most = PAPER_SETTINGS["clamp_factor"] / clamp
    scales = [1.0]
    while scales[-1] * SCALE_STEP <= most * (1 + 1e-9):
        scales.append(scales[-1] * SCALE_STEP)
    return scales


def edit_holds(handle: LoadedModel, request: EditRequest, layer: int, right: torch.Tensor, left: torch.Tensor) -> bool:
    """Whether the model with ΔW = Λ uᵀ added prefers target_new after the edit's own prompt.

    Against target_true when the request has one, else against a probability of one half. A small δ
    can be realised too weakly at the bare prompt's key (its key is not k*): compute_rome then
    strengthens it (docs/evaluation.md).
    """
    from ..core.scoring import mean_nll

    u, lam = left.to(handle.device, torch.float32), right.to(handle.device, torch.float32)
    with torch.no_grad(), hooks.adding_to_output(handle.arch.mlp_out(layer), lambda x: (x.float() @ u).unsqueeze(-1) * lam):
        targets = [request.target_new] + ([request.target_true] if request.target_true else [])
        nll = mean_nll(handle, [(request.filled, target) for target in targets])
    return bool(nll[0] < nll[1]) if len(nll) > 1 else bool(nll[0] < math.log(2))


# ---------------------------------------------------------------- one ROME edit


@dataclass
class _Found:
    """The update kept: v*'s optimisation, the clamp and multiple of δ that gave it, and whether it holds."""

    result: ValueResult
    right: torch.Tensor
    left: torch.Tensor
    clamp: float
    tries: int
    scale: float
    holds: bool


def compute_rome(
    handle: LoadedModel,
    request: EditRequest,
    settings: EditSettings,
    prefixes: Sequence[str],
    moment: SecondMoment,
    progress: Progress,
) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Λ ("right"), u ("left"), the key Λ maps and v* ("key", "value"); the statistics used; seconds per phase."""
    phases: dict[str, float] = {}
    began = time.perf_counter()
    progress(0.2, "computing the key k*")
    templates = settings.templates if settings.templates is not None else context_templates(prefixes)
    batch, kl_row = _edit_batch(handle, request, templates)
    phases["context"] = time.perf_counter() - began
    began = time.perf_counter()
    pre = precompute(handle, batch, settings.layer)
    key = pre.keys[:kl_row].mean(0)  # the rows before the KL row are the context templates'
    phases["key"] = time.perf_counter() - began
    phases["value"] = phases["update"] = 0.0
    original = settings.method == "rome-original"
    lambda_args = (pre.keys[0], pre.outputs[0]) if original else ()

    def update(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rank_one_update(handle, settings.layer, key, pre.outputs[0] + delta, moment, settings.shrinkage, *lambda_args)

    found = _holding_update(handle, request, batch, pre, kl_row, settings, update, phases, progress)
    info = _rome_info(moment, settings, found)
    value = pre.outputs[0] + found.scale * found.result.delta
    mapped_key = pre.keys[0] if original else key
    vectors = {
        "right": found.right.numpy(),
        "left": found.left.numpy(),
        "key": mapped_key.double().cpu().numpy(),
        "value": value.double().cpu().numpy(),
    }
    return vectors, info, phases


def _edit_batch(handle: LoadedModel, request: EditRequest, templates: Sequence[str]) -> tuple[AlignedBatch, int]:
    """The aligned batch of the context templates filled with the request, then the KL prompt (its last row)."""
    new_ids = target_ids(handle, request.target_new)
    rows = [prompt_row(handle, template, request, new_ids) for template in templates]
    rows.append(prompt_row(handle, "{}", request, [], kl=True))
    batch = align(rows, pad_token(handle))
    context_keys_values(handle, batch)  # the templates' own tokens: computed once, reused by later edits
    return batch, len(rows) - 1


def _holding_update(
    handle: LoadedModel,
    request: EditRequest,
    batch: AlignedBatch,
    pre: Precomputed,
    kl_row: int,
    settings: EditSettings,
    update: Update,
    phases: dict[str, float],
    progress: Progress,
) -> _Found:
    """v* and the update it gives, strengthened until the edit holds on its own prompt where it can.

    An edit that does not hold (its key is not k*, so δ arrives there weakened) is strengthened along the
    same δ, in steps of 10%, up to the paper's clamp; only if that fails is v* optimised again, with the
    paper's clamp. Both keep ‖δ‖ as small as holding allows (docs/evaluation.md).
    """
    paper_clamp = PAPER_SETTINGS["clamp_factor"]
    clamps = [settings.value.clamp_factor]
    if settings.strengthen and clamps[0] < paper_clamp:
        clamps.append(paper_clamp)
    for tries, clamp in enumerate(clamps, start=1):
        began = time.perf_counter()
        again = f" again, ‖δ‖ up to {clamp:g}× the MLP output" if tries > 1 else ""
        progress(0.25 + 0.65 * (tries - 1) / len(clamps), "optimising the value v*" + again)
        result = optimise_value(handle, batch, settings.layer, pre, replace(settings.value, clamp_factor=clamp), kl_row)
        phases["value"] += time.perf_counter() - began
        began = time.perf_counter()
        for scale in scale_ladder(clamp) if settings.strengthen else [1.0]:
            right, left = update(scale * result.delta)
            holds = edit_holds(handle, request, settings.layer, right, left)
            if holds:
                break
        phases["update"] += time.perf_counter() - began
        if holds:
            break
    return _Found(result=result, right=right, left=left, clamp=clamp, tries=tries, scale=scale, holds=holds)


def _rome_info(moment: SecondMoment, settings: EditSettings, found: _Found) -> dict:
    """The edit's ``stats``: where C came from, and how v* was found."""
    result = found.result
    return {
        **moment.describe(),
        "settings": settings.settings,
        "strengthen": settings.strengthen,
        "shrinkage": settings.shrinkage,
        "value_steps": result.steps,
        "weight_decay": settings.value.weight_decay,
        "clamp_factor": found.clamp,
        "clamp_tries": found.tries,
        "delta_scale": found.scale,
        "holds": found.holds,
        "loss_stop": settings.value.loss_stop,
        "value_loss_initial": result.losses[0],
        "value_loss": result.losses[-1],
        "value_losses": [round(loss, 4) for loss in result.losses],
        "delta_norm_v": float(found.scale * result.delta.norm()),
    }
