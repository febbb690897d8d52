"""The answer's probability from final-normed states: the model's head and a softmax over vocabulary blocks."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..core import offload
from ..core.models import LoadedModel

# Vocabulary entries per block of the answer's softmax: each block's logits are a small array (never
# [rows, vocabulary]); this size is the fastest one measured (docs/performance.md, "Tracing engine").
VOCAB_BLOCK = 2048


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
    exp(logit − max); the blocks merge in float64. So it never holds a [rows, vocabulary] array (its
    accuracy against a float64 softmax, and its speed against whole rows: docs/performance.md).
    ``block_logits(states, vocab_slice)`` replaces the model's head (benchmarks/speed/bench_unembedding.py
    tries other ways of computing the same product).
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
