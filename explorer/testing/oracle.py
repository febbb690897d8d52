"""The straightforward causal trace of the paper, written from its description: the tests' oracle (the
benchmarks time the engine against it too).

It shares no code with the rest of ``explorer`` (it imports nothing from it): it finds the subject's
tokens, draws the noise, measures σ, picks the answer, bounds each window and locates every module
itself, and for every cell it reruns the whole model on [clean, corrupted x samples] with plain forward
hooks, reading the answer's probability from the full logits in float64. Slow by design.

Conventions it pins (each one is the paper's or its reference code's):
- Noise: ``np.random.RandomState(seed).standard_normal((samples, subject tokens, hidden))``, times
  ``noise × σ``, added to the output of the token-embedding module at the subject's tokens.
- σ: the standard deviation of the embedding-module outputs of every token of every subject in
  ``assets/known_facts.json`` (each subject tokenised alone, without special tokens).
- Window of size w around layer l: layers ``l - w // 2`` up to, not including, ``l + ceil(w / 2)``,
  clipped to the model.
- The subject's tokens: every token whose decoded characters overlap the subject's first occurrence.
- The answer: the clean run's top-1 next token, unless a target is given (its first token).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FACTS = Path(__file__).resolve().parents[2] / "assets" / "known_facts.json"  # the checkout's fact set

# Where each family keeps its decoder blocks and, inside a block, its MLP and attention modules.
BLOCKS = {"gpt2": "transformer.h", "gptj": "transformer.h", "gpt_neox": "gpt_neox.layers"}
ATTN = {"gpt2": "attn", "gptj": "attn", "gpt_neox": "attention"}


@dataclass
class OracleTrace:
    """What the oracle measured for one prompt."""

    input_ids: torch.Tensor
    subject_range: tuple[int, int]
    sigma: float
    noise: torch.Tensor  # (samples, subject tokens, hidden), already scaled by noise × σ
    answer_id: int
    high_score: float
    low_score: float
    scores: dict[str, np.ndarray]


def window(layer: int, size: int, num_layers: int) -> list[int]:
    """The layers a window of ``size`` centred on ``layer`` restores."""
    first = layer - size // 2
    last = layer + (size + 1) // 2  # exclusive
    return [k for k in range(first, last) if 0 <= k < num_layers]


def noise_draws(samples: int, n_tokens: int, hidden: int, seed: int) -> np.ndarray:
    """Unit-variance noise, one draw per sample, subject token and hidden unit."""
    return np.random.RandomState(seed).standard_normal((samples, n_tokens, hidden))


def subject_tokens(tokenizer, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """The prompt's ids (special tokens included) and the range of tokens that overlap the subject."""
    ids = tokenizer(prompt)["input_ids"]
    begin = prompt.index(subject)
    end = begin + len(subject)
    covering, typed = [], 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        if len(text) > typed and typed < end and len(text) > begin:
            covering.append(i)
        typed = len(text)
    return ids, (covering[0], covering[-1] + 1)


def sigma(model, tokenizer) -> float:
    """σ of the embedding-module outputs of the fact set's subjects."""
    subjects = sorted({record["subject"] for record in json.loads(FACTS.read_text(encoding="utf-8"))})
    ids = [i for subject in subjects for i in tokenizer(subject, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        return float(model.get_input_embeddings()(torch.tensor([ids])).double().std())


def blocks(model) -> torch.nn.ModuleList:
    """The model's decoder blocks."""
    path = BLOCKS.get(model.config.model_type, "model.layers")
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return module


def state_module(model, kind: str, layer: int) -> torch.nn.Module:
    """The module whose output is the ``kind`` state of ``layer``."""
    block = blocks(model)[layer]
    if kind == "hidden":
        return block
    name = "mlp" if kind == "mlp" else ATTN.get(model.config.model_type, "self_attn")
    return getattr(block, name)


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def cell_probability(model, input_ids, subject_range, noise, answer_id, restores, freezes=()) -> float:
    """Mean answer probability over the corrupted rows with ``restores`` (kind, layer, token) set to clean values.

    ``freezes`` (kind, layer, token) hold their values from a first corrupted pass without restoration.
    """
    batch = input_ids.repeat(noise.shape[0] + 1, 1)
    start, end = subject_range
    embedding = model.get_input_embeddings()

    def corrupt(_module, _inputs, output):
        output = output.clone()
        output[1:, start:end] += noise.to(output.dtype)
        return output

    def run(hooks_by_module):
        handles = [embedding.register_forward_hook(corrupt)]
        handles += [module.register_forward_hook(hook) for module, hook in hooks_by_module]
        try:
            with torch.no_grad():
                return model(input_ids=batch).logits
        finally:
            for handle in handles:
                handle.remove()

    frozen = {}
    if freezes:
        def recorder(key):
            def record(_module, _inputs, output):
                frozen[key] = _first(output)[1:, key[2]].clone()
            return record

        run([(state_module(model, *key[:2]), recorder(key)) for key in freezes])

    def replacer(entries):
        def replace(_module, _inputs, output):
            tensor = _first(output).clone()
            for token, value in entries:
                tensor[1:, token] = tensor[0, token] if value is None else value
            return tensor if isinstance(output, torch.Tensor) else (tensor, *output[1:])
        return replace

    per_module: dict[tuple[str, int], list] = {}
    for kind, layer, token in restores:
        per_module.setdefault((kind, layer), []).append((token, None))
    for key in freezes:
        per_module.setdefault(key[:2], []).append((key[2], frozen[key]))
    logits = run([(state_module(model, kind, layer), replacer(entries)) for (kind, layer), entries in per_module.items()])
    return float(torch.softmax(logits[1:, -1].double(), dim=-1)[:, answer_id].mean())


def trace(model, tokenizer, prompt, subject, *, kinds, samples, window_size, noise, seed, target=None) -> OracleTrace:
    """The per-cell loop: every (token, layer) cell of every kind, one full run each."""
    ids, subject_range = subject_tokens(tokenizer, prompt, subject)
    input_ids = torch.tensor([ids])
    start, end = subject_range
    hidden = model.get_input_embeddings().weight.shape[1]
    scale = sigma(model, tokenizer)
    draws = torch.from_numpy(noise_draws(samples, end - start, hidden, seed)) * (noise * scale)
    with torch.no_grad():
        clean_logits = model(input_ids=input_ids).logits[0, -1].double()
    if target:
        answer_id = tokenizer(target, add_special_tokens=False)["input_ids"][0]
    else:
        answer_id = int(clean_logits.argmax())
    high = float(torch.softmax(clean_logits, -1)[answer_id])
    low = cell_probability(model, input_ids, subject_range, draws, answer_id, [])
    num_layers = len(blocks(model))
    scores = {}
    for kind in kinds:
        grid = np.zeros((len(ids), num_layers))
        for token in range(len(ids)):
            for layer in range(num_layers):
                layers = [layer] if kind == "hidden" else window(layer, window_size, num_layers)
                restores = [(kind, k, token) for k in layers]
                grid[token, layer] = cell_probability(model, input_ids, subject_range, draws, answer_id, restores)
        scores[kind] = grid
    return OracleTrace(input_ids, subject_range, scale, draws, answer_id, high, low, scores)


def severed(model, tokenizer, prompt, subject, *, samples, noise, seed) -> dict[str, np.ndarray]:
    """Hidden state restored at the subject's last token, with MLP or attention outputs above it frozen."""
    base = trace(model, tokenizer, prompt, subject, kinds=(), samples=samples, window_size=1, noise=noise, seed=seed)
    token = base.subject_range[1] - 1
    num_layers = len(blocks(model))
    curves = {}
    for key, kind in (("ordinary", None), ("mlp_severed", "mlp"), ("attn_severed", "attn")):
        curve = np.zeros(num_layers)
        for layer in range(num_layers):
            freezes = [] if kind is None else [(kind, k, token) for k in range(layer + 1, num_layers)]
            curve[layer] = cell_probability(
                model, base.input_ids, base.subject_range, base.noise, base.answer_id, [("hidden", layer, token)], freezes
            )
        curves[key] = curve
    return curves
