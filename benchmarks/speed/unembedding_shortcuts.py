"""Could the trace's unembedding skip most of the 262k-token vocabulary? Measured on the trace's own rows.

    python benchmarks/speed/unembedding_shortcuts.py [--prompt ...] [--subject ...] [--rows 500]

The answer's probability is exp(logit_answer) / Σ_v exp(logit_v). Two shortcuts would keep that exact
to 1e-5 while computing few logits, and this script measures whether either applies:

- *candidate tokens*: compute the logits of the tokens near the row's maximum only; the rest must then
  add a negligible share to the denominator. It prints how many tokens lie within 10–30 nats of each
  row's maximum (every token within ~25 nats can still matter: 262,144 × e⁻²⁵ ≈ 4e-6).
- *a low-rank bound*: project the rows onto their top r directions, compute cheap logits there, and
  bound the rest by ‖token vector‖ × ‖row's residual‖. It prints the residual's size per r next to the
  rows' norms and the token vectors' norms (a residual of a few units is a bound of a few nats on every
  one of the 262k logits, useless for a 1e-5 answer).

The rows are the final-normed states the engine scores for the full three-kind trace (paper defaults).

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse

import torch

from explorer import tracing
from explorer.core.models import load_model
from explorer.tracing import scheduling


def traced_final_states(handle, prompt: str, subject: str) -> torch.Tensor:
    """The restored rows' final states of one full trace (the engine's one unembedding call per trace)."""
    recorded = []
    original = scheduling.answer_probabilities

    def recording(handle, final_states, answer_id, *args, **kwargs):
        recorded.append(final_states.clone())
        return original(handle, final_states, answer_id, *args, **kwargs)

    scheduling.answer_probabilities = recording  # where score_cells calls it
    try:
        tracing.trace(handle, prompt, subject)
    finally:
        scheduling.answer_probabilities = original
    return max(recorded, key=len)  # the clean and corrupted runs' calls have one and ``samples`` rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="The Eiffel Tower")
    parser.add_argument("--rows", type=int, default=500, help="rows whose full logits are examined")
    args = parser.parse_args()
    handle = load_model()
    weight = handle.arch.unembedding.weight.detach()
    states = traced_final_states(handle, args.prompt, args.subject)
    vocab, hidden = weight.shape
    print(f"{states.shape[0]} restored rows, vocabulary {vocab} x {hidden}: "
          f"{2 * states.shape[0] * vocab * hidden / 1e12:.2f} TFLOP of unembedding")

    picked = states[torch.linspace(0, states.shape[0] - 1, min(args.rows, states.shape[0])).long()]
    with torch.no_grad():
        logits = handle.arch.logits(picked).float()
    gap = logits.max(dim=1, keepdim=True).values - logits
    print(f"candidate tokens, over {picked.shape[0]} rows spread through the trace:")
    for nats in (10, 15, 20, 25, 30):
        within = (gap < nats).sum(dim=1).float()
        print(f"  within {nats:2d} nats of the row's maximum: mean {within.mean():9.0f}   fewest {within.min():7.0f}   "
              f"most {within.max():7.0f} tokens")

    norms = weight.norm(dim=1)
    print(f"low-rank bound: row norms {states.norm(dim=1).min():.1f}-{states.norm(dim=1).max():.1f}, "
          f"token vector norms {norms.min():.3f}-{norms.max():.3f}")
    directions = torch.linalg.svd(states.double(), full_matrices=False).Vh.float()
    for rank in (16, 64, 128, 256):
        basis = directions[:rank]
        residual = (states - (states @ basis.T) @ basis).norm(dim=1)
        print(f"  top {rank:3d} of {hidden} directions: residual norm median {residual.median():6.2f}, "
              f"largest {residual.max():6.2f}  (bound on each logit's error: up to {norms.max() * residual.max():.1f} nats)")


if __name__ == "__main__":
    main()
