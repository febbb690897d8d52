"""Second-moment statistics C = E[k kᵀ] of the keys (inputs of the MLP output projection) over text.

ROME scales its rank-one update by C⁻¹ so that the edit disturbs keys of ordinary text as little as
possible. The reference code estimates C from 100,000 Wikipedia *records* (articles cut at the model's
context, some 10⁷–10⁸ keys); the default here reads far fewer keys, tokens of offline Wikipedia lead
sections that install from PyPI with the app (see :mod:`explorer.editing.corpora`), as many as measurement says
are enough (docs/statistics.md#how-many-keys). Text sampled from the model itself (``sample``), a user's own text
(``text:PATH``), Wikipedia streamed over the network (``wikipedia-online``) and ``identity`` (no C)
are the alternatives.

Keys of layer l need the blocks up to l only: a pass stops once the deepest layer asked for has its
keys, and nothing above it (nor the unembedding) runs. C is cached on disk per (model, corpus, layer),
one file per layer written atomically, so a later edit at another layer computes only what it lacks.
Every pass runs on the model's own weights (:meth:`Weights.own <explorer.core.weights.Weights.own>`), whoever asks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from ..core import hooks
from ..core.atomic import write_atomically
from ..core.errors import InputError
from ..core.generation import pad_token, right_padded
from ..core.models import LoadedModel, cache_root, model_fingerprint
from ..core.progress import Progress, no_progress
from ..core.prompts import is_whole_number, quoted
from .corpora import StatsSpec, corpus_key, corpus_rows, describe_corpus

KEY_BATCH = 16  # rows per statistics pass (sorted by length, so little of it is padding)
ALL_LAYERS_BUDGET_BYTES = 2 * 2**30  # float64 accumulators for every layer at once, if they fit
STATS_FORMAT = 2


@dataclass
class SecondMoment:
    """C for one layer, with where it came from."""

    matrix: torch.Tensor | None  # [in, in] float64; None for the identity
    layer: int
    spec: StatsSpec
    count: int  # keys averaged
    # Cholesky factors by shrinkage, made on first use: every edit at this layer solves with the same C.
    factors: dict[float, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    source: str | None = None  # the file C was read from (--stats-file); None when computed from spec

    def describe(self) -> dict:
        """The ``stats`` entry of an edit's report."""
        if self.source is not None:
            return {"corpus": f"file:{self.source}", "samples": self.count, "tokens": None, "seed": None}
        return {"corpus": self.spec.corpus, "samples": self.count, "tokens": self.spec.tokens, "seed": self.spec.seed}


# ---------------------------------------------------------------- the keys' second moments


def accumulate_second_moments(
    handle: LoadedModel, rows: list[list[int]], layers: list[int], progress: Progress, batch: int = KEY_BATCH, start: float = 0.0
) -> tuple[dict[int, torch.Tensor], int]:
    """Mean of k kᵀ over every non-special token of ``rows``, per layer (float64), and the key count.

    Each pass stops at the input of the deepest layer's MLP output projection, and runs on the model's own
    weights; the model's lock is taken per batch, so other jobs on the model can run in between.
    ``progress`` goes from ``start`` to 1.
    """
    arch = handle.arch
    specials = torch.tensor(sorted(set(getattr(handle.tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
    deepest = max(layers)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    # Rows of similar length share a batch: right padding is then a few tokens, not half the batch.
    ordered = sorted(rows, key=len)
    total, done = sum(map(len, ordered)), 0
    for begin in range(0, len(ordered), batch):
        chunk = ordered[begin : begin + batch]
        ids, real = right_padded(chunk, pad_token(handle))
        keep = (real.bool() & ~torch.isin(ids, specials)).to(handle.device)
        keys_at: dict[int, torch.Tensor] = {}

        def record(layer: int) -> Callable[[torch.Tensor], None]:
            def hook(keys: torch.Tensor) -> None:
                keys_at[layer] = keys.detach()

            return hook

        with handle.weights.own(), torch.no_grad(), ExitStack() as stack:
            stack.enter_context(hooks.stopping_before(arch.mlp_out(deepest), record(deepest)))
            for layer in layers:
                if layer != deepest:
                    stack.enter_context(hooks.on_input(arch.mlp_out(layer), record(layer)))
            arch.backbone(input_ids=ids.to(handle.device), use_cache=False)
        for layer in layers:
            keys = keys_at[layer][keep].float()
            product = (keys.T @ keys).double().cpu()
            sums[layer] = product if layer not in sums else sums[layer] + product
        count += int(keep.sum())
        done += sum(map(len, chunk))
        progress(start + (1 - start) * done / total, f"key statistics: {count:,} keys of layer{'s' if len(layers) > 1 else ''} "
                                           f"{', '.join(map(str, layers))}")
    if count == 0:
        raise InputError("the statistics corpus has no tokens; give more text")
    return {layer: summed / count for layer, summed in sums.items()}, count


def _layers_to_compute(handle: LoadedModel, layer: int, spec: StatsSpec) -> list[int]:
    """Sampled text costs minutes to make, so its pass keeps every layer's keys that fit in memory; other
    corpora are cheap to read again, and a pass that stops at ``layer`` costs only the blocks below it."""
    width = handle.arch.mlp_out_weight(layer).shape[1]
    if spec.corpus == "sample" and handle.num_layers * width * width * 8 <= ALL_LAYERS_BUDGET_BYTES:
        return list(range(handle.num_layers))
    return [layer]


def stats_folder(handle: LoadedModel, spec: StatsSpec) -> Path:
    """Where the statistics of ``spec`` for this model are cached (one file per layer)."""
    return cache_root() / "stats" / model_fingerprint(handle) / corpus_key(spec)


def second_moment(handle: LoadedModel, layer: int, spec: StatsSpec, progress: Progress = no_progress) -> SecondMoment:
    """C for ``layer`` of the model's own weights, from the cache or computed (and cached) first.

    A caller that asks while another thread computes the same C waits for it (``progress`` is called
    meanwhile, so it can cancel); a failed or cancelled pass writes nothing.
    """
    spec.validate()
    if spec.corpus == "identity":
        return SecondMoment(matrix=None, layer=layer, spec=spec, count=0)
    return handle.weights.derived(("second_moment", layer, spec), lambda: _stored_second_moment(handle, layer, spec, progress), progress)


def _stored_second_moment(handle: LoadedModel, layer: int, spec: StatsSpec, progress: Progress) -> SecondMoment:
    folder = stats_folder(handle, spec)
    folder.mkdir(parents=True, exist_ok=True)
    width = handle.arch.mlp_out_weight(layer).shape[1]
    # Another process computing the same C: wait for it, then read its file. A thread holding the model's
    # lock must not wait for a pass of this process (that pass needs the lock): it computes C itself.
    file_lock = FileLock(str(folder) + ".lock", timeout=0 if handle.weights.held() else -1)
    try:
        file_lock.acquire()
    except Timeout:
        pass
    try:
        loaded = _load_layer(folder, layer, width)
        if loaded is None:
            progress(0.0, f"reading the statistics corpus: {describe_corpus(spec)}, {spec.tokens:,} tokens")
            rows = corpus_rows(handle, spec, progress)
            layers = sorted(set(_layers_to_compute(handle, layer, spec)) | {layer})
            moments, count = accumulate_second_moments(handle, rows, layers, progress, start=0.8 if spec.corpus == "sample" else 0.0)
            for computed, matrix in moments.items():
                _save_layer(folder, computed, matrix, count)
            # As stored (float32, back in float64): the first edit gets the numbers every later one reads.
            loaded = (stored_precision(moments[layer]), count)
    finally:
        if file_lock.is_locked:
            file_lock.release()
    return SecondMoment(matrix=loaded[0], layer=layer, spec=spec, count=loaded[1])


def cache_second_moments(handle: LoadedModel, layers: Sequence[int], spec: StatsSpec, progress: Progress = no_progress) -> None:
    """Compute, in one pass over the corpus, the C of each of ``layers`` that is not cached yet.

    For work that edits at many layers (a layer sweep): one pass to the deepest layer costs about what
    the pass for that layer alone costs, where layer-by-layer passes would read the corpus once each.
    """
    spec.validate()
    if spec.corpus == "identity":
        return
    folder = stats_folder(handle, spec)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock", timeout=-1):
        missing = [layer for layer in layers
                   if _load_layer(folder, layer, handle.arch.mlp_out_weight(layer).shape[1]) is None]
        if not missing:
            return
        rows = corpus_rows(handle, spec, progress)
        width = handle.arch.mlp_out_weight(missing[0]).shape[1]
        per_pass = max(1, ALL_LAYERS_BUDGET_BYTES // (width * width * 8))  # float64 accumulators that fit
        for begin in range(0, len(missing), per_pass):
            moments, count = accumulate_second_moments(handle, rows, sorted(missing)[begin : begin + per_pass], progress)
            for layer, matrix in moments.items():
                _save_layer(folder, layer, matrix, count)


def _load_layer(folder: Path, layer: int, width: int | None = None, path: Path | None = None) -> tuple[torch.Tensor, int] | None:
    """The cached C of ``layer`` (or the file ``path``) and its key count, or None when missing or damaged.

    Damaged covers unreadable files and readable ones of the wrong shape: not a dict of this format with
    a positive count, or a matrix that is not a finite square float tensor (``width`` wide, when given).
    """
    try:
        stored = torch.load(path or folder / f"layer_{layer}.pt", weights_only=True)
    except Exception:  # noqa: BLE001 - whatever a missing or damaged file raises (truncated zip, bad pickle), recompute
        return None
    if not isinstance(stored, dict) or stored.get("format") != STATS_FORMAT:
        return None
    count, matrix = stored.get("count"), stored.get("matrix")
    if not is_whole_number(count) or count <= 0:
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


def read_second_moment_file(path: str | Path, layer: int, width: int) -> SecondMoment:
    """C from a file: this project's layer file (``layer_N.pt``) or an ``.npz`` in the layout of ROME's
    ``runningstats`` (``mom2.mom2``, the sum of k kᵀ, and ``mom2.count``; C = mom2 / count).

    The second lets users of GPT-2 XL and GPT-J edit with the statistics ROME's authors published, and
    anyone compare this editor with the reference code on the same C.
    """
    path = Path(path).expanduser()
    shown = quoted(str(path))
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as stored:
                if "mom2.mom2" not in stored or "mom2.count" not in stored:
                    raise InputError(f"{shown} has no mom2.mom2 and mom2.count arrays; give ROME's layer_stats .npz")
                count = float(stored["mom2.count"])
                matrix = torch.from_numpy(np.asarray(stored["mom2.mom2"], dtype=np.float64)) / count
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a damaged archive raises
            raise InputError(f"{shown} is not a readable .npz ({error.__class__.__name__})") from None
        if not count > 0:
            raise InputError(f"{shown}: mom2.count must be positive")
        count = int(count)
    else:
        loaded = _load_layer(path.parent, layer, None, path)
        if loaded is None:
            raise InputError(f"{shown} is not a statistics layer file of this project (format {STATS_FORMAT}) nor an .npz")
        matrix, count = loaded
    if matrix.ndim != 2 or tuple(matrix.shape) != (width, width) or not bool(torch.isfinite(matrix).all()):
        raise InputError(f"{shown} holds a {'x'.join(map(str, matrix.shape))} matrix; layer {layer} needs a finite {width}x{width} C")
    return SecondMoment(matrix=matrix.double(), layer=layer, spec=StatsSpec(), count=count, source=str(path))


def stored_precision(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` as a cached C holds it (float32, half the disk), returned in float64 as every solve uses it."""
    return matrix.float().double()


def _save_layer(folder: Path, layer: int, matrix: torch.Tensor, count: int) -> None:
    """One layer's C and key count in one file, renamed into place: readers never see half of it."""
    stored = {"format": STATS_FORMAT, "count": count, "matrix": matrix.float().contiguous()}
    write_atomically(folder / f"layer_{layer}.pt", lambda path: torch.save(stored, path))


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
