"""The inputs every cell starts from: the checked prompt, the noise, and the clean and corrupted runs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core import hooks
from ..core.errors import InputError
from ..core.models import LoadedModel
from ..core.prompts import TokenizedPrompt, clean_text, guess_subject, tokenize_prompt
from .options import DEFAULT_LIMITS, KINDS, TraceLimits, TraceOptions, validate_options
from .unembedding import answer_probabilities


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


def subject_noise(samples: int, n_subject_tokens: int, hidden: int, seed: int) -> np.ndarray:
    """The noise added to the subject's embeddings, drawn as ROME's reference code does (unit variance)."""
    return np.random.RandomState(seed).randn(samples, n_subject_tokens, hidden)


def embedding_std(handle: LoadedModel, subjects: Sequence[str] | None = None) -> float:
    """σ: standard deviation of the embedding-output vectors of subject tokens (cached per model)."""
    if subjects is None:
        from ..core.facts import load_facts

        every_subject = sorted({fact.subject for fact in load_facts()})
        return handle.weights.derived(("embedding_std",), lambda: embedding_std(handle, every_subject))
    ids = []
    for subject in subjects:
        ids.extend(handle.tokenizer(subject, add_special_tokens=False)["input_ids"])
    with handle.weights.own(), torch.no_grad():
        vectors = handle.arch.embedding(torch.tensor([ids], device=handle.device))
    return float(vectors.double().std())  # float64: a sum over ~10^5 values loses digits in float32


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


def validated_inputs(
    handle: LoadedModel, prompt: str, subject: str | None, options: TraceOptions, limits: TraceLimits
) -> tuple[TokenizedPrompt, bool, float]:
    """Check options and prompt before any forward pass: the tokenised prompt, whether the subject was guessed, σ·noise."""
    validate_options(options, limits)
    tokenized, guessed = prepare_prompt(handle, prompt, subject, limits)
    return tokenized, guessed, options.noise * embedding_std(handle)


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
