"""Cells (one restoration experiment each) and the plan of one batched pass over a token's cells."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core.prompts import TokenizedPrompt


@dataclass(frozen=True)
class Cell:
    """One restoration experiment: restore ``restores`` at ``token``, hold ``freezes`` at corrupted values.

    ``start`` is the first block that must be recomputed; blocks below it output their corrupted values.
    """

    token: int
    start: int
    restores: tuple[tuple[str, int], ...]
    freezes: tuple[tuple[str, int], ...] = ()


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """Layers restored for a window kind centred on ``layer``: ``[max(0, l - w//2), min(L, l - (-w//2)))``."""
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


def cells_for_kind(kind: str, prompt: TokenizedPrompt, num_layers: int, window: int) -> dict[tuple[int, int], Cell]:
    """Every (token, layer) cell of ``kind`` that can differ from the corrupted run."""
    cells = {}
    first_affected = prompt.subject_range[0]  # earlier tokens are identical in the clean and corrupted runs
    last_token = prompt.length - 1
    for token in range(first_affected, prompt.length):
        for layer in range(num_layers):
            if kind == "hidden":
                if layer == num_layers - 1 and token != last_token:
                    continue  # the last block's output elsewhere never reaches the last position's logits
                cells[(token, layer)] = Cell(token, layer + 1, (("hidden", layer),))
            else:
                layers = window_layers(layer, window, num_layers)
                cells[(token, layer)] = Cell(token, layers.start, tuple((kind, k) for k in layers))
    return cells


def severed_cells(prompt: TokenizedPrompt, num_layers: int, severed_kind: str | None) -> dict[int, Cell]:
    """Hidden-state restoration at the last subject token, with ``severed_kind`` outputs frozen above it."""
    token = prompt.subject_range[1] - 1
    cells = {}
    for layer in range(num_layers):
        freezes = () if severed_kind is None else tuple((severed_kind, k) for k in range(layer + 1, num_layers))
        cells[layer] = Cell(token, layer + 1, (("hidden", layer),), freezes)
    return cells


@dataclass(frozen=True)
class PassPlan:
    """The rows of one batched pass: which cell each row slot holds, and where its computation begins."""

    order: list[int]  # cell index per row slot, sorted by entry, then fresh after not fresh
    entry: list[int]  # per slot: the first block computed for it
    donor: list[int | None]  # per slot: the earlier slot whose state it takes on entry (None: the corrupted run's)
    fresh: list[bool]  # per slot: its input at its entry block is still the corrupted run's (nothing changed below)
    changes: list[list[frozenset]]  # per slot and layer: the states its cell sets there (_changes)

    def overwrites_mlp_output(self, slot: int, layer: int) -> bool:
        """Whether the slot's cell sets a state at its token that makes block ``layer``'s MLP output there moot."""
        return bool(_OVERWRITE_MLP_OUTPUT & self.changes[slot][layer])


def plan_pass(cells: Sequence[Cell], num_layers: int) -> PassPlan:
    """Order the cells of one token's pass, letting cells share the blocks where they agree.

    A cell computes from its ``start``; but when an earlier cell restores and freezes exactly the same
    states in every block below some block ``f`` (windows clipped at layer 0 differ only at their ends),
    both have the same state up to ``f``: the later cell enters at ``f`` with the earlier one's state.
    """
    signatures = [_changes(cell, num_layers) for cell in cells]
    by_start = sorted(range(len(cells)), key=lambda i: (cells[i].start, max((l for _k, l in cells[i].restores), default=0)))
    entry: dict[int, int] = {}
    donor: dict[int, int | None] = {}
    for index in by_start:
        entry[index], donor[index] = cells[index].start, None
        for other in entry:
            if other == index:
                continue
            # Cells that agree everywhere (windows wider than the model) still compute the last block, where
            # their final state is read.
            agree = next((l for l in range(num_layers) if signatures[index][l] != signatures[other][l]), num_layers - 1)
            if agree > entry[index] and entry[other] < agree:
                entry[index], donor[index] = agree, other
    fresh = {i: donor[i] is None and not any(signatures[i][:entry[i]]) for i in entry}
    order = sorted(range(len(cells)), key=lambda i: (entry[i], fresh[i]))
    slot = {index: position for position, index in enumerate(order)}
    return PassPlan(
        order=order,
        entry=[entry[i] for i in order],
        donor=[None if donor[i] is None else slot[donor[i]] for i in order],
        fresh=[fresh[i] for i in order],
        changes=[signatures[i] for i in order],
    )


# States a cell sets at its token that make the block's MLP output there irrelevant: the MLP output itself,
# or the block output it is added into.
_OVERWRITE_MLP_OUTPUT = frozenset({("mlp", "restore"), ("mlp", "freeze"), ("hidden", "restore"), ("hidden", "freeze")})


def _changes(cell: Cell, num_layers: int) -> list[frozenset]:
    """Per layer, the (kind, "restore"/"freeze") states the cell sets at its token."""
    per_layer: list[set] = [set() for _ in range(num_layers)]
    for kind, layer in cell.restores:
        per_layer[layer].add((kind, "restore"))
    for kind, layer in cell.freezes:
        per_layer[layer].add((kind, "freeze"))
    return [frozenset(layer) for layer in per_layer]
