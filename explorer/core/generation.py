"""Text generation with a key/value cache: greedy or seeded top-k sampling, reproducible across runs.

Sampling draws from its own ``torch.Generator``, never the global random state, so a seed gives the
same text whatever else the process did before (context prefixes for ROME's keys and the sampled
statistics corpus rely on that).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .errors import InputError
from .kv_cache import key_value_cache
from .models import LoadedModel
from .prompts import clean_text, is_whole_number

StepCallback = Callable[[int, int], None]  # (tokens generated so far, tokens to generate)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``top_k`` 0 means greedy."""

    top_k: int = 0
    seed: int = 0
    banned: tuple[int, ...] = ()  # token ids never chosen (e.g. markup and control tokens for prose)

    def __post_init__(self) -> None:
        if not (is_whole_number(self.seed) and 0 <= self.seed < 2**63):
            raise InputError(f"sampling seed must be a whole number from 0 to {2**63 - 1}, got {self.seed!r}"[:200])

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always taken."""
        return self.top_k <= 0


GREEDY = Sampling()


def start_token(handle: LoadedModel) -> int:
    """The token unconditional text starts from: BOS where the tokenizer has one, else EOS (GPT-2's habit)."""
    tokenizer = handle.tokenizer
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start unconditional text from")


def added_token_ids(handle: LoadedModel) -> tuple[int, ...]:
    """Ids of the tokenizer's added tokens (specials, markup such as Gemma's ``<b>`` or ``<start_of_image>``)."""
    added = getattr(handle.tokenizer, "added_tokens_decoder", None) or {}
    return tuple(sorted(int(i) for i in added))


def markup_token_ids(handle: LoadedModel) -> tuple[int, ...]:
    """The added tokens a text may not contain: all of them but end of text (which ends a completion).

    Gemma's vocabulary holds image, tool and formatting tokens; a small model asked to continue plain
    prose sometimes picks ``<start_of_image>`` and, once it has, keeps repeating it.
    """
    return tuple(i for i in added_token_ids(handle) if i != handle.tokenizer.eos_token_id)


def pad_token(handle: LoadedModel) -> int:
    """The id padding positions get (they are masked; any id works, the tokenizer's pad when it has one)."""
    pad_id = handle.tokenizer.pad_token_id
    return int(pad_id) if pad_id is not None else start_token(handle)


def right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one right-padded batch and its attention mask.

    Under causal attention the real positions never see the padding after them, so positions and
    results of the real tokens are those of each row alone.
    """
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one left-padded batch and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (left padding gets position 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    if sampling.banned:
        logits = logits.clone()
        logits[:, list(sampling.banned)] = float("-inf")
    if sampling.greedy:
        return logits.argmax(-1)
    values, indices = logits.float().topk(min(sampling.top_k, logits.shape[-1]), dim=-1)
    choice = torch.multinomial(torch.softmax(values, -1).cpu(), 1, generator=generator).to(indices.device)
    return indices.gather(-1, choice).squeeze(-1)


def generate_ids(
    handle: LoadedModel,
    rows: Sequence[Sequence[int]],
    new_tokens: int,
    sampling: Sampling = GREEDY,
    on_step: StepCallback | None = None,
) -> list[list[int]]:
    """Continue each token row by ``new_tokens`` tokens (one batched, cached pass per token)."""
    arch, device = handle.arch, handle.device
    ids, mask = left_padded(rows, pad_token(handle))
    ids, mask = ids.to(device), mask.to(device)
    generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
    cache = key_value_cache(handle.model.config)
    step_ids, produced = ids, []
    with handle.weights.locked(), torch.no_grad():  # inside derived(): on the model's own weights
        for step in range(new_tokens):
            positions = positions_from_mask(mask)[:, -step_ids.shape[1] :]
            out = arch.backbone(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
            step_ids = _pick(arch.logits(out.last_hidden_state[:, -1]), sampling, generator).unsqueeze(-1)
            produced.append(step_ids)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
            if on_step is not None:
                on_step(step + 1, new_tokens)
    new = torch.cat(produced, dim=-1).tolist() if produced else [[] for _ in rows]
    return [list(row) + tail for row, tail in zip(rows, new)]


def complete(
    handle: LoadedModel,
    prompts: Sequence[str],
    new_tokens: int = 20,
    sampling: Sampling = GREEDY,
    markup: bool = False,
) -> list[str]:
    """The model's continuation of each prompt (the prompt itself not repeated), stopping at end of text.

    Without ``markup`` the continuation is plain text: the tokenizer's added tokens other than end of text
    are never chosen (:func:`markup_token_ids`); with it, every token of the vocabulary can be.
    """
    tokenizer = handle.tokenizer
    return [tokenizer.decode(tail, skip_special_tokens=True) for _row, tail in continuation_ids(handle, prompts, new_tokens, sampling, markup)]


def continuation_ids(
    handle: LoadedModel,
    prompts: Sequence[str],
    new_tokens: int,
    sampling: Sampling = GREEDY,
    markup: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """Per prompt, its token ids and the ids of its continuation (cut at end of text); see :func:`complete`."""
    tokenizer = handle.tokenizer
    if not markup:
        sampling = replace(sampling, banned=tuple(sorted({*sampling.banned, *markup_token_ids(handle)})))
    rows = [tokenizer(clean_text(p, "generation prompt"), add_special_tokens=True)["input_ids"] for p in prompts]
    if not rows:
        return []
    outputs = generate_ids(handle, rows, new_tokens, sampling)
    pairs = []
    for row, output in zip(rows, outputs):
        tail = output[len(row) :]
        if tokenizer.eos_token_id in tail:
            tail = tail[: tail.index(tokenizer.eos_token_id)]
        pairs.append((list(row), tail))
    return pairs
