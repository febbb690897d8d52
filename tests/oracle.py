"""The straightforward causal-tracing loop of ROME's reference code, kept as the tests' oracle.

Written independently of ``explorer.tracing``'s fast path: for every cell it runs the
whole model on [clean, corrupted x samples] with plain forward hooks and computes the
answer's probability from the full logits. Slow by design.
"""
from __future__ import annotations

import numpy as np
import torch


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _modules(arch, kind, layer):
    block = arch.layers[layer]
    if kind == "hidden":
        return block
    path = arch.paths.mlp if kind == "mlp" else arch.paths.attn
    for part in path.split("."):
        block = getattr(block, part)
    return block


def oracle_cell_score(handle, input_ids, subject_range, noise_tensor, answer_id, restores, freezes=()):
    """Mean answer probability over corrupted rows with (kind, layer, token) ``restores`` set to clean values.

    ``freezes`` lists (kind, layer, token) states held at their values from a first, unrestored corrupted pass.
    """
    arch, model = handle.arch, handle.model
    samples = noise_tensor.shape[0]
    batch = input_ids.repeat(samples + 1, 1)
    start, end = subject_range
    handles = []

    def corrupt(_module, _inputs, output):
        output = output.clone()
        output[1:, start:end] += noise_tensor.to(output.dtype)
        return output

    frozen = {}
    if freezes:
        recorders = []
        for kind, layer, token in freezes:
            def record(_m, _i, output, key=(kind, layer, token)):
                frozen[key] = _first(output)[1:, key[2]].clone()
            recorders.append(_modules(arch, kind, layer).register_forward_hook(record))
        embed_hook = arch.embedding.register_forward_hook(corrupt)
        try:
            with torch.no_grad():
                model(input_ids=batch)
        finally:
            embed_hook.remove()
            for h in recorders:
                h.remove()

    def replacer(entries):
        def hook(_module, _inputs, output):
            tensor = _first(output).clone()
            for kind_token, source in entries:
                if source == "clean":
                    tensor[1:, kind_token] = tensor[0, kind_token]
                else:
                    tensor[1:, kind_token] = source
            return tensor if isinstance(output, torch.Tensor) else (tensor, *output[1:])
        return hook

    per_module = {}
    for kind, layer, token in restores:
        per_module.setdefault((kind, layer), []).append((token, "clean"))
    for kind, layer, token in freezes:
        per_module.setdefault((kind, layer), []).append((token, frozen[(kind, layer, token)]))
    handles.append(arch.embedding.register_forward_hook(corrupt))
    for (kind, layer), entries in per_module.items():
        handles.append(_modules(arch, kind, layer).register_forward_hook(replacer(entries)))
    try:
        with torch.no_grad():
            logits = model(input_ids=batch).logits
    finally:
        for h in handles:
            h.remove()
    probs = torch.softmax(logits[1:, -1].double(), dim=-1)[:, answer_id]
    return float(probs.mean())


def oracle_trace(handle, result, kind):
    """The per-cell loop for one kind, on the noise and answer of a fast-engine ``result``."""
    from explorer.tracing import subject_noise, window_layers

    input_ids = torch.tensor([handle.tokenizer(result.prompt)["input_ids"]])
    start, end = result.subject_range
    hidden = handle.arch.embedding.weight.shape[1]
    noise = torch.from_numpy(subject_noise(result.samples, end - start, hidden, result.seed)) * result.noise_std
    n_layers = handle.num_layers
    scores = np.zeros((input_ids.shape[1], n_layers))
    for token in range(input_ids.shape[1]):
        for layer in range(n_layers):
            if kind == "hidden":
                restores = [("hidden", layer, token)]
            else:
                restores = [(kind, k, token) for k in window_layers(layer, result.window, n_layers)]
            scores[token, layer] = oracle_cell_score(handle, input_ids, result.subject_range, noise, result.answer_id, restores)
    return scores
