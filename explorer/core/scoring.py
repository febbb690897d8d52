"""Teacher-forced likelihoods of target strings after prompts: what edits and their evaluation measure.

A target's probability is exp(−mean per-token negative log-likelihood), as in the paper's CounterFact
metrics. Prompts are tokenised with the tokenizer's special tokens (Gemma's BOS included), targets
without them, so a BOS never lands inside a target.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .facts import Fact
from .generation import pad_token, right_padded
from .models import LoadedModel
from .prompts import clean_text

ROWS_PER_PASS = 32


def target_ids(handle: LoadedModel, target: str) -> list[int]:
    """The target's token ids, no special tokens; an empty target is an :class:`InputError`."""
    target = clean_text(target, "target")
    ids = handle.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"target {target!r} has no tokens; type the expected answer, e.g. ' Paris'")
    return list(ids)


@dataclass
class TargetScore:
    """Per target token: negative log-likelihood, and whether it was the model's top-1 token there."""

    token_nll: np.ndarray
    token_hit: np.ndarray

    @property
    def mean_nll(self) -> float:
        """Mean per-token NLL (the paper's score; exp(−it) is the target's probability)."""
        return float(self.token_nll.mean())

    @property
    def accuracy(self) -> float:
        """Share of target tokens predicted top-1 under teacher forcing (zsRE's metric)."""
        return float(self.token_hit.mean())


def score_targets(handle: LoadedModel, pairs: Sequence[tuple[str, str]]) -> list[TargetScore]:
    """Teacher-forced scores of each (prompt, target) pair's target tokens."""
    tokenizer = handle.tokenizer
    encoded = []
    for prompt, target in pairs:
        prompt_ids = tokenizer(clean_text(prompt, "prompt"), add_special_tokens=True)["input_ids"]
        encoded.append((list(prompt_ids), target_ids(handle, target)))
    out: list[TargetScore] = []
    with handle.weights.locked(), torch.no_grad():
        for begin in range(0, len(encoded), ROWS_PER_PASS):
            out += _batch_scores(handle, encoded[begin : begin + ROWS_PER_PASS])
    return out


def mean_nll(handle: LoadedModel, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """Mean per-token negative log-likelihood of each (prompt, target) pair's target, teacher-forced."""
    return np.array([score.mean_nll for score in score_targets(handle, pairs)])


def _batch_scores(handle: LoadedModel, batch: list[tuple[list[int], list[int]]]) -> list[TargetScore]:
    ids, mask = right_padded([prompt + target[:-1] for prompt, target in batch], pad_token(handle))
    hidden = handle.arch.backbone(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device)).last_hidden_state
    # Unembed only the positions that predict a target token (the vocabulary can be 262k wide).
    where = [(i, len(prompt) - 1 + j) for i, (prompt, target) in enumerate(batch) for j in range(len(target))]
    picked = hidden[[i for i, _ in where], [p for _, p in where]]
    logprobs = torch.log_softmax(handle.arch.logits(picked).double(), dim=-1)
    wanted = torch.tensor([t for _, target in batch for t in target], device=logprobs.device)
    token_nll = -logprobs.gather(1, wanted.unsqueeze(1)).squeeze(1).cpu().numpy()
    token_hit = (logprobs.argmax(-1) == wanted).cpu().numpy()
    out, at = [], 0
    for _, target in batch:
        out.append(TargetScore(token_nll[at : at + len(target)], token_hit[at : at + len(target)]))
        at += len(target)
    return out


def target_probabilities(handle: LoadedModel, prompts: Sequence[str], target: str) -> np.ndarray:
    """exp(−mean NLL) of ``target`` after each prompt."""
    return np.exp(-mean_nll(handle, [(prompt, target) for prompt in prompts]))


def top_prediction(handle: LoadedModel, prompt: str) -> int:
    """The model's greedy next token after ``prompt``."""
    return top_predictions(handle, [prompt])[0]


def top_predictions(handle: LoadedModel, prompts: Sequence[str]) -> list[int]:
    """The model's greedy next token after each prompt, in batched passes (one per ROWS_PER_PASS prompts)."""
    encoded = [list(handle.tokenizer(prompt)["input_ids"]) for prompt in prompts]
    tops: list[int] = []
    with handle.weights.locked(), torch.no_grad():
        for begin in range(0, len(encoded), ROWS_PER_PASS):
            batch = encoded[begin : begin + ROWS_PER_PASS]
            ids, mask = right_padded(batch, pad_token(handle))
            hidden = handle.arch.backbone(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device)).last_hidden_state
            # Unembed each prompt's last position only: the full-sequence logits cost a 262k-wide product per token.
            final = hidden[torch.arange(len(batch)), torch.tensor([len(row) - 1 for row in batch])]
            tops += handle.arch.logits(final).argmax(-1).tolist()
    return tops


def answer_starts_with(handle: LoadedModel, fact: Fact, token_id: int) -> bool:
    """Whether ``token_id`` is the first token of the fact's true answer (with its leading space)."""
    target = handle.tokenizer(" " + fact.attribute.strip(), add_special_tokens=False)["input_ids"]
    return bool(target) and token_id == target[0]


def predicts(handle: LoadedModel, fact: Fact) -> bool:
    """Whether the model's greedy next token starts the fact's true answer."""
    return answer_starts_with(handle, fact, top_prediction(handle, fact.prompt))
