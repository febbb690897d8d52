"""The answer's probability over the default model's 262k-token vocabulary: three ways, in one process.

    python benchmarks/speed/bench_unembedding.py [--rows 1540] [--repeat 3]

- ``whole rows, float64 sum``: logits for all vocabulary entries of 512 rows at a time, every exponential
  summed in float64 (the tracing engine before this benchmark).
- ``vocabulary blocks``: what ``explorer.tracing.answer_probabilities`` does: logits per block of
  ``VOCAB_BLOCK`` entries, float32 sums per block, blocks merged in float64.
- ``vocabulary blocks, weight @ statesᵀ``: the same with the product computed the other way round.

The states are real final-normed states of the model (prompts with noise on their embeddings), as
many rows as one kind of a 10-token trace scores. Prints the best of ``--repeat`` runs for each, the
ratios, and the largest difference from a float64 softmax.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import time

import torch

from explorer.core.models import load_model
from explorer.tracing import VOCAB_BLOCK, answer_probabilities


def whole_rows_float64_sum(handle, states: torch.Tensor, answer_id: int) -> torch.Tensor:
    out = []
    for begin in range(0, states.shape[0], 512):
        logits = handle.arch.logits(states[begin : begin + 512]).float()
        top = logits.max(dim=-1, keepdim=True).values
        answer = logits[:, answer_id].double() - top[:, 0].double()
        out.append(answer.exp() / logits.sub_(top).exp_().sum(dim=-1, dtype=torch.float64))
    return torch.cat(out)


def transposed_product(handle):
    weight = handle.arch.unembedding.weight  # the default model's head has no bias and no softcap
    return lambda states, vocab: (weight[vocab] @ states.T).T.contiguous()


def float64_reference(handle, states: torch.Tensor, answer_id: int) -> torch.Tensor:
    out = []
    for begin in range(0, states.shape[0], 128):
        logits = handle.arch.logits(states[begin : begin + 128]).double()
        out.append(torch.softmax(logits, dim=-1)[:, answer_id])
    return torch.cat(out)


def final_states(handle, rows: int) -> tuple[torch.Tensor, int]:
    ids = handle.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        clean = handle.arch.backbone(input_ids=ids).last_hidden_state[0, -1]
        answer_id = int(handle.arch.logits(clean).argmax())
        embeds = handle.arch.embedding(ids).repeat(rows, 1, 1)
        generator = torch.Generator().manual_seed(0)
        scale = torch.linspace(0, 0.6, rows)[:, None, None] * embeds.std()
        embeds[:, 1:5] += scale * torch.randn(embeds[:, 1:5].shape, generator=generator)
        states = torch.cat([handle.arch.backbone(inputs_embeds=embeds[i : i + 256]).last_hidden_state[:, -1] for i in range(0, rows, 256)])
    return states, answer_id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1540)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    handle = load_model()
    states, answer_id = final_states(handle, args.rows)
    reference = float64_reference(handle, states, answer_id).numpy()
    variants = {
        "whole rows, float64 sum": lambda: whole_rows_float64_sum(handle, states, answer_id).numpy(),
        "vocabulary blocks": lambda: answer_probabilities(handle, states, answer_id),
        "vocabulary blocks, weight @ statesT": lambda: answer_probabilities(handle, states, answer_id, block_logits=transposed_product(handle)),
    }
    seconds = {name: [] for name in variants}
    worst = {}
    with torch.no_grad():
        for _ in range(args.repeat):  # interleaved, so that machine noise hits every variant alike
            for name, run in variants.items():
                began = time.perf_counter()
                probs = run()
                seconds[name].append(time.perf_counter() - began)
                worst[name] = float(abs(probs - reference).max())
    base = min(seconds["whole rows, float64 sum"])
    print(f"{args.rows} rows, vocabulary {handle.arch.unembedding.weight.shape[0]}, block {VOCAB_BLOCK}, {torch.get_num_threads()} threads")
    for name in variants:
        best = min(seconds[name])
        print(f"{name:38s} {best:7.2f} s   {base / best:5.2f}x   max |p - float64 softmax| {worst[name]:.1e}")


if __name__ == "__main__":
    main()
