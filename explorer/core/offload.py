"""Weights of modules that accelerate offloaded (``device_map`` with "disk", or "cpu" next to a GPU).

Such a module's parameters are ``meta`` placeholders; its AlignDevicesHook (``module._hf_hook``) loads
their values from ``hook.weights_map`` onto ``hook.execution_device`` before each forward and drops them
again after it. Calling the module is therefore fine, but code that reads a parameter directly (the
head's weight for the logits, a weight's values, the device inputs go to) or writes one (an edit) has
to go through these helpers: a write into the placeholder is silently lost, and a write into the
tensor the map returns is lost too (disk weights are read again from their file at every forward).

An edit of an offloaded weight is therefore a replacement of the hook's map by one that answers the
edited values for that name and asks the original map for everything else; restoring puts the original
map object back. Nothing on disk is ever written.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def offload_hook(module: nn.Module) -> Any | None:
    """The accelerate hook that offloads ``module``'s own weights, or None when they live in the module."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        if getattr(candidate, "offload", False) and getattr(candidate, "weights_map", None) is not None:
            return candidate
    return None


def _offloaded(module: nn.Module, name: str) -> Any | None:
    hook = offload_hook(module)
    return hook if hook is not None and name in hook.weights_map else None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its hook's execution device under dispatch, else its first parameter's device."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return next(module.parameters()).device


def values(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The values of ``module``'s parameter ``name``: the parameter itself (not a copy) when it lives in the
    module, else the tensor its offload map holds (on the map's device, usually the CPU)."""
    parameter = getattr(module, name)
    hook = _offloaded(module, name)
    if hook is None or parameter.device.type != "meta":
        return parameter
    return hook.weights_map[name].to(parameter.dtype)  # accelerate casts to the placeholder's dtype too


def save(module: nn.Module, name: str = "weight") -> Any:
    """A token that :func:`restore` puts back exactly: a copy of the values, or the offload map itself."""
    hook = _offloaded(module, name)
    return ("map", hook.weights_map) if hook is not None else ("values", getattr(module, name).detach().clone())


def restore(module: nn.Module, saved: Any, name: str = "weight") -> None:
    """Put back what :func:`save` returned, bit for bit."""
    kind, held = saved
    if kind == "map":
        _offloaded(module, name).weights_map = held
        _refresh(module, name)
    else:
        with torch.no_grad():
            getattr(module, name).copy_(held)


def write(module: nn.Module, new_values: torch.Tensor, name: str = "weight") -> None:
    """Set ``module``'s parameter ``name`` to ``new_values`` (same shape; cast to the parameter's dtype)."""
    hook = _offloaded(module, name)
    if hook is None:
        with torch.no_grad():
            getattr(module, name).copy_(new_values)
        return
    base = hook.weights_map
    if isinstance(base, _Replaced) and base.name == name:
        base = base.base  # replace the earlier replacement instead of stacking them
    # Kept in host memory, as offloaded weights are, in the placeholder's dtype (the one accelerate loads it as).
    replacement = new_values.detach().to("cpu", getattr(module, name).dtype).clone()
    hook.weights_map = _Replaced(base, name, replacement)
    _refresh(module, name)


def _refresh(module: nn.Module, name: str) -> None:
    """A parameter loaded right now (inside :func:`loaded`) takes the map's current values too."""
    parameter = getattr(module, name)
    if parameter.device.type != "meta":
        with torch.no_grad():
            parameter.copy_(_offloaded(module, name).weights_map[name])


class _Replaced(Mapping):
    """An offload map with one entry's values replaced (an applied edit); the rest is read from ``base``."""

    def __init__(self, base: Mapping, name: str, replacement: torch.Tensor) -> None:
        self.base, self.name, self.replacement = base, name, replacement

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.replacement if key == self.name else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


@contextmanager
def loaded(module: nn.Module) -> Iterator[nn.Module]:
    """Hold an offloaded module's own weights loaded on its execution device, for code that reads them directly
    (the head's weight for the logits); a no-op for weights in memory, or already loaded by an enclosing call.

    Not the hook's pre_forward/post_forward: those put new Parameter objects on the module, which unties a
    tied head from the embedding (``named_parameters`` would then list it twice). The placeholders put
    back here are the very objects that were there.
    """
    hook = offload_hook(module)
    names = [] if hook is None else [
        name for name, parameter in module.named_parameters(recurse=False) if parameter.device.type == "meta" and name in hook.weights_map
    ]
    if not names:
        yield module
        return
    placeholders = {name: module._parameters[name] for name in names}
    device = execution_device(module)
    try:
        for name in names:
            module._parameters[name] = nn.Parameter(values(module, name).to(device), requires_grad=False)
        yield module
    finally:
        module._parameters.update(placeholders)
