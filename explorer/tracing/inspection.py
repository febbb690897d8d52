"""A look inside one cell of a trace: what the restored state says (logit lens) and what restoring it does.

For a cell (kind, token, layer) the residual stream at that token after that layer's block is read out
as next-token predictions (the final norm and the unembedding applied to it: the "logit lens") in the
clean run, in the corrupted runs, and in the corrupted runs with the cell restored (for a window kind,
the window's MLP or attention outputs at the token, as the trace restores them). Also the model's own
predictions after the whole prompt with the cell restored, and the answer's probability with the
restoration (the cell's score in the trace) and without it (the trace's low score).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch

from ..core import hooks
from ..core.errors import InputError
from ..core.models import LoadedModel
from ..core.prompts import is_whole_number
from . import (
    DEFAULT_LIMITS,
    KINDS,
    TraceLimits,
    TraceOptions,
    run_clean_and_corrupted,
    validated_inputs,
    window_layers,
)

TOP = 5  # predictions listed per read-out


@dataclass
class CellInspection:
    """Read-outs of one cell; each prediction list holds (token, probability) pairs, most likely first."""

    kind: str
    token: int
    layer: int
    token_text: str
    restored_layers: list[int]
    answer: str
    lens_clean: list[tuple[str, float]]
    lens_corrupted: list[tuple[str, float]]
    lens_restored: list[tuple[str, float]]
    output_restored: list[tuple[str, float]]
    answer_clean: float
    answer_corrupted: float
    answer_restored: float

    def to_json(self) -> dict:
        """Plain values (the CLI's ``--inspect`` output)."""
        return asdict(self)


def _top(handle: LoadedModel, probabilities: torch.Tensor, count: int = TOP) -> list[tuple[str, float]]:
    values, ids = probabilities.topk(count)
    return [(handle.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]


def _lens(handle: LoadedModel, states: torch.Tensor) -> torch.Tensor:
    """Mean next-token distribution read out from residual states [rows, hidden] (final norm, unembedding)."""
    logits = handle.arch.logits(handle.arch.final_norm(states)).double()
    return torch.softmax(logits, dim=-1).mean(0)


def parse_cell(text: str, num_tokens: int | None = None, num_layers: int | None = None) -> tuple[str, int, int]:
    """(kind, token, layer) from ``"kind,token,layer"`` (what a click on a heatmap sends), checked."""
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != 3 or parts[0] not in KINDS or not all(part.lstrip("-").isdigit() for part in parts[1:]):
        raise InputError(f"a cell is 'kind,token,layer' with kind one of {', '.join(KINDS)}, e.g. 'mlp,4,6'; got {str(text)[:40]!r}")
    return parts[0], int(parts[1]), int(parts[2])


def inspect_cell(
    handle: LoadedModel,
    prompt: str,
    subject: str | None,
    kind: str,
    token: int,
    layer: int,
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
) -> CellInspection:
    """The read-outs of cell (``kind``, ``token``, ``layer``) of the trace of ``prompt`` with ``options``."""
    tokenized, _guessed, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    if kind not in KINDS:
        raise InputError(f"unknown kind {kind!r}: choose from {', '.join(KINDS)}")
    if not (is_whole_number(token) and 0 <= token < tokenized.length):
        raise InputError(f"token {token} is out of range; this prompt has tokens 0 to {tokenized.length - 1}")
    if not (is_whole_number(layer) and 0 <= layer < handle.num_layers):
        raise InputError(f"layer {layer} is out of range; this model has layers 0 to {handle.num_layers - 1}")
    arch = handle.arch
    restored = [layer] if kind == "hidden" else list(window_layers(layer, options.window, handle.num_layers))
    with handle.weights.locked(), torch.no_grad():
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)

        def restore(clean_state: torch.Tensor):
            def replace(output: torch.Tensor) -> torch.Tensor:
                output = output.clone()
                output[:, token] = clean_state[token].to(output.dtype)
                return output

            return replace

        with ExitStack() as stack:
            for restored_layer in restored:
                module = arch.state_module(kind, restored_layer)
                stack.enter_context(hooks.on_output(module, restore(runs.clean[kind][restored_layer])))
            seen = stack.enter_context(hooks.capture_outputs({"state": arch.block(layer)}))
            final = arch.backbone(inputs_embeds=runs.corrupted_embeds, use_cache=False).last_hidden_state[:, -1]
        output = torch.softmax(arch.logits(final).double(), dim=-1).mean(0)
        clean_state = runs.clean["hidden"][layer][token].unsqueeze(0)
        lens_clean, lens_corrupted = _lens(handle, clean_state), _lens(handle, runs.corrupted["hidden"][layer][:, token])
        lens_restored = _lens(handle, seen["state"][:, token])
    return CellInspection(
        kind=kind,
        token=token,
        layer=layer,
        token_text=tokenized.tokens[token],
        restored_layers=restored,
        answer=handle.tokenizer.decode([runs.answer_id]),
        lens_clean=_top(handle, lens_clean),
        lens_corrupted=_top(handle, lens_corrupted),
        lens_restored=_top(handle, lens_restored),
        output_restored=_top(handle, output),
        answer_clean=runs.high_score,
        answer_corrupted=runs.low_score,
        answer_restored=float(output[runs.answer_id]),
    )
