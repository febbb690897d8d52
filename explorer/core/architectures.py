"""Model-family knowledge in one table: where each family keeps the modules ROME needs.

Every engine asks an :class:`Architecture` for modules; nothing else in the package
string-matches module names. Adding a family is one entry in ``FAMILIES``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import offload


@dataclass(frozen=True)
class FamilyPaths:
    """Dotted module paths, relative to the causal-LM module (``{}`` is a layer index)."""

    embedding: str
    backbone: str
    layers: str
    mlp: str  # relative to one decoder layer
    attn: str  # relative to one decoder layer
    mlp_out: str  # relative to one decoder layer: the matrix ROME rewrites
    final_norm: str
    unembedding: str
    # GPT-2's Conv1D stores the weight as [in, out], the transpose of nn.Linear's [out, in].
    mlp_out_transposed: bool = False


_LLAMA_LIKE = FamilyPaths(
    embedding="model.embed_tokens",
    backbone="model",
    layers="model.layers",
    mlp="mlp",
    attn="self_attn",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
    unembedding="lm_head",
)

FAMILIES: dict[str, FamilyPaths] = {
    "gpt2": FamilyPaths(
        embedding="transformer.wte",
        backbone="transformer",
        layers="transformer.h",
        mlp="mlp",
        attn="attn",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        unembedding="lm_head",
        mlp_out_transposed=True,
    ),
    "gptj": FamilyPaths(
        embedding="transformer.wte",
        backbone="transformer",
        layers="transformer.h",
        mlp="mlp",
        attn="attn",
        mlp_out="mlp.fc_out",
        final_norm="transformer.ln_f",
        unembedding="lm_head",
    ),
    "gpt_neox": FamilyPaths(
        embedding="gpt_neox.embed_in",
        backbone="gpt_neox",
        layers="gpt_neox.layers",
        mlp="mlp",
        attn="attention",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        unembedding="lm_head",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
}


class UnsupportedModelError(ValueError):
    """The model's family is not in the adapter table."""


def _get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class Architecture:
    """The modules of one loaded model that tracing and editing touch."""

    model_type: str
    paths: FamilyPaths
    model: nn.Module

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return _get_module(self.model, self.paths.layers)

    @property
    def embedding(self) -> nn.Module:
        """The token embedding (its output is what causal tracing corrupts)."""
        return _get_module(self.model, self.paths.embedding)

    @property
    def backbone(self) -> nn.Module:
        """The decoder stack without the unembedding; its last hidden state is final-normed."""
        return _get_module(self.model, self.paths.backbone)

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied after the last block."""
        return _get_module(self.model, self.paths.final_norm)

    @property
    def unembedding(self) -> nn.Module:
        """The output projection to vocabulary logits."""
        return _get_module(self.model, self.paths.unembedding)

    def block(self, layer: int) -> nn.Module:
        """Decoder block ``layer``; its output is the *hidden* state."""
        return self.layers[layer]

    def mlp(self, layer: int) -> nn.Module:
        """The MLP of block ``layer``; its output is the *mlp* state."""
        return _get_module(self.block(layer), self.paths.mlp)

    def attn(self, layer: int) -> nn.Module:
        """The attention of block ``layer``; its output is the *attn* state."""
        return _get_module(self.block(layer), self.paths.attn)

    def state_module(self, kind: str, layer: int) -> nn.Module:
        """The module whose output is the ``kind`` state (hidden, mlp or attn) of ``layer``."""
        if kind == "hidden":
            return self.block(layer)
        if kind == "mlp":
            return self.mlp(layer)
        if kind == "attn":
            return self.attn(layer)
        raise ValueError(f"unknown kind {kind!r}: use hidden, mlp or attn")

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP output projection of block ``layer``, the matrix ROME rewrites."""
        return _get_module(self.block(layer), self.paths.mlp_out)

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """That projection's weight as [out_features, in_features] (a view; Conv1D is transposed).

        Under accelerate's offloading this is a ``meta`` placeholder (right shape and dtype, no values):
        read and write the values with :meth:`mlp_out_values`, :meth:`write_mlp_out` and
        :meth:`save_mlp_out` / :meth:`restore_mlp_out`, which also reach offloaded weights.
        """
        weight = self.mlp_out(layer).weight
        return weight.T if self.paths.mlp_out_transposed else weight

    def mlp_out_values(self, layer: int) -> torch.Tensor:
        """The values of :meth:`mlp_out_weight`, also when accelerate offloaded them (then on the offload map's device)."""
        weight = offload.values(self.mlp_out(layer))
        return weight.T if self.paths.mlp_out_transposed else weight

    def write_mlp_out(self, layer: int, values: torch.Tensor) -> None:
        """Set the projection's weight to ``values`` ([out, in]), where the next forward will read it."""
        offload.write(self.mlp_out(layer), values.T if self.paths.mlp_out_transposed else values)

    def save_mlp_out(self, layer: int) -> object:
        """A token with which :meth:`restore_mlp_out` puts the projection's current weight back bit for bit."""
        return offload.save(self.mlp_out(layer))

    def restore_mlp_out(self, layer: int, saved: object) -> None:
        """Put back the weight :meth:`save_mlp_out` saved."""
        offload.restore(self.mlp_out(layer), saved)

    def logits(self, final_hidden: torch.Tensor, vocab: slice | None = None, for_gradients: bool = False) -> torch.Tensor:
        """Vocabulary logits from final-normed hidden states, as the model's own head computes them.

        ``vocab`` restricts them to a slice of the vocabulary (same values as slicing the full logits).
        ``for_gradients``: the plain product, whose backward multiplies by the weight as stored. For states
        that are a strided view (the last position of a batch), the turned-around product's backward is
        many times slower (docs/performance.md).
        """
        head = self.unembedding  # an nn.Linear in every family of the table
        vocab = vocab if vocab is not None else slice(None)
        linear = nn.functional.linear if for_gradients else few_row_linear
        with offload.loaded(head):  # the head's weight is read here, not through its forward (and its hook)
            bias = head.bias[vocab] if getattr(head, "bias", None) is not None else None
            logits = linear(final_hidden, head.weight[vocab], bias)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


FEW_ROWS = 256  # up to this many rows, (weight @ statesᵀ)ᵀ beats states @ weightᵀ (few_row_linear)


def few_row_linear(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.functional.linear`` with the product turned around for few rows.

    With a wide weight (the default model's 262k-row head) and few rows, MKL runs ``weight @ statesᵀ``
    much faster than ``states @ weightᵀ``; past FEW_ROWS rows the plain product is as fast or faster
    (timings in docs/performance.md). Same values up to float rounding; autograd sees two ordinary products.
    """
    flat = states.reshape(-1, states.shape[-1])
    if flat.shape[0] > FEW_ROWS:
        return nn.functional.linear(states, weight, bias)
    out = torch.mm(weight, flat.T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*states.shape[:-1], weight.shape[0])


def supported_model_types() -> list[str]:
    """The ``model_type`` values the adapter table knows."""
    return sorted(FAMILIES)


def architecture_for(model: nn.Module) -> Architecture:
    """Look up the adapter for a loaded causal LM from its config's ``model_type``."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported types: {', '.join(supported_model_types())}"
        )
    return Architecture(model_type=model_type, paths=FAMILIES[model_type], model=model)
