"""The batch k* and v* work on, laid out so that only what changes is recomputed.

Every prompt's subject's last token sits in one column (``split``). A clean pass over the batch
(:func:`precompute`) leaves the keys and MLP outputs there, the keys/values of every column before
``split`` and the block outputs below the edited layer; each v* step (:func:`suffix_pass`) then runs only
the columns from ``split`` on, through the layers from the edited one up, replaying the rest.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..core import hooks
from ..core.generation import positions_from_mask
from ..core.kv_cache import key_value_cache
from ..core.models import LoadedModel
from ..core.prompts import tokenize_at
from .edits import EditRequest

KL_TEMPLATE = "{} is a"  # the prompt whose next-token distribution the KL term keeps

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, the attention keys and values of some columns


@dataclass
class PromptRow:
    """One prompt of the edit batch: its token ids and the subject's last token."""

    ids: list[int]
    subject_last: int
    targets: list[int]  # token ids predicted after the prompt (teacher-forced); empty for the KL row
    # Leading tokens that come from the template alone (BOS, a generated prefix and its full stop): the
    # same in every edit, so their keys and values are computed once (context_keys_values).
    context: int = 0


def prompt_row(handle: LoadedModel, template: str, request: EditRequest, targets: list[int], kl: bool = False) -> PromptRow:
    """``template`` (with one {}) filled with the request's prompt (or the KL prompt) and its subject."""
    inner = KL_TEMPLATE if kl else request.prompt
    text = template.format(inner)
    slot = text.index("{}")
    filled = text.replace("{}", request.subject, 1)
    tokenized = tokenize_at(handle.tokenizer, filled, request.subject, (slot, slot + len(request.subject)))
    ids = tokenized.input_ids[0].tolist()
    # The template's own text tokenised alone; where the filled prompt starts with the same tokens, those
    # do not depend on the request (a token merging into the prompt's first word is not among them).
    own = handle.tokenizer(template[: template.index("{}")].rstrip(), add_special_tokens=True, split_special_tokens=True)["input_ids"]
    context = 0
    while context < min(len(own), tokenized.subject_range[0]) and ids[context] == own[context]:
        context += 1
    return PromptRow(ids=ids + targets[:-1], subject_last=tokenized.subject_range[1] - 1, targets=targets, context=context)


@dataclass
class AlignedBatch:
    """Rows laid out so that every subject's last token sits at column ``split``.

    Columns ``[0, context)`` hold each row's template-only tokens, left-padded; columns ``[context,
    split)`` the rest before the subject's last token, left-padded too; the part from ``split`` on is
    right-padded. Positions count real tokens only. Columns before ``split`` never change during the v*
    optimisation, and those before ``context`` are the same in every edit with the same templates.
    """

    ids: torch.Tensor  # [rows, split + suffix]
    mask: torch.Tensor
    positions: torch.Tensor
    split: int
    rows: list[PromptRow]
    context: int = 0

    def column(self, row: int, position: int) -> int:
        """Column of the row's original token ``position`` (one at or after the row's context)."""
        last = self.rows[row].subject_last
        return self.split - last + position


def align(rows: list[PromptRow], pad_id: int) -> AlignedBatch:
    """Lay ``rows`` out as an :class:`AlignedBatch`."""
    context = max(row.context for row in rows)
    split = context + max(row.subject_last - row.context for row in rows)
    suffix = max(len(row.ids) - row.subject_last for row in rows)
    ids = torch.full((len(rows), split + suffix), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, context - row.context : context] = torch.tensor(row.ids[: row.context], dtype=torch.long)
        mask[i, context - row.context : context] = 1
        begin = split - (row.subject_last - row.context)
        ids[i, begin : begin + len(row.ids) - row.context] = torch.tensor(row.ids[row.context :])
        mask[i, begin : begin + len(row.ids) - row.context] = 1
    return AlignedBatch(ids=ids, mask=mask, positions=positions_from_mask(mask), split=split, rows=rows, context=context)


@dataclass
class Precomputed:
    """What the clean pass over the aligned batch leaves for the optimisation steps."""

    keys: torch.Tensor  # [rows, in]: W's input at each subject's last token
    outputs: torch.Tensor  # [rows, out]: W's output there
    below: list[Any]  # block outputs of layers < layer, suffix columns only (replayed)
    prefix_kv: KeysValues  # per layer, keys/values of the columns before split
    kl_reference: torch.Tensor | None = None  # log-probabilities after the KL prompt, unedited (first step)


def precompute(handle: LoadedModel, batch: AlignedBatch, layer: int) -> Precomputed:
    """Keys, outputs, the frozen block outputs and the prefix cache, from short passes.

    The columns before ``split`` run through every layer once (their keys/values are replayed in each
    step), the template-only context columns among them once for as long as the templates and weights
    stay the same (:func:`context_keys_values`); the suffix columns run only up to the edited layer (the
    layers above are what each step computes). The KL reference is left to the first step, whose δ is
    still zero.
    """
    arch, device = handle.arch, handle.device
    split, context = batch.split, batch.context
    prefix_kv = context_keys_values(handle, batch)
    with torch.no_grad():
        if split > context:
            prefix_kv = _columns_keys_values(handle, batch, context, split, prefix_kv)
        blocks = {str(l): arch.block(l) for l in range(layer)}
        with hooks.capture_inputs({"k": arch.mlp_out(layer)}) as keys, hooks.capture_outputs(
            {"v": arch.mlp_out(layer)}
        ) as values, hooks.capture_outputs(blocks, raw=True) as raw, hooks.stopping_after(arch.mlp_out(layer)):
            arch.backbone(
                input_ids=batch.ids[:, split:].to(device),
                attention_mask=batch.mask.to(device),
                position_ids=batch.positions[:, split:].to(device),
                past_key_values=prefix_cache(handle, prefix_kv),
                use_cache=True,
            )
    return Precomputed(
        keys=keys["k"][:, 0],
        outputs=values["v"][:, 0],
        below=[raw[str(l)] for l in range(layer)],
        prefix_kv=prefix_kv,
    )


def context_keys_values(handle: LoadedModel, batch: AlignedBatch) -> KeysValues:
    """Per layer, the keys/values of the batch's context columns (empty without any), kept for the next edit.

    They depend only on the context tokens and the weights: they are kept for the tokens and the model's
    weights state (which every :meth:`EditSession.applied` block sets anew, :meth:`Weights.current <explorer.core.weights.Weights.current>`), so an edit computed while
    another is applied never reuses values from the unedited model, nor the other way round.
    """
    if not batch.context:
        return []
    key = tuple(tuple(row.ids[: row.context]) for row in batch.rows)

    def compute() -> KeysValues:
        with torch.no_grad():
            return _columns_keys_values(handle, batch, 0, batch.context, [])

    return handle.weights.current(key, compute)


def _columns_keys_values(handle: LoadedModel, batch: AlignedBatch, start: int, stop: int, earlier: KeysValues) -> KeysValues:
    """Per layer, the keys/values of columns ``[0, stop)``: those of ``[0, start)`` are ``earlier``, the rest run."""
    device = handle.device
    out = handle.arch.backbone(
        input_ids=batch.ids[:, start:stop].to(device),
        attention_mask=batch.mask[:, :stop].to(device),
        position_ids=batch.positions[:, start:stop].to(device),
        past_key_values=prefix_cache(handle, earlier) if earlier else None,
        use_cache=True,
    )
    return [(layer_cache.keys, layer_cache.values) for layer_cache in out.past_key_values.layers]


def prefix_cache(handle: LoadedModel, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A fresh key/value cache holding the prefix columns (each pass extends its own copy)."""
    return key_value_cache(handle.model.config, prefix_kv)


@contextmanager
def replaying_below(handle: LoadedModel, outputs: Sequence[Any]) -> Iterator[None]:
    """Blocks 0..len(outputs)-1 skip their computation and return these recorded outputs."""
    with ExitStack() as stack:
        for layer, output in enumerate(outputs):
            stack.enter_context(hooks.bypass(handle.arch.block(layer), lambda *a, _v=output, **k: _v))
        yield


@contextmanager
def suffix_pass(
    handle: LoadedModel, batch: AlignedBatch, layer: int, pre: Precomputed
) -> Iterator[Callable[[], torch.Tensor]]:
    """A function running the suffix columns from ``layer`` up; returns their final-normed states."""
    arch, device = handle.arch, handle.device

    def run() -> torch.Tensor:
        out = arch.backbone(
            input_ids=batch.ids[:, batch.split :].to(device),
            attention_mask=batch.mask.to(device),
            position_ids=batch.positions[:, batch.split :].to(device),
            past_key_values=prefix_cache(handle, pre.prefix_kv),
            use_cache=True,
        )
        return out.last_hidden_state

    with replaying_below(handle, pre.below):
        yield run
