"""Which models the app's model field may load, and how large: the one place that decides.

Run locally (loopback, not a Space), the app loads any model, as the CLI always does: whoever types the name
owns the disk and memory it uses. Where the public can reach it (a Hugging Face Space, a non-loopback bind
address, a Gradio share link), the field offers only the embedded default, the app's start model
(``ROME_EXPLORER_MODEL``) and those listed in ``ROME_EXPLORER_MODELS``, unless the operator sets
``ROME_EXPLORER_ANY_MODEL=1`` (then any hub name, never a local folder); and every model it loads besides
the two start models must be within ``ROME_EXPLORER_MAX_MODEL_PARAMETERS`` parameters (counted from the
configuration alone) and ``ROME_EXPLORER_MAX_MODEL_BYTES`` of weight files (local sizes or the hub's file
metadata), both checked before any weight is read or downloaded.
"""
from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..core.errors import InputError, ModelLoadError
from ..core.models import DEFAULT_MODEL, supported_config
from .limits import AppLimits

MODELS_ENV = "ROME_EXPLORER_MODELS"
ANY_MODEL_ENV = "ROME_EXPLORER_ANY_MODEL"
START_MODEL_ENV = "ROME_EXPLORER_MODEL"
# Where Gradio reads its bind addresses from (unset: 127.0.0.1; set but empty: every interface).
BIND_ENV = ("GRADIO_SERVER_NAME", "GRADIO_NODE_SERVER_NAME")
YES = frozenset({"1", "true", "yes"})
YOURSELF = "run the app yourself (see the README) to try"
# A hub repository id, "name" or "owner/name": what may reach the hub when any model is allowed.
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?)?")


def public_reason(env: Mapping[str, str] = os.environ) -> str | None:
    """Why the public can reach this app (a one-line reason), or None when it serves this machine only."""
    if env.get("SPACE_ID", "").strip():
        return "it runs as a Hugging Face Space"
    if env.get("GRADIO_SHARE", "").strip().lower() == "true":
        return "GRADIO_SHARE makes a public link"
    for variable in BIND_ENV:
        if variable in env and not _loopback(env[variable]):
            return f"{variable} binds it to {env[variable].strip() or 'every interface'}"
    return None


def _loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name, or empty (every interface)


def start_models(env: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The embedded default and the model the app starts on: loaded at start whatever the field asks."""
    return frozenset({DEFAULT_MODEL, env.get(START_MODEL_ENV, "").strip() or DEFAULT_MODEL})


def listed_models(env: Mapping[str, str] = os.environ) -> frozenset[str]:
    """``ROME_EXPLORER_MODELS``, comma-separated."""
    return frozenset(name.strip() for name in env.get(MODELS_ENV, "").split(",") if name.strip())


def allowed_models(env: Mapping[str, str] = os.environ) -> frozenset[str] | None:
    """The names the model field may load; None: any (locally without a list, or public with the opt-in)."""
    listed = listed_models(env)
    if listed:
        return listed | start_models(env)
    if public_reason(env) and env.get(ANY_MODEL_ENV, "").strip().lower() not in YES:
        return start_models(env)
    return None


def field_label(env: Mapping[str, str] = os.environ) -> str:
    """The model field's label: what this app offers."""
    allowed = allowed_models(env)
    if allowed is None:
        where = "a Hugging Face name" if public_reason(env) else "a Hugging Face name or a local folder"
        return f"Model: 'default' (embedded Gemma 3 270M), {where}"
    others = sorted(allowed - {DEFAULT_MODEL})
    return "Model: 'default' (embedded Gemma 3 270M)" + (f" or one of {', '.join(others)}" if others else "")


def check_model(name: str, limits: AppLimits, env: Mapping[str, str] = os.environ) -> None:
    """Raise a one-line :class:`InputError` / :class:`ModelLoadError` when the model field may not load ``name``.

    Names are refused before anything is read. Where public, a model that passes is then measured from its
    configuration and its weight files' sizes, still before any weight is read or downloaded.
    """
    allowed = allowed_models(env)
    public = public_reason(env)
    if allowed is not None and name not in allowed:
        what = "this public app" if public else "this app"
        raise InputError(f"{what} only loads {', '.join(sorted(allowed))}; {YOURSELF} other models")
    if not public or name in start_models(env):
        return
    if allowed is None and (not HUB_ID.fullmatch(name) or ".." in name or "--" in name or os.path.isdir(name)):
        # Any hub name is allowed, but no local path: transformers reads a folder of that name if there is one.
        raise InputError(f"this public app loads models from the Hugging Face hub only ('owner/name'); {YOURSELF} local folders")
    config = supported_config(name)
    parameters = parameter_count(config)
    if parameters > limits.max_model_parameters:
        raise ModelLoadError(
            f"{name!r} has {parameters:,} parameters, over this app's limit of {limits.max_model_parameters:,} "
            f"(ROME_EXPLORER_MAX_MODEL_PARAMETERS); {YOURSELF} larger models"
        )
    size = weight_bytes(name)
    if size > limits.max_model_bytes:
        raise ModelLoadError(
            f"{name!r} has {size:,} bytes of weights, over this app's limit of {limits.max_model_bytes:,} "
            f"(ROME_EXPLORER_MAX_MODEL_BYTES); {YOURSELF} larger models"
        )


def parameter_count(config) -> int:
    """Parameters of the causal LM ``config`` describes, counted on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        # torch's meta device, not accelerate's init_empty_weights: under that one tied matrices come apart
        # (a GPT-2 counts its embedding twice).
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ModelLoadError(f"could not count the parameters of this configuration: {str(error).splitlines()[0]}") from None
    return sum(parameter.numel() for parameter in model.parameters())  # a tied matrix counts once


def weight_bytes(name: str) -> int:
    """Bytes of the weight files ``from_pretrained`` would read for ``name`` (a local folder or a hub name).

    One ``model.safetensors`` if there is one, else every top-level ``*.safetensors`` (a sharded model); then
    the same for ``pytorch_model.bin`` / ``*.bin``. Summing every file of the format over-counts only a
    repository that keeps extra copies, which errs towards refusing.
    """
    if os.path.isdir(name):
        sizes = {path.name: path.stat().st_size for path in Path(name).iterdir() if path.is_file()}
    else:
        sizes = _hub_sizes(name)
    for single, suffix in (("model.safetensors", ".safetensors"), ("pytorch_model.bin", ".bin")):
        chosen = [single] if single in sizes else [file for file in sizes if file.endswith(suffix)]
        if chosen:
            if any(sizes[file] is None for file in chosen):
                raise ModelLoadError(f"could not tell how large the weights of {name!r} are; {YOURSELF} it")
            return sum(sizes[file] for file in chosen)
    raise ModelLoadError(f"{name!r} has no model.safetensors or pytorch_model.bin weights to load")


def _hub_sizes(name: str) -> dict[str, int | None]:
    """Top-level file name -> size in bytes, from the hub's metadata (no file is downloaded)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(name, files_metadata=True)
    except Exception as error:  # noqa: BLE001 - not found, gated, offline: all mean "cannot check, so do not load"
        raise ModelLoadError(f"could not read the file sizes of {name!r} from the hub: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    return {sibling.rfilename: sibling.size for sibling in info.siblings or () if "/" not in sibling.rfilename}
