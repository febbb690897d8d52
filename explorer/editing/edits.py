"""Edits as data, and the one object that applies and undoes them.

An :class:`Edit` holds its request, layer, method and update (ROME's two rank-one vectors, or FT's
dense matrix); it can be saved to a file and re-applied to the same model.

An :class:`EditSession` is one user's stack of edits. The shared model carries a session's edits only
while :meth:`EditSession.applied` is open, under the model's lock: another session's traces and
generations, which take the same lock, never see them. Leaving the block copies the saved original
matrices back, so the weights return bit for bit (nothing is subtracted).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError
from ..core.models import LoadedModel, model_fingerprint

EDIT_FORMAT = 1
ARRAY_FIELDS = ("right", "left", "dense", "key", "value")
# An update this many times the Frobenius norm of the whole matrix it changes is almost surely broken.
BROKEN_NORM_RATIO = 1.0


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``subject``'s object after ``prompt`` (a template with ``{}``) to ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def filled(self) -> str:
        """The prompt with the subject written in."""
        return self.prompt.replace("{}", self.subject, 1)


@dataclass
class Edit:
    """A computed edit of one layer's MLP output projection: ΔW = right ⊗ left, or ``dense``."""

    request: EditRequest
    layer: int
    method: str
    model: str  # fingerprint of the model it was computed on
    weight_shape: tuple[int, int]  # [out, in]
    right: np.ndarray | None  # Λ, [out]
    left: np.ndarray | None  # C⁻¹k*, [in]
    dense: np.ndarray | None  # FT's ΔW, [out, in]
    stats: dict
    weight_norm: float
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)
    key: np.ndarray | None = None  # the key the update maps exactly (k*, or the bare prompt's for rome-original)
    value: np.ndarray | None = None  # v*, what W' maps that key to

    @property
    def digest(self) -> str:
        """An id of the weight change this edit makes (layer, method and update values): equal ids, equal weights."""
        hasher = hashlib.sha256(f"{self.model}|{self.layer}|{self.method}".encode())
        for name in ("right", "left", "dense"):
            array = getattr(self, name)
            hasher.update(name.encode() + (b"-" if array is None else np.ascontiguousarray(array).tobytes()))
        return hasher.hexdigest()

    def update(self) -> torch.Tensor:
        """ΔW as a float64 [out, in] tensor."""
        if self.dense is not None:
            return torch.from_numpy(self.dense).double()
        return torch.outer(torch.from_numpy(self.right).double(), torch.from_numpy(self.left).double())

    @property
    def delta_norm(self) -> float:
        """Frobenius norm of ΔW (for a rank-one update, ‖Λ‖·‖u‖)."""
        if self.dense is not None:
            return float(np.linalg.norm(self.dense))
        return float(np.linalg.norm(self.right) * np.linalg.norm(self.left))

    def warnings(self) -> list[str]:
        """What makes this edit look broken, if anything."""
        found = []
        arrays = [a for a in (self.right, self.left, self.dense) if a is not None]
        if any(not np.isfinite(a).all() for a in arrays):
            found.append("the update contains NaN or infinite values; do not apply it")
        elif self.delta_norm > BROKEN_NORM_RATIO * self.weight_norm:
            found.append(
                f"the update norm {self.delta_norm:.3g} exceeds the whole matrix's norm {self.weight_norm:.3g}; "
                "the edit may break the model (try another layer or the rome method)"
            )
        return found

    def summary(self) -> dict:
        """A short description for lists and reports."""
        return {
            "request": asdict(self.request),
            "layer": self.layer,
            "method": self.method,
            "delta_norm": self.delta_norm,
            "relative_norm": self.delta_norm / self.weight_norm if self.weight_norm else float("inf"),
            "stats": self.stats,
        }

    def save(self, path: str | Path) -> Path:
        """Write the edit as an .npz file (arrays plus a JSON header)."""
        path = Path(path)
        header = {
            "format": EDIT_FORMAT,
            "request": asdict(self.request),
            "layer": self.layer,
            "method": self.method,
            "model": self.model,
            "weight_shape": list(self.weight_shape),
            "stats": self.stats,
            "weight_norm": self.weight_norm,
            "seconds": self.seconds,
            "phases": self.phases,
        }
        arrays = {name: getattr(self, name) for name in ARRAY_FIELDS if getattr(self, name) is not None}
        with path.open("wb") as handle:
            np.savez(handle, header=np.array(json.dumps(header)), **arrays)
        return path


def load_edit(path: str | Path) -> Edit:
    """An edit saved by :meth:`Edit.save`, or :class:`InputError` saying why it cannot be read."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {key: data[key].copy() for key in ARRAY_FIELDS if key in data.files}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise InputError(f"{path} is not a saved edit ({type(error).__name__}); save one with --save-edit") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a saved edit (its header is not a JSON object); save one with --save-edit")
    if header.get("format") != EDIT_FORMAT:
        found = header.get("format")
        shown = found if isinstance(found, int) else repr(str(found)[:20])
        raise InputError(f"{path} has edit format {shown}, this version reads {EDIT_FORMAT}")
    try:
        request = EditRequest(**header["request"])
        if not all(isinstance(text, str) for text in (request.prompt, request.subject, request.target_new)):
            raise TypeError("request texts")
        if request.target_true is not None and not isinstance(request.target_true, str):
            raise TypeError("request texts")
        return Edit(
            request=request,
            layer=int(header["layer"]),
            method=str(header["method"]),
            model=str(header["model"]),
            weight_shape=tuple(int(n) for n in header["weight_shape"]),
            right=arrays.get("right"),
            left=arrays.get("left"),
            dense=arrays.get("dense"),
            stats=dict(header["stats"]),
            weight_norm=float(header["weight_norm"]),
            seconds=float(header.get("seconds", 0.0)),
            phases=dict(header.get("phases", {})),
            key=arrays.get("key"),
            value=arrays.get("value"),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise InputError(f"{path} is not a saved edit (its header is damaged: {type(error).__name__}); save one with --save-edit") from None


class EditSession:
    """One user's stack of edits over a shared model; the model is edited only inside :meth:`applied`.

    An edit can be switched off: it stays in the stack, in its place, but is not applied until switched
    on again (``switched_off`` holds the positions of those).
    """

    def __init__(self, handle: LoadedModel) -> None:
        self.handle = handle
        self.edits: list[Edit] = []
        self.switched_off: set[int] = set()

    def check(self, edit: Edit) -> None:
        """Raise :class:`InputError` if ``edit`` was not made for this model."""
        if edit.model != model_fingerprint(self.handle):
            raise InputError(f"the edit was computed on model {edit.model}, not {model_fingerprint(self.handle)}")
        if not 0 <= edit.layer < self.handle.num_layers:
            raise InputError(f"the edit's layer {edit.layer} does not exist in this model")
        shape = tuple(self.handle.arch.mlp_out_weight(edit.layer).shape)
        if tuple(edit.weight_shape) != shape:
            raise InputError(f"the edit's matrix shape {tuple(edit.weight_shape)} differs from the model's {shape}")
        out, width = shape
        if edit.dense is not None:
            arrays, shapes = [edit.dense], [(out, width)]
        else:
            arrays, shapes = [edit.right, edit.left], [(out,), (width,)]
        for array, expected in zip(arrays, shapes):
            if not isinstance(array, np.ndarray) or array.dtype.kind != "f" or array.shape != expected:
                raise InputError(f"the edit's update does not have the shape {expected} of this model's matrix; it was not applied")
            if not np.isfinite(array).all():
                raise InputError("the edit contains NaN or infinite values; it was not applied")

    def add(self, edit: Edit) -> None:
        """Stack ``edit`` on the session's edits (it takes effect inside :meth:`applied`)."""
        self.check(edit)
        self.edits.append(edit)

    def _position(self, index: int, what: str) -> int:
        if not self.edits:
            raise InputError(f"there is no edit to {what}")
        if not -len(self.edits) <= index < len(self.edits):
            raise InputError(f"there is no edit number {index}; the session has {len(self.edits)}")
        return index % len(self.edits)

    def undo(self, index: int = -1) -> Edit:
        """Remove one edit (the last by default) and return it."""
        position = self._position(index, "undo")
        self.switched_off = {p if p < position else p - 1 for p in self.switched_off if p != position}
        return self.edits.pop(position)

    def clear(self) -> None:
        """Remove every edit."""
        self.edits.clear()
        self.switched_off.clear()

    def switch(self, index: int, on: bool) -> None:
        """Apply edit ``index`` again (``on``) or keep it without applying it."""
        position = self._position(index, "switch")
        if on:
            self.switched_off.discard(position)
        else:
            self.switched_off.add(position)

    def toggle(self, index: int) -> bool:
        """Switch edit ``index`` off if it is applied, on if it is not; whether it is applied now."""
        position = self._position(index, "switch")
        self.switch(position, on=position in self.switched_off)
        return position not in self.switched_off

    def with_edit(self, edit: Edit) -> EditSession:
        """A session of the same model applying this one's applied edits and then ``edit`` (this one is unchanged)."""
        trial = self.frozen()
        trial.edits.append(edit)
        return trial

    @classmethod
    def carrying(cls, handle: LoadedModel, edits: Sequence[Edit], switched_off: Iterable[int] = ()) -> EditSession:
        """A session on ``handle`` with ``edits`` (the positions ``switched_off`` kept but not applied), each
        checked against it: another session's edits on a copy of the same model loaded again."""
        session = cls(handle)
        for edit in edits:
            session.add(edit)
        session.switched_off = set(switched_off)
        return session

    def frozen(self) -> EditSession:
        """A session of the same model applying this one's applied edits as they are now (later changes to this
        one do not reach it)."""
        trial = EditSession(self.handle)
        trial.edits = self.applied_edits()
        return trial

    def applied_edits(self) -> list[Edit]:
        """The edits :meth:`applied` applies: every one not switched off, oldest first."""
        return [edit for position, edit in enumerate(self.edits) if position not in self.switched_off]

    def active(self) -> list[dict]:
        """Summaries of the session's edits, oldest first, each saying whether it is applied (``on``)."""
        return [{**edit.summary(), "on": position not in self.switched_off} for position, edit in enumerate(self.edits)]

    @contextmanager
    def applied(self) -> Iterator[LoadedModel]:
        """Hold the model's lock with this session's edits applied; the exact originals come back on exit
        (:meth:`Weights.edited <explorer.core.weights.Weights.edited>`)."""
        with self.handle.weights.edited([(edit.layer, edit.update) for edit in self.applied_edits()]):
            yield self.handle
