"""Batched greedy next tokens against the model's plain forward of each prompt alone."""
from __future__ import annotations

import pytest
import torch

from explorer.core.scoring import top_predictions
from tests.conftest import build_tiny

PROMPTS = ["The Eiffel Tower is located in the city of", "Paris is", "The Louvre, a museum, is in"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_batched_next_tokens_equal_each_prompt_alone(family):
    handle = build_tiny(family)
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = handle.tokenizer(prompt, return_tensors="pt")["input_ids"]
            expected.append(int(handle.model(input_ids=ids).logits[0, -1].argmax()))
    assert len({len(handle.tokenizer(p)["input_ids"]) for p in PROMPTS}) == 3  # mixed lengths: padding is exercised
    assert top_predictions(handle, PROMPTS) == expected
