"""The batched pass: every cell restoring one token, in one forward pass that skips what cannot change.

The straightforward algorithm (``reference.py``) reruns the whole model for every cell. One batched
pass holds ``samples`` rows per cell and skips the work whose result is already known: positions before
the restored token take their keys and values from the corrupted run's cache; rows are ordered by the
block where their cell's computation begins, so each block computes only a leading slice of rows and
hands the corrupted run's recorded output on for the rest; a row whose cell agrees with an earlier cell
below some block enters there with that cell's state; outputs that still equal the corrupted run's are
copied from it; MLP outputs that a restoration overwrites are not computed, nor the last block's MLP off
the last position.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from typing import Any

import torch

from ..core import hooks
from ..core.kv_cache import key_value_cache
from ..core.models import LoadedModel
from .plan import Cell, plan_pass
from .runs import CleanAndCorrupted


def run_pass(handle: LoadedModel, runs: CleanAndCorrupted, group: list[Cell]) -> torch.Tensor:
    """One batched pass for cells that restore the same token: the last position's final states
    (``samples`` rows per cell, in the order given)."""
    return BatchedPass(handle, runs, group).run()


class BatchedPass:
    """One forward pass for cells that restore the same token.

    Rows are ordered by where their computation begins (:func:`plan_pass`), so block ``l`` computes only
    a leading slice of rows; the rows after it are still equal to the corrupted run there and take its
    recorded output, and a row entering from a donor takes the donor's state. A *fresh* row (its input at
    its entry block is the corrupted run's) can differ there only at the restored token and only after the
    state its cell sets: its attention output is the corrupted run's everywhere, and so is its MLP output
    away from the token. Those are copied instead of computed, as are MLP outputs a cell overwrites anyway
    and, in the last block, MLP outputs off the last position (only that one reaches the logits).

    The pass replaces each block's, attention's and MLP's ``forward`` for its duration
    (:func:`hooks.bypass`) and writes restored and frozen states with output hooks.
    """

    def __init__(self, handle: LoadedModel, runs: CleanAndCorrupted, group: list[Cell]):
        self.handle, self.runs = handle, runs
        self.samples, self.num_layers = runs.samples, handle.num_layers
        self.plan = plan_pass(group, self.num_layers)
        self.cells = [group[i] for i in self.plan.order]  # one per row slot
        self.token = self.cells[0].token
        # Positions before the restored token are equal in every row and the corrupted run: with that run's
        # keys and values cached, they are not recomputed at all.
        self.prefix = self.token if runs.kv is not None else 0
        self.copies = len(self.cells)
        self.position = self.token - self.prefix  # index of the restored token within the recomputed positions
        self.length = runs.prompt.length - self.prefix  # positions recomputed

    def run(self) -> torch.Tensor:
        """The last position's final states, ``samples`` rows per cell in the order the cells were given."""
        arch = self.handle.arch
        with torch.no_grad(), ExitStack() as stack:
            for layer in range(self.num_layers):
                self._replace_forwards(stack, layer)
            for (kind, layer), entries in self.edits().items():
                stack.enter_context(hooks.on_output(arch.state_module(kind, layer), partial(self._write, entries)))
            out = arch.backbone(**self._inputs())
        return self._in_given_order(out.last_hidden_state[:, -1])

    def _rows(self, slot: int) -> slice:
        """The rows of a slot: one per noise sample."""
        return slice(slot * self.samples, (slot + 1) * self.samples)

    def active_rows(self, layer: int) -> int:
        """Rows block ``layer`` computes: those of cells that entered at or below it (a leading slice)."""
        return self.samples * sum(1 for first in self.plan.entry if first <= layer)

    def computed_rows(self, layer: int) -> int:
        """Rows whose attention block ``layer`` computes: the active ones that are not fresh there."""
        plan = self.plan
        return self.samples * sum(1 for first, fresh in zip(plan.entry, plan.fresh) if first < layer or (first == layer and not fresh))

    def edits(self) -> dict[tuple[str, int], list[tuple[slice, torch.Tensor]]]:
        """Per (kind, layer) module: the rows to overwrite at the restored token and the values to write there.

        A row entering from a donor takes the donor's state there, which already carries every change
        below its entry; below it, the modules do not compute that row at all.
        """
        edits: dict[tuple[str, int], list[tuple[slice, torch.Tensor]]] = {}
        for slot, cell in enumerate(self.cells):
            below = self.plan.entry[slot] if self.plan.donor[slot] is not None else 0
            for kind, layer in cell.restores:
                if layer >= below:
                    edits.setdefault((kind, layer), []).append((self._rows(slot), self.runs.clean[kind][layer][self.token]))
            for kind, layer in cell.freezes:
                if layer >= below:
                    edits.setdefault((kind, layer), []).append((self._rows(slot), self.runs.corrupted[kind][layer][:, self.token]))
        return edits

    def _write(self, entries: list[tuple[slice, torch.Tensor]], output: torch.Tensor) -> torch.Tensor:
        """``output`` with each entry's rows set to its value at the restored token (written into a copy,
        leaving the module's own tensor as it was)."""
        output = output.clone()
        for rows, value in entries:
            output[rows, self.position] = value
        return output

    def _replace_forwards(self, stack: ExitStack, layer: int) -> None:
        """Swap in block ``layer``'s forward and, where some rows need not compute them, its attention's and MLP's."""
        arch = self.handle.arch
        block, attn, mlp = arch.block(layer), arch.attn(layer), arch.mlp(layer)
        stack.enter_context(hooks.bypass(block, partial(self.block_forward, layer, block.forward)))
        active = self.active_rows(layer)
        if active and self.computed_rows(layer) < active:
            stack.enter_context(hooks.bypass(attn, partial(self.attention_forward, layer, attn.forward)))
        tokens = self.mlp_tokens(layer) if active else None
        if tokens is not None:
            stack.enter_context(hooks.bypass(mlp, partial(self.mlp_forward, layer, mlp.forward, tokens)))

    def block_forward(self, layer: int, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Block ``layer`` on its active rows only; the rows after them are handed on as the corrupted run's.

        The next block reads only its own active rows (the last block's output is read whole), so only those
        are handed on: rows that have not entered yet still equal the corrupted run there. The first block
        gets every row; later ones get what the block below handed on.
        """
        samples = self.samples
        active = self.active_rows(layer)
        handed_on = self.active_rows(layer + 1) if layer + 1 < self.num_layers else self.copies * samples
        corrupted = self.runs.corrupted["hidden"][layer][:, self.prefix :]
        if active == 0:
            return hooks.with_first_tensor(self.runs.block_template[layer], corrupted.repeat(handed_on // samples, 1, 1))
        args, kwargs = self._with_donor_states(layer, args, kwargs)
        output = _forward_leading(forward, args, kwargs, layer, self.copies * samples, active)
        if active < handed_on:
            output = _followed_by(output, corrupted.repeat((handed_on - active) // samples, 1, 1))
        return output

    def _with_donor_states(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The block's inputs with each row entering at ``layer`` from a donor set to the donor's state.

        Below ``layer`` both cells set the same states, so the donor's computed state is the entering
        row's too: the entering row skipped those blocks and so far holds the corrupted run's state.
        """
        plan = self.plan
        entering = [(slot, donor) for slot, donor in enumerate(plan.donor) if donor is not None and plan.entry[slot] == layer]
        if not entering:
            return args, kwargs
        states = (args[0] if args else kwargs["hidden_states"]).clone()
        for slot, donor in entering:
            states[self._rows(slot)] = states[self._rows(donor)]
        if args:
            return (states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": states}

    def attention_forward(self, layer: int, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Attention of block ``layer`` on the rows that are not fresh; fresh rows take the corrupted run's.

        A fresh row's input still equals the corrupted run's at every position (its cell changes nothing
        below this block's outputs), so its attention output does too.
        """
        active, computed = self.active_rows(layer), self.computed_rows(layer)
        copied = self.runs.corrupted["attn"][layer][:, self.prefix :].repeat((active - computed) // self.samples, 1, 1)
        if computed == 0:
            return hooks.with_first_tensor(self.runs.attn_template[layer], copied)
        return _followed_by(_forward_leading(forward, args, kwargs, layer, active, computed), copied)

    def mlp_tokens(self, layer: int) -> torch.Tensor | None:
        """Flat (row, position) indices whose MLP output block ``layer`` must compute; None: all of them.

        A fresh row differs from the corrupted run only at its token; an output the cell overwrites at its
        token is never read; in the last block only the last position reaches the logits.
        """
        active, computed = self.active_rows(layer), self.computed_rows(layer)
        need = torch.ones(active, self.length, dtype=torch.bool)
        need[computed:] = False
        need[computed:, self.position] = True
        if layer == self.num_layers - 1:
            need[:, : self.length - 1] = False
        for slot in range(active // self.samples):
            if self.plan.overwrites_mlp_output(slot, layer):
                need[self._rows(slot), self.position] = False
        return None if bool(need.all()) else need.flatten().nonzero()[:, 0]

    def mlp_forward(self, layer: int, forward: Callable[..., Any], tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The MLP of block ``layer`` at the ``tokens`` (flat indices) only; fresh rows' other positions are
        the corrupted run's, and the rest is left at zero: it is overwritten at the cell's token, or off the
        last position in the last block, where nothing reads it."""
        active, computed = self.active_rows(layer), self.computed_rows(layer)
        copied = self.runs.corrupted["mlp"][layer][:, self.prefix :].repeat((active - computed) // self.samples, 1, 1)
        flat = states.reshape(-1, states.shape[-1])
        computed_out = forward(flat.index_select(0, tokens.to(flat.device)).unsqueeze(0))[0]
        out = computed_out.new_zeros(active, self.length, computed_out.shape[-1])
        out[computed:] = copied
        out.view(-1, out.shape[-1]).index_copy_(0, tokens.to(out.device), computed_out)
        return out

    def _inputs(self) -> dict[str, Any]:
        """The backbone's arguments: the corrupted embeddings of the recomputed positions, once per cell,
        after the corrupted run's keys and values of the positions before them."""
        embeds = self.runs.corrupted_embeds[:, self.prefix :].repeat(self.copies, 1, 1)
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "use_cache": self.prefix > 0}
        if self.prefix > 0:
            kwargs["past_key_values"] = _prefix_cache(self.handle, self.runs, self.prefix, self.copies)
        return kwargs

    def _in_given_order(self, final: torch.Tensor) -> torch.Tensor:
        """``final`` (rows in slot order) with its rows put back in the order the cells were given."""
        samples = self.samples
        back = torch.empty(self.copies * samples, dtype=torch.long)
        for slot, index in enumerate(self.plan.order):
            back[index * samples : (index + 1) * samples] = torch.arange(slot * samples, (slot + 1) * samples)
        return final[back.to(final.device)]


def _forward_leading(forward: Callable[..., Any], args: tuple, kwargs: dict, layer: int, rows: int, keep: int) -> Any:
    """``forward`` (of block ``layer`` or a module in it) on the first ``keep`` of ``rows`` rows.

    Every batch-first argument is cut to those rows, and so are the key/value cache's entries for
    ``layer`` (the module appends this pass's keys/values to them).
    """
    if keep < rows:
        args, kwargs = _leading(args, rows, keep), _leading(kwargs, rows, keep)
        for cache in [*args, *kwargs.values()]:
            if hasattr(cache, "layers") and hasattr(cache, "update"):
                entry = cache.layers[layer]
                entry.keys, entry.values = entry.keys[:keep], entry.values[:keep]
    return forward(*args, **kwargs)


def _followed_by(output: Any, rows: torch.Tensor) -> Any:
    """``output`` with ``rows`` appended after the rows of its first tensor."""
    return hooks.with_first_tensor(output, torch.cat([hooks.first_tensor(output), rows]))


def _leading(value: Any, rows: int, keep: int) -> Any:
    """``value`` with every batch-first tensor in it (2-D or more, ``rows`` long) cut to its first ``keep`` rows."""
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.dim() >= 2 and value.shape[0] == rows else value
    if isinstance(value, tuple):
        return tuple(_leading(item, rows, keep) for item in value)
    if isinstance(value, list):
        return [_leading(item, rows, keep) for item in value]
    if isinstance(value, dict):
        return {key: _leading(item, rows, keep) for key, item in value.items()}
    return value


def _prefix_cache(handle: LoadedModel, runs: CleanAndCorrupted, prefix: int, copies: int):
    """A key/value cache holding the corrupted run's first ``prefix`` positions, once per cell."""
    return key_value_cache(handle.model.config, [(keys[:, :, :prefix].repeat(copies, 1, 1, 1), values[:, :, :prefix].repeat(copies, 1, 1, 1))
                                                 for keys, values in runs.kv])
