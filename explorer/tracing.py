"""Causal tracing: how much of the answer's probability comes back when one state is restored.

A trace makes one clean run and ``samples`` corrupted runs (noise on the subject's
token embeddings), then, for every cell (token, layer) of each *kind*, restores the
clean state in the corrupted runs and measures the answer's mean probability.

The straightforward algorithm reruns the whole model for every cell. This engine
skips the work that cannot change: the clean and corrupted runs are made once;
blocks below a cell's first restored layer are not rerun (their corrupted outputs
are cached); positions before the restored token are not rerun (their keys and
values come from the corrupted run's cache); cells before the subject, and
final-layer hidden cells off the last token, restore a state equal to the
corrupted one; all cells restoring one token share one batched pass, in which each
block computes only the rows of cells that start at or below it; in a cell's first
block, outputs that still equal the corrupted run's are copied from it; MLP outputs
that a restoration overwrites are not computed, nor the last block's MLP off the last
position; and the unembedding runs once, at the last position only, over all cells
together.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import hooks, offload
from .kv_cache import key_value_cache
from .models import LoadedModel, derived, own_weights
from .progress import Progress, no_progress, part_of
from .prompts import InputError, TokenizedPrompt, clean_text, guess_subject, is_whole_number, tokenize_prompt

KINDS = ("hidden", "mlp", "attn")
# The answer's softmax runs over blocks of this many vocabulary entries (see answer_probabilities).
VOCAB_BLOCK = 2048  # 8192: 7% slower on 4,620 rows of the default model (2 threads, one run)
# A streamed trace scores its restored states in batches of at least this many rows: the unembedding is
# bound by memory below a few hundred rows, so scoring each small pass alone would cost more.
STREAM_ROWS = 512


@dataclass(frozen=True)
class TraceLimits:
    """Caps that keep one request bounded (a public Space serves many users)."""

    max_prompt_tokens: int = 64
    max_samples: int = 50
    max_window: int = 64
    max_noise: float = 100.0


DEFAULT_LIMITS = TraceLimits()


@dataclass(frozen=True)
class TraceOptions:
    """What to trace and how; the defaults are the paper's."""

    kinds: tuple[str, ...] = KINDS
    samples: int = 10
    window: int = 10
    noise: float = 3.0  # multiple of the subject-embedding standard deviation
    seed: int = 1
    target: str | None = None  # None: the clean run's top-1 token
    memory_mb: int = 1024  # cap for batched activations; larger prompts or models fall back to smaller batches


@dataclass
class TraceResult:
    """Everything a trace measured, as plain values and numpy arrays ``scores[kind][token, layer]``."""

    model: str
    prompt: str
    subject: str
    subject_guessed: bool
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    high_score: float
    low_score: float
    scores: dict[str, np.ndarray]
    noise: float
    noise_std: float
    samples: int
    window: int
    seed: int
    seconds: float
    num_layers: int = 0
    method: str = "exact"  # "exact" (every cell restored) or "atp" (estimated by attribution patching)

    def indirect_effect(self, kind: str) -> np.ndarray:
        """Score minus the corrupted run's score, per cell."""
        return self.scores[kind] - self.low_score


@dataclass
class CleanAndCorrupted:
    """The two runs every cell starts from, made once per trace."""

    prompt: TokenizedPrompt
    answer_id: int
    high_score: float
    low_score: float
    noise_std: float
    corrupted_embeds: torch.Tensor  # (samples, n, d): embedding output with noise on the subject
    clean: dict[str, list[torch.Tensor]]  # kind -> per layer (n, d)
    corrupted: dict[str, list[torch.Tensor]]  # kind -> per layer (samples, n, d)
    block_template: list[Any]  # one block output per layer, to mimic its structure when skipping it
    attn_template: list[Any]  # one attention output per layer, likewise
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # corrupted keys/values per layer, or None
    samples: int


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


def subject_noise(samples: int, n_subject_tokens: int, hidden: int, seed: int) -> np.ndarray:
    """The noise added to the subject's embeddings, drawn as ROME's reference code does (unit variance)."""
    return np.random.RandomState(seed).randn(samples, n_subject_tokens, hidden)


def embedding_std(handle: LoadedModel, subjects: Sequence[str] | None = None) -> float:
    """σ: standard deviation of the embedding-output vectors of subject tokens (cached per model)."""
    if subjects is None:
        from .facts import load_facts

        every_subject = sorted({fact.subject for fact in load_facts()})
        return derived(handle, ("embedding_std",), lambda: embedding_std(handle, every_subject))
    ids = []
    for subject in subjects:
        ids.extend(handle.tokenizer(subject, add_special_tokens=False)["input_ids"])
    with own_weights(handle), torch.no_grad():
        vectors = handle.arch.embedding(torch.tensor([ids], device=handle.device))
    return float(vectors.double().std())  # float64: a sum over ~10^5 values loses digits in float32


def validate_options(options: TraceOptions, limits: TraceLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`InputError` for options no trace can run with."""
    unknown = [kind for kind in options.kinds if kind not in KINDS]
    if unknown or not options.kinds:
        raise InputError(f"unknown kind {unknown[0] if unknown else '(none)'!r}: choose from {', '.join(KINDS)}")
    if not 1 <= options.samples <= limits.max_samples:
        raise InputError(f"samples must be between 1 and {limits.max_samples}, got {options.samples}")
    if not 1 <= options.window <= limits.max_window:
        raise InputError(f"window must be between 1 and {limits.max_window}, got {options.window}")
    if not (np.isfinite(options.noise) and 0 < options.noise <= limits.max_noise):
        raise InputError(f"noise must be above 0 and at most {limits.max_noise}, got {options.noise}")
    if not (is_whole_number(options.seed) and 0 <= options.seed < 2**32):
        raise InputError(f"seed must be a whole number from 0 to {2**32 - 1}, got {options.seed!r}"[:200])
    if options.target is not None and options.target != "":
        clean_text(options.target, "target")


def prepare_prompt(
    handle: LoadedModel, prompt: str, subject: str | None, limits: TraceLimits = DEFAULT_LIMITS
) -> tuple[TokenizedPrompt, bool]:
    """Tokenise the prompt and locate the subject, guessing it when not given; also says if it was guessed."""
    prompt = clean_text(prompt, "prompt")
    guessed = subject is None or not str(subject).strip()
    if guessed:
        subject = guess_subject(prompt)
    cap = limits.max_prompt_tokens
    if handle.max_context:
        cap = min(cap, handle.max_context)
    return tokenize_prompt(handle.tokenizer, prompt, subject, max_tokens=cap), guessed


def answer_token(handle: LoadedModel, target: str | None) -> int | None:
    """The first token of ``target`` (no special tokens), or None to use the clean top-1."""
    if target is None or target == "":
        return None
    ids = handle.tokenizer(clean_text(target, "target"), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"target {target!r} has no tokens; type the expected answer, e.g. ' Paris'")
    return int(ids[0])


def run_clean_and_corrupted(
    handle: LoadedModel, prompt: TokenizedPrompt, options: TraceOptions, noise_std: float
) -> CleanAndCorrupted:
    """Make the clean run and the corrupted runs, recording every state the cells need."""
    arch, n_layers = handle.arch, handle.num_layers
    device = handle.device
    input_ids = prompt.input_ids.to(device)
    start, end = prompt.subject_range
    names = {f"{kind}.{layer}": arch.state_module(kind, layer) for kind in KINDS for layer in range(n_layers)}
    with torch.no_grad(), hooks.capture_outputs(names) as clean_states:
        clean_out = arch.backbone(input_ids=input_ids, use_cache=False)
        clean = {kind: [clean_states[f"{kind}.{layer}"][0] for layer in range(n_layers)] for kind in KINDS}
    with torch.no_grad():
        # Record each block's raw output once, to reproduce its structure (tensor or tuple) when skipping it.
        blocks = {str(layer): arch.block(layer) for layer in range(n_layers)}
        blocks.update({f"attn.{layer}": arch.attn(layer) for layer in range(n_layers)})
        embeds = arch.embedding(input_ids).repeat(options.samples, 1, 1)
        noise = subject_noise(options.samples, end - start, embeds.shape[-1], options.seed)
        embeds[:, start:end] += noise_std * torch.from_numpy(noise).to(embeds.device, embeds.dtype)
        with hooks.capture_outputs(names) as corrupted_states, hooks.capture_outputs(blocks, raw=True) as raw:
            corrupted_out = arch.backbone(inputs_embeds=embeds, use_cache=True)
        block_template = [raw[str(layer)] for layer in range(n_layers)]
        attn_template = [raw[f"attn.{layer}"] for layer in range(n_layers)]
        corrupted = {kind: [corrupted_states[f"{kind}.{layer}"] for layer in range(n_layers)] for kind in KINDS}
        answer_id = answer_token(handle, options.target)
        if answer_id is None:
            answer_id = int(arch.logits(clean_out.last_hidden_state[:, -1]).argmax())
        high = answer_probabilities(handle, clean_out.last_hidden_state[:, -1], answer_id)
        low = answer_probabilities(handle, corrupted_out.last_hidden_state[:, -1], answer_id)
    return CleanAndCorrupted(
        prompt=prompt,
        answer_id=answer_id,
        high_score=float(high[0]),
        low_score=float(low.mean()),
        noise_std=noise_std,
        corrupted_embeds=embeds,
        clean=clean,
        corrupted=corrupted,
        block_template=block_template,
        attn_template=attn_template,
        kv=_cached_keys_values(handle, corrupted_out.past_key_values, prompt.length),
        samples=options.samples,
    )


def _cached_keys_values(handle: LoadedModel, cache: Any, length: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer keys/values of the corrupted run, when they hold every position (else None: no prefix reuse)."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != handle.num_layers:
        return None
    pairs = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.shape[-2] != length:
            return None  # e.g. a sliding-window layer that already dropped early positions
        pairs.append((keys, values))
    return pairs


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


def _rows_budget(handle: LoadedModel, runs: CleanAndCorrupted, memory_mb: int) -> int:
    """How many sequences one batched pass may hold within ``memory_mb``."""
    config = handle.model.config
    hidden = runs.corrupted_embeds.shape[-1]
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    n = runs.prompt.length
    element = runs.corrupted_embeds.element_size()
    per_row = n * (6 * hidden + 3 * intermediate + 4 * n) * element + handle.num_layers * 2 * n * hidden * element
    return max(runs.samples, int(memory_mb * 2**20 // per_row))


def score_cells(
    handle: LoadedModel,
    runs: CleanAndCorrupted,
    cells: Sequence[Cell],
    memory_mb: int = 1024,
    progress: Progress = no_progress,
    on_scores: Callable[[list[int], np.ndarray], None] | None = None,
    first_tokens: Sequence[int] = (),
) -> np.ndarray:
    """Mean answer probability over the corrupted runs for each cell, in the order given.

    With ``on_scores``, scores are reported as they are computed (``on_scores(cell indices, scores)``),
    the cells restoring ``first_tokens`` first; the unembedding then runs every STREAM_ROWS rows
    instead of once at the end.
    """
    if not cells:
        return np.zeros(0)
    samples = runs.samples
    max_cells = max(1, _rows_budget(handle, runs, memory_mb) // samples)
    # Cells restoring the same token share a key/value prefix and run in one pass (as many as fit); sorted
    # by start, so that cells which can share blocks (plan_pass) land in the same pass.
    rank = {token: place for place, token in enumerate(first_tokens)}
    order = sorted(range(len(cells)), key=lambda i: (rank.get(cells[i].token, len(rank)), cells[i].token, cells[i].start))
    groups: list[list[int]] = []
    for index in order:
        if groups and len(groups[-1]) < max_cells and cells[groups[-1][0]].token == cells[index].token:
            groups[-1].append(index)
        else:
            groups.append([index])
    final_states = torch.empty(len(cells) * samples, runs.corrupted_embeds.shape[-1], dtype=runs.corrupted_embeds.dtype)
    scores = np.zeros(len(cells))
    waiting: list[int] = []  # cells whose final states are in, not yet scored
    for done, group in enumerate(groups):
        progress(done / len(groups), f"restored {sum(len(g) for g in groups[:done])}/{len(cells)} cells")
        states = _run_group(handle, runs, [cells[i] for i in group])
        for slot, index in enumerate(group):
            final_states[index * samples : (index + 1) * samples] = states[slot * samples : (slot + 1) * samples].cpu()
        waiting += group
        if on_scores is not None and (len(waiting) * samples >= STREAM_ROWS or done == len(groups) - 1):
            rows = torch.cat([final_states[i * samples : (i + 1) * samples] for i in waiting])
            scores[waiting] = answer_probabilities(handle, rows, runs.answer_id, memory_mb).reshape(len(waiting), samples).mean(axis=1)
            on_scores(waiting, scores[waiting])
            waiting = []
    if on_scores is not None:
        return scores
    probs = answer_probabilities(handle, final_states, runs.answer_id, memory_mb)
    return probs.reshape(len(cells), samples).mean(axis=1)


def answer_probabilities(
    handle: LoadedModel,
    final_states: torch.Tensor,
    answer_id: int,
    memory_mb: int = 1024,
    block_logits: Callable[[torch.Tensor, slice], torch.Tensor] | None = None,
) -> np.ndarray:
    """Probability of ``answer_id`` from final-normed states.

    The softmax runs over blocks of the vocabulary: per block, the logits (float32 at least: a bfloat16
    model would otherwise exponentiate with 3 significant digits), their max, and the float32 sum of
    exp(logit − max); the blocks merge in float64. That is within 3e-7 of a float64 softmax and never
    holds a [rows, vocabulary] array; exponentiating whole rows and summing them in float64 instead took
    1.21x as long on the default model (benchmarks/bench_unembedding.py). ``block_logits(states, vocab_slice)`` replaces the model's head
    (the benchmark tries other ways of computing the same product).
    """
    block_logits = block_logits or handle.arch.logits
    vocab = handle.arch.unembedding.weight.shape[0]
    rows = max(1, int(memory_mb * 2**20 // (2 * VOCAB_BLOCK * 4)))
    out = []
    # An offloaded head is loaded once for all blocks (each logits call would otherwise load it again).
    with torch.no_grad(), offload.loaded(handle.arch.unembedding):
        device = handle.arch.unembedding.weight.device
        for begin in range(0, final_states.shape[0], rows):
            states = final_states[begin : begin + rows].to(device)
            maxima, sums = [], []
            for first in range(0, vocab, VOCAB_BLOCK):
                logits = block_logits(states, slice(first, first + VOCAB_BLOCK)).float()
                if first <= answer_id < first + VOCAB_BLOCK:
                    answer = logits[:, answer_id - first].double()
                top = logits.max(dim=-1, keepdim=True).values
                maxima.append(top[:, 0])
                sums.append(logits.sub_(top).exp_().sum(dim=-1))
            block_max = torch.stack(maxima, dim=1).double()
            overall = block_max.max(dim=1).values
            total = (torch.stack(sums, dim=1).double() * (block_max - overall[:, None]).exp()).sum(dim=1)
            out.append(((answer - overall).exp() / total).cpu())
    return torch.cat(out).numpy()


@dataclass(frozen=True)
class PassPlan:
    """The rows of one batched pass: which cell each row slot holds, and where its computation begins."""

    order: list[int]  # cell index per row slot, sorted by entry, then fresh after not fresh
    entry: list[int]  # per slot: the first block computed for it
    donor: list[int | None]  # per slot: the earlier slot whose state it takes on entry (None: the corrupted run's)
    fresh: list[bool]  # per slot: its input at its entry block is still the corrupted run's (nothing changed below)
    changes: list[list[frozenset]]  # per slot and layer: the states its cell sets there (_changes)


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


def _run_group(handle: LoadedModel, runs: CleanAndCorrupted, group: list[Cell]) -> torch.Tensor:
    """One batched pass for cells that restore the same token; returns the last position's final states
    (``samples`` rows per cell, in the order given).

    Rows are ordered by where their computation begins (:func:`plan_pass`), so block ``l`` computes only
    a leading slice of rows; the rows after it are still equal to the corrupted run there and take its
    recorded output, and a row entering from a donor takes the donor's state. A *fresh* row (its input at
    its entry block is the corrupted run's) can differ there only at the restored token and only after the
    state its cell sets: its attention output is the corrupted run's everywhere, and so is its MLP output
    away from the token. Those are copied instead of computed, as are MLP outputs a cell overwrites anyway
    and, in the last block, MLP outputs off the last position (only that one reaches the logits).
    """
    arch, samples, n_layers = handle.arch, runs.samples, handle.num_layers
    plan = plan_pass(group, n_layers)
    cells = [group[i] for i in plan.order]
    token = cells[0].token
    prefix = token if runs.kv is not None else 0
    copies = len(cells)
    position = token - prefix  # index of the restored token within the recomputed positions
    length = runs.prompt.length - prefix  # positions recomputed

    # Per module: rows to overwrite at ``position`` and the values to write there. A row entering from a
    # donor already carries the donor's changes below its entry.
    edits: dict[tuple[str, int], list[tuple[slice, torch.Tensor]]] = {}
    for slot, cell in enumerate(cells):
        rows = slice(slot * samples, (slot + 1) * samples)
        below = plan.entry[slot] if plan.donor[slot] is not None else 0
        for kind, layer in cell.restores:
            if layer >= below:
                edits.setdefault((kind, layer), []).append((rows, runs.clean[kind][layer][token]))
        for kind, layer in cell.freezes:
            if layer >= below:
                edits.setdefault((kind, layer), []).append((rows, runs.corrupted[kind][layer][:, token]))

    def writer(entries: list[tuple[slice, torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
        def write(output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            for rows, value in entries:
                output[rows, position] = value
            return output

        return write

    def active_rows(layer: int) -> int:
        return samples * sum(1 for first in plan.entry if first <= layer)

    def computed_rows(layer: int) -> int:
        """Rows whose attention block ``layer`` computes: the active ones that are not fresh there."""
        return samples * sum(1 for first, fresh in zip(plan.entry, plan.fresh) if first < layer or (first == layer and not fresh))

    def leading_rows_only(layer: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        active = active_rows(layer)
        # The next block reads only its own active rows (the last block's output is read whole): rows
        # that have not entered yet are handed on as the corrupted run's output.
        handed_on = active_rows(layer + 1) if layer + 1 < n_layers else copies * samples
        corrupted = runs.corrupted["hidden"][layer][:, prefix:]
        entering = [(slot, donor) for slot, donor in enumerate(plan.donor) if donor is not None and plan.entry[slot] == layer]

        def run(*args: Any, **kwargs: Any) -> Any:
            rows = copies * samples
            if active == 0:
                return hooks.with_first_tensor(runs.block_template[layer], corrupted.repeat(handed_on // samples, 1, 1))
            if entering:
                states = (args[0] if args else kwargs["hidden_states"]).clone()
                for slot, donor in entering:
                    states[slot * samples : (slot + 1) * samples] = states[donor * samples : (donor + 1) * samples]
                if args:
                    args = (states, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": states}
            # the first block gets every row; later ones get what the block below handed on
            output = _forward_leading(forward, args, kwargs, layer, rows, active)
            if active < handed_on:
                output = _followed_by(output, corrupted.repeat((handed_on - active) // samples, 1, 1))
            return output

        return run

    def fresh_attention_copied(layer: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        active, computed = active_rows(layer), computed_rows(layer)
        copied = runs.corrupted["attn"][layer][:, prefix:].repeat((active - computed) // samples, 1, 1)

        def run(*args: Any, **kwargs: Any) -> Any:
            if computed == 0:
                return hooks.with_first_tensor(runs.attn_template[layer], copied)
            return _followed_by(_forward_leading(forward, args, kwargs, layer, active, computed), copied)

        return run

    def mlp_tokens(layer: int) -> torch.Tensor | None:
        """Flat (row, position) indices whose MLP output block ``layer`` must compute; None: all of them."""
        active, computed = active_rows(layer), computed_rows(layer)
        need = torch.ones(active, length, dtype=torch.bool)
        need[computed:] = False
        need[computed:, position] = True  # a fresh row differs from the corrupted run only at its token
        if layer == n_layers - 1:
            need[:, : length - 1] = False
        for slot in range(active // samples):
            if _OVERWRITE_MLP_OUTPUT & plan.changes[slot][layer]:
                need[slot * samples : (slot + 1) * samples, position] = False
        return None if bool(need.all()) else need.flatten().nonzero()[:, 0]

    def selected_tokens_only(layer: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        active, computed = active_rows(layer), computed_rows(layer)
        tokens = mlp_tokens(layer)
        copied = runs.corrupted["mlp"][layer][:, prefix:].repeat((active - computed) // samples, 1, 1)

        def run(states: torch.Tensor) -> torch.Tensor:
            flat = states.reshape(-1, states.shape[-1])
            computed_out = forward(flat.index_select(0, tokens.to(flat.device)).unsqueeze(0))[0]
            out = computed_out.new_zeros(active, length, computed_out.shape[-1])
            out[computed:] = copied
            out.view(-1, out.shape[-1]).index_copy_(0, tokens.to(out.device), computed_out)
            return out

        return run if tokens is not None else forward

    embeds = runs.corrupted_embeds[:, prefix:].repeat(copies, 1, 1)
    kwargs: dict[str, Any] = {"inputs_embeds": embeds, "use_cache": prefix > 0}
    if prefix > 0:
        kwargs["past_key_values"] = _prefix_cache(handle, runs, prefix, copies)
    with torch.no_grad(), ExitStack() as stack:
        for layer in range(n_layers):
            block, attn, mlp = arch.block(layer), arch.attn(layer), arch.mlp(layer)
            stack.enter_context(hooks.bypass(block, leading_rows_only(layer, block.forward)))
            if active_rows(layer) and computed_rows(layer) < active_rows(layer):
                stack.enter_context(hooks.bypass(attn, fresh_attention_copied(layer, attn.forward)))
            if active_rows(layer):
                stack.enter_context(hooks.bypass(mlp, selected_tokens_only(layer, mlp.forward)))
        for (kind, layer), entries in edits.items():
            stack.enter_context(hooks.on_output(arch.state_module(kind, layer), writer(entries)))
        out = arch.backbone(**kwargs)
    final = out.last_hidden_state[:, -1]
    back = torch.empty(copies * samples, dtype=torch.long)
    for slot, index in enumerate(plan.order):
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
    return key_value_cache(handle.model.config, [(keys[:, :, :prefix].repeat(copies, 1, 1, 1), values[:, :, :prefix].repeat(copies, 1, 1, 1))
                                                 for keys, values in runs.kv])


def validated_inputs(
    handle: LoadedModel, prompt: str, subject: str | None, options: TraceOptions, limits: TraceLimits
) -> tuple[TokenizedPrompt, bool, float]:
    """Check options and prompt before any forward pass: the tokenised prompt, whether the subject was guessed, σ·noise."""
    validate_options(options, limits)
    tokenized, guessed = prepare_prompt(handle, prompt, subject, limits)
    return tokenized, guessed, options.noise * embedding_std(handle)


def trace(
    handle: LoadedModel,
    prompt: str,
    subject: str | None = None,
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
    progress: Progress = no_progress,
    partial: Callable[[TraceResult], None] | None = None,
) -> TraceResult:
    """Causal trace of ``prompt``: per kind, the answer's probability with each (token, layer) state restored.

    With ``partial``, the trace so far is handed over as cells are scored (cells not computed yet are
    NaN), the most informative tokens first: the subject's last token and the prompt's last token.
    """
    began = time.perf_counter()
    tokenized, guessed, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    with handle.lock:
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        # All kinds' cells go through one scheduler: cells of different kinds that restore the same token
        # from the same block share batched passes without recomputing anything for nothing.
        cells = {kind: cells_for_kind(kind, tokenized, handle.num_layers, options.window) for kind in options.kinds}
        keys = [(kind, key) for kind in options.kinds for key in cells[kind]]
        # Cells left out of ``cells`` restore a state equal to the corrupted one: their score is low_score.
        scores = {kind: np.full((tokenized.length, handle.num_layers), runs.low_score) for kind in options.kinds}

        def result(seconds: float) -> TraceResult:
            return trace_result(handle, tokenized, guessed, runs, options, noise_std, scores, seconds)

        on_scores = None
        if partial is not None:
            for kind, key in keys:
                scores[kind][key] = np.nan

            def on_scores(indices: list[int], values: np.ndarray) -> None:
                for index, value in zip(indices, values):
                    kind, key = keys[index]
                    scores[kind][key] = value
                partial(result(time.perf_counter() - began))

        last_subject = tokenized.subject_range[1] - 1
        values = score_cells(handle, runs, [cells[kind][key] for kind, key in keys], options.memory_mb, progress,
                             on_scores, first_tokens=(last_subject, tokenized.length - 1))
        for (kind, key), value in zip(keys, values):
            scores[kind][key] = value
    return result(time.perf_counter() - began)


def trace_result(
    handle: LoadedModel,
    tokenized: TokenizedPrompt,
    guessed: bool,
    runs: CleanAndCorrupted,
    options: TraceOptions,
    noise_std: float,
    scores: dict[str, np.ndarray],
    seconds: float,
) -> TraceResult:
    """A :class:`TraceResult` holding copies of ``scores``."""
    return TraceResult(
        model=handle.name,
        prompt=tokenized.prompt,
        subject=tokenized.subject,
        subject_guessed=guessed,
        tokens=tokenized.tokens,
        subject_range=tokenized.subject_range,
        answer=handle.tokenizer.decode([runs.answer_id]),
        answer_id=runs.answer_id,
        high_score=runs.high_score,
        low_score=runs.low_score,
        scores={kind: grid.copy() for kind, grid in scores.items()},
        noise=options.noise,
        noise_std=noise_std,
        samples=options.samples,
        window=options.window,
        seed=options.seed,
        seconds=seconds,
        num_layers=handle.num_layers,
    )


def last_subject_effects(
    handle: LoadedModel, prompt: str, subject: str, kind: str = "mlp", options: TraceOptions = TraceOptions()
) -> np.ndarray:
    """Indirect effect per layer of restoring ``kind`` at the subject's last token (one row of a trace)."""
    tokenized, _guessed, noise_std = validated_inputs(handle, prompt, subject, options, DEFAULT_LIMITS)
    token = tokenized.subject_range[1] - 1
    with handle.lock:
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        cells = cells_for_kind(kind, tokenized, handle.num_layers, options.window)
        layers = [layer for layer in range(handle.num_layers) if (token, layer) in cells]
        scores = np.full(handle.num_layers, runs.low_score)
        scores[layers] = score_cells(handle, runs, [cells[(token, layer)] for layer in layers], options.memory_mb)
    return scores - runs.low_score


SEVERED_KEYS = {"ordinary": None, "mlp_severed": "mlp", "attn_severed": "attn"}


@dataclass
class SeveredResult:
    """Per layer: restoring the hidden state at the last subject token, plain and with later MLP/attn severed."""

    prompt: str
    subject: str
    token: int
    answer: str
    high_score: float
    low_score: float
    scores: dict[str, np.ndarray]  # "ordinary" / "mlp_severed" / "attn_severed" -> [layer]


def trace_severed(
    handle: LoadedModel,
    prompt: str,
    subject: str | None = None,
    options: TraceOptions = TraceOptions(),
    limits: TraceLimits = DEFAULT_LIMITS,
    progress: Progress = no_progress,
) -> SeveredResult:
    """The paper's severed-path analysis for one prompt (its Figure 3 averages this over facts)."""
    tokenized, _, noise_std = validated_inputs(handle, prompt, subject, options, limits)
    with handle.lock:
        runs = run_clean_and_corrupted(handle, tokenized, options, noise_std)
        scores = {}
        for step, (key, severed_kind) in enumerate(SEVERED_KEYS.items()):
            cells = severed_cells(tokenized, handle.num_layers, severed_kind)
            scores[key] = score_cells(handle, runs, [cells[layer] for layer in range(handle.num_layers)], options.memory_mb,
                                      part_of(progress, step / len(SEVERED_KEYS), (step + 1) / len(SEVERED_KEYS), f"{key}: "))
    return SeveredResult(
        prompt=tokenized.prompt,
        subject=tokenized.subject,
        token=tokenized.subject_range[1] - 1,
        answer=handle.tokenizer.decode([runs.answer_id]),
        high_score=runs.high_score,
        low_score=runs.low_score,
        scores=scores,
    )
