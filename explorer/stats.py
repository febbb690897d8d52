"""Second-moment statistics C = E[k kᵀ] of the keys (inputs of the MLP output projection) over text.

ROME scales its rank-one update by C⁻¹ so that the edit disturbs keys of ordinary text as little as
possible. The paper estimated C on Wikipedia; offline, the default corpus is text sampled from the
model itself with a fixed seed. A user's own text (file or folder) and, where the network allows,
Wikipedia through the ``datasets`` package are the alternatives; ``identity`` skips C altogether.

Statistics are computed once per (model, corpus, token count) for every layer whose accumulator fits
in memory, in one pass over the text, and cached on disk; later edits load one layer in milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from . import hooks
from .generation import Sampling, generate_ids, pad_token, right_padded, start_token
from .models import LoadedModel, cache_root, model_fingerprint
from .prompts import InputError, is_whole_number, quoted

Progress = Callable[[float, str], None]

CORPORA = ("sample", "identity", "wikipedia", "text:PATH")
SEQUENCE_TOKENS = 128  # length of each sampled or chunked text sequence
SAMPLE_TOP_K = 50
SAMPLE_BATCH = 32
ALL_LAYERS_BUDGET_BYTES = 2 * 2**30  # float64 accumulators for every layer at once, if they fit
STATS_FORMAT = 1


@dataclass(frozen=True)
class StatsSpec:
    """Which text the statistics come from and how much of it."""

    corpus: str = "sample"  # "sample" (model-generated, seeded), "identity", "wikipedia" or "text:PATH"
    tokens: int = 20_000
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` for a corpus or size the engine cannot use."""
        corpus = self.corpus if isinstance(self.corpus, str) else ""
        if corpus not in ("sample", "identity", "wikipedia") and not corpus.startswith("text:"):
            raise InputError(f"unknown statistics corpus {quoted(str(self.corpus))}: use one of {', '.join(CORPORA)}")
        if corpus.startswith("text:") and not _exists(corpus[5:]):
            raise InputError(f"statistics text {quoted(corpus[5:])} does not exist; give a .txt file or a folder of them")
        if corpus != "identity" and not (is_whole_number(self.tokens) and 256 <= self.tokens <= 10_000_000):
            raise InputError(f"statistics size {_shown(self.tokens)} tokens is out of range; use 256 to 10,000,000")
        if not (is_whole_number(self.seed) and 0 <= self.seed < 2**31):
            raise InputError(f"statistics seed {_shown(self.seed)} is out of range; use 0 to {2**31 - 1}")


def _shown(value: object) -> str:
    return str(value) if is_whole_number(value) else quoted(str(value))


def _exists(path: str) -> bool:
    """Whether ``path`` (``~`` expanded) exists; a path the system cannot even look up does not."""
    try:
        return Path(path).expanduser().exists()
    except (OSError, RuntimeError, ValueError):  # name too long, unknown ~user, NUL byte
        return False


@dataclass
class SecondMoment:
    """C for one layer, with where it came from."""

    matrix: torch.Tensor | None  # [in, in] float64; None for the identity
    layer: int
    spec: StatsSpec
    count: int  # keys averaged
    # Cholesky factors by shrinkage, made on first use: every edit at this layer solves with the same C.
    factors: dict[float, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> dict:
        """The ``stats`` entry of an edit's report."""
        return {"corpus": self.spec.corpus, "samples": self.count, "tokens": self.spec.tokens, "seed": self.spec.seed}


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md", ".text"))
    if not files:
        raise InputError(f"no .txt or .md files under {path}; give a text file or a folder of them")
    return files


def _corpus_key(spec: StatsSpec) -> str:
    if spec.corpus.startswith("text:"):
        digest = hashlib.sha256()
        for file in _text_files(Path(spec.corpus[5:]).expanduser()):
            digest.update(file.read_bytes())
        return f"text-{digest.hexdigest()[:12]}-{spec.tokens}"
    return f"{spec.corpus}-{spec.tokens}-seed{spec.seed}"


def _chunked(handle: LoadedModel, texts: list[str], tokens: int) -> list[list[int]]:
    """Texts tokenised and cut into sequences of at most SEQUENCE_TOKENS tokens, ``tokens`` in all."""
    tokenizer = handle.tokenizer
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # the BOS, for tokenizers that add one
    body = SEQUENCE_TOKENS - len(prefix)
    rows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = ids[start : start + body]
            if len(piece) < 8:
                continue
            rows.append(list(prefix) + piece)
            total += len(piece)
            if total >= tokens:
                return rows
    return rows


def _sampled_rows(handle: LoadedModel, spec: StatsSpec, progress: Progress) -> list[list[int]]:
    sequences = math.ceil(spec.tokens / (SEQUENCE_TOKENS - 1))
    rows: list[list[int]] = []
    first = start_token(handle)
    for batch_start in range(0, sequences, SAMPLE_BATCH):
        count = min(SAMPLE_BATCH, sequences - batch_start)

        def step(done: int, total: int, batch_start: int = batch_start) -> None:
            progress(0.8 * (batch_start + count * done / total) / sequences, "sampling text from the model")

        sampling = Sampling(top_k=SAMPLE_TOP_K, seed=spec.seed * 100_003 + batch_start)
        rows += generate_ids(handle, [[first]] * count, SEQUENCE_TOKENS - 1, sampling, on_step=step)
    return rows


def _wikipedia_texts(tokens: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise InputError("the wikipedia corpus needs the 'datasets' package (pip install datasets) and network") from None
    try:
        stream = datasets.load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        texts, chars = [], 0
        for record in stream:
            texts.append(record["text"])
            chars += len(record["text"])
            if chars > tokens * 6:
                return texts
        return texts
    except Exception as error:  # network errors come in many types; the message says what to do
        raise InputError(f"could not stream Wikipedia ({type(error).__name__}); use --stats-corpus sample or text:PATH") from None


def corpus_rows(handle: LoadedModel, spec: StatsSpec, progress: Progress) -> list[list[int]]:
    """The statistics corpus as token rows (each starting with the tokenizer's BOS, if it adds one)."""
    if spec.corpus == "sample":
        return _sampled_rows(handle, spec, progress)
    if spec.corpus == "wikipedia":
        return _chunked(handle, _wikipedia_texts(spec.tokens), spec.tokens)
    files = _text_files(Path(spec.corpus[5:]).expanduser())
    return _chunked(handle, [file.read_text(errors="replace") for file in files], spec.tokens)


def accumulate_second_moments(
    handle: LoadedModel, rows: list[list[int]], layers: list[int], progress: Progress, batch: int = 16
) -> tuple[dict[int, torch.Tensor], int]:
    """Mean of k kᵀ over every non-special token of ``rows``, per layer (float64), and the key count."""
    arch = handle.arch
    specials = set(getattr(handle.tokenizer, "all_special_ids", []) or [])
    sums: dict[int, torch.Tensor] = {}
    count = 0
    keys_at: dict[int, torch.Tensor] = {}
    for begin in range(0, len(rows), batch):
        chunk = rows[begin : begin + batch]
        ids, real = right_padded(chunk, pad_token(handle))
        keep = real.bool() & ~torch.isin(ids, torch.tensor(sorted(specials), dtype=torch.long))
        with torch.no_grad(), hooks.capture_inputs({str(layer): arch.mlp_out(layer) for layer in layers}) as keys_at:
            arch.backbone(input_ids=ids.to(handle.device), use_cache=False)
        mask = keep.to(handle.device)
        for layer in layers:
            keys = keys_at[str(layer)][mask].float()
            product = (keys.T @ keys).double().cpu()
            sums[layer] = product if layer not in sums else sums[layer] + product
        count += int(keep.sum())
        progress(0.8 + 0.2 * min(1.0, (begin + len(chunk)) / len(rows)), "accumulating key statistics")
    if count == 0:
        raise InputError("the statistics corpus has no tokens; give more text")
    return {layer: total / count for layer, total in sums.items()}, count


def _layers_to_compute(handle: LoadedModel, layer: int) -> list[int]:
    width = handle.arch.mlp_out_weight(layer).shape[1]
    if handle.num_layers * width * width * 8 <= ALL_LAYERS_BUDGET_BYTES:
        return list(range(handle.num_layers))
    return [layer]


def stats_folder(handle: LoadedModel, spec: StatsSpec) -> Path:
    """Where the statistics of ``spec`` for this model are cached."""
    return cache_root() / "stats" / model_fingerprint(handle) / _corpus_key(spec)


def second_moment(handle: LoadedModel, layer: int, spec: StatsSpec, progress: Progress | None = None) -> SecondMoment:
    """C for ``layer`` from the cache, computing (and caching) it first if needed."""
    spec.validate()
    progress = progress or (lambda _f, _m: None)
    if spec.corpus == "identity":
        return SecondMoment(matrix=None, layer=layer, spec=spec, count=0)
    memo_key = ("second_moment", layer, spec)
    if memo_key in handle.memo:
        return handle.memo[memo_key]
    folder = stats_folder(handle, spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        loaded = _load_layer(folder, layer, width=handle.arch.mlp_out_weight(layer).shape[1])
        if loaded is None:
            with handle.lock:
                rows = corpus_rows(handle, spec, progress)
                layers = sorted(set(_layers_to_compute(handle, layer)) | {layer})
                moments, count = accumulate_second_moments(handle, rows, layers, progress)
            _save(folder, moments, count, spec)
            loaded = (moments[layer], count)
    result = SecondMoment(matrix=loaded[0], layer=layer, spec=spec, count=loaded[1])
    handle.memo[memo_key] = result
    return result


def _load_layer(folder: Path, layer: int, width: int | None = None) -> tuple[torch.Tensor, int] | None:
    """The cached C of ``layer`` and its key count, or None when missing or damaged (it is then recomputed).

    Damaged covers unreadable files and readable ones of the wrong shape: meta that is not a dict with a
    positive count, or a matrix that is not a finite square float tensor (``width`` wide, when given).
    """
    meta_path, path = folder / "meta.json", folder / f"layer_{layer}.pt"
    if not (meta_path.exists() and path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
            return None
        count = meta.get("count")
        if not is_whole_number(count) or count <= 0:
            return None
        matrix = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - whatever a damaged file raises (truncated zip, bad pickle, bad JSON), recompute
        return None
    if (
        not isinstance(matrix, torch.Tensor)
        or not matrix.is_floating_point()
        or matrix.ndim != 2
        or matrix.shape[0] != matrix.shape[1]
        or (width is not None and matrix.shape[0] != width)
        or not bool(torch.isfinite(matrix).all())
    ):
        return None
    return matrix.double(), count


def _save(folder: Path, moments: dict[int, torch.Tensor], count: int, spec: StatsSpec) -> None:
    """Write to a temporary folder, then rename: readers never see half a cache."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        for layer, matrix in moments.items():
            torch.save(matrix.float().contiguous(), tmp / f"layer_{layer}.pt")
        meta = {"format": STATS_FORMAT, "count": count, "corpus": spec.corpus, "tokens": spec.tokens, "seed": spec.seed}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def solve(moment: SecondMoment, key: torch.Tensor, shrinkage: float = 0.0) -> torch.Tensor:
    """C⁻¹ key in float64 through a Cholesky factorisation of C + shrinkage·mean(diag C)·I."""
    key = key.double().cpu()
    if moment.matrix is None:
        return key
    if shrinkage not in moment.factors:
        moment.factors[shrinkage] = _cholesky(moment.matrix, shrinkage)
    return torch.cholesky_solve(key.unsqueeze(1), moment.factors[shrinkage]).squeeze(1)


def _cholesky(matrix: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """The Cholesky factor of ``matrix`` + shrinkage·mean(diag)·I, with a ridge added when it is singular."""
    scale = float(matrix.diagonal().mean())
    jitter = shrinkage * scale
    for _ in range(8):
        regularised = matrix + jitter * torch.eye(matrix.shape[0], dtype=torch.float64)
        factor, info = torch.linalg.cholesky_ex(regularised)
        if int(info) == 0:
            return factor
        # Too few keys for the key dimension leave C singular: add the smallest ridge that factorises.
        jitter = max(jitter * 10, scale * 1e-6)
    raise InputError("the key statistics are singular; use a larger corpus (--stats-tokens) or --shrinkage 0.1")
