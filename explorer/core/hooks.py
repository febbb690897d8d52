"""Read or replace a module's input or output during a forward pass.

Every helper is a context manager whose hook is removed on exit, also when the
forward pass raises. Modules may return a tensor or a tuple whose first item is
the tensor of interest (attention modules and some blocks do); the helpers read
and replace that first tensor and keep the rest.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

TensorFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def first_tensor(value: Any) -> torch.Tensor:
    """The tensor a module produced: itself, or the first item of a tuple/list."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


def with_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """``value`` with its first tensor swapped for ``tensor`` (same container type)."""
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:]))


@contextmanager
def on_output(module: nn.Module, fn: TensorFn) -> Iterator[None]:
    """Call ``fn`` on the module's output tensor; a returned tensor replaces it."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        replacement = fn(first_tensor(output))
        return None if replacement is None else with_first_tensor(output, replacement)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def adding_to_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Add ``fn(first positional input)`` to the module's output tensor (e.g. a weight change ΔW·x)."""

    def hook(_module: nn.Module, inputs: tuple, output: Any) -> Any:
        tensor = first_tensor(output)
        return with_first_tensor(output, tensor + fn(inputs[0]).to(tensor.dtype))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def on_input(module: nn.Module, fn: TensorFn) -> Iterator[None]:
    """Call ``fn`` on the module's first positional input; a returned tensor replaces it."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            replacement = fn(args[0])
            return None if replacement is None else ((replacement, *args[1:]), kwargs)
        key = next(iter(kwargs))  # blocks called with hidden_states=... by keyword
        replacement = fn(kwargs[key])
        return None if replacement is None else (args, {**kwargs, key: replacement})

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_outputs(
    modules: dict[str, nn.Module], detach: bool = True, raw: bool = False
) -> Iterator[dict[str, Any]]:
    """Record each named module's output tensor of the last forward pass into the yielded dict.

    With ``raw`` the module's whole output (tensor or tuple) is kept as it is, e.g. to replay it
    through :func:`bypass` when a later pass skips that module.
    """
    with _recording(modules, lambda _inputs, output: output if raw else first_tensor(output), detach and not raw) as seen:
        yield seen


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named module's first positional input of the last forward pass (e.g. ROME's keys)."""
    with _recording(modules, lambda inputs, _output: inputs[0], detach) as seen:
        yield seen


@contextmanager
def _recording(modules: dict[str, nn.Module], pick: Callable[[tuple, Any], Any], detach: bool) -> Iterator[dict[str, Any]]:
    recorded: dict[str, Any] = {}
    handles = []

    def recorder(name: str) -> Callable:
        def hook(_module: nn.Module, inputs: tuple, output: Any) -> None:
            value = pick(inputs, output)
            recorded[name] = value.detach() if detach else value

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(recorder(name)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def bypass(module: nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """Run ``fn(*args, **kwargs)`` instead of the module's own forward (its hooks still run).

    Used to skip blocks whose output is already known, so a pass can resume mid-model.
    """
    had_own = "forward" in module.__dict__
    original = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward


class _ForwardStopped(Exception):
    """Raised by :func:`stopping_after`'s hook to end a forward pass early."""


@contextmanager
def stopping_after(module: nn.Module) -> Iterator[None]:
    """End any forward pass in the body once ``module`` has run; what hooks recorded until then stays.

    For passes that need only the lower layers: the layers above are not computed at all.
    """

    def hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        raise _ForwardStopped

    with _stopping(module.register_forward_hook(hook)):
        yield


@contextmanager
def stopping_before(module: nn.Module, fn: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """End any forward pass in the body when ``module`` is reached, after ``fn(its first input)``.

    For passes that need only a module's input (ROME's keys): neither it nor anything above it runs.
    """

    def hook(_module: nn.Module, args: tuple) -> None:
        fn(args[0])
        raise _ForwardStopped

    with _stopping(module.register_forward_pre_hook(hook)):
        yield


@contextmanager
def _stopping(handle: Any) -> Iterator[None]:
    try:
        yield
    except _ForwardStopped:
        pass
    finally:
        handle.remove()
