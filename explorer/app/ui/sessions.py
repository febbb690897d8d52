"""The models the app shares and each browser session's state (its model, its edits, its files), and loading another model."""
from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from ...core.models import DEFAULT_MODEL, LoadedModel, load_model
from ...editing.edits import EditSession
from .. import plots
from ..model_policy import check_model
from ..preparation import Preparation, Status
from . import config
from .errors import user_errors

# The registry's lock guards the dictionaries only: a model loads under a lock of its own name, so a slow load
# never stalls sessions that use another model.
_registry = threading.Lock()
_models: OrderedDict[str, LoadedModel] = OrderedDict()  # the most recently used, at most MAX_LOADED_MODELS
# Models dropped from _models that a session still holds: asked for again, they are reused, never loaded twice.
_retired: weakref.WeakValueDictionary[str, LoadedModel] = weakref.WeakValueDictionary()
_loading: dict[str, threading.Lock] = {}
_preparations: dict[str, Preparation] = {}
# Every browser session's workspace: a model dropped from _models is let go by all of them, so that the models in
# memory are counted across sessions (a running job keeps its own until it ends).
_workspaces: weakref.WeakSet[Workspace] = weakref.WeakSet()


def shared_model(name: str = DEFAULT_MODEL, progress=None) -> LoadedModel:
    """The one loaded copy of ``name`` that every session shares."""
    with _registry:
        handle = _kept(name)
        if handle is not None:
            return handle
        loading = _loading.setdefault(name, threading.Lock())
    with loading:
        with _registry:
            handle = _kept(name)
        if handle is not None:
            return handle
        handle = load_model(name, progress=progress)
        with _registry:
            _models[name] = handle
            # A fresh copy: the preparation of an earlier, dropped copy does not hold for it.
            earlier = _preparations.pop(name, None)
            _drop_least_recent()
    if earlier is not None:
        start_preparation(name)  # the copy loaded again is prepared as the first one was
    return handle


def _kept(name: str) -> LoadedModel | None:
    """The loaded copy of ``name``, if there is one (call holding ``_registry``)."""
    handle = _models.get(name)
    if handle is None:
        handle = _retired.pop(name, None)
        if handle is None:
            return None
        _models[name] = handle
    _models.move_to_end(name)
    _drop_least_recent()
    return handle


def _drop_least_recent() -> None:
    """Keep at most MAX_LOADED_MODELS in the registry, releasing the least recently used model that no job runs
    on (the least recently used one if every model is busy). Every session lets the released model go, keeping
    its edits for when it needs the model again; a job still running on it keeps it reachable (call holding
    ``_registry``)."""
    while len(_models) > config.MAX_LOADED_MODELS:
        busy = {workspace.model_name for workspace in list(_workspaces) if workspace.has_running_jobs()}
        idle = [name for name in _models if name not in busy]
        dropped = idle[0] if idle else next(iter(_models))
        copy = _models.pop(dropped)
        _retired[dropped] = copy
        for workspace in list(_workspaces):
            workspace.let_go(copy)


def start_preparation(name: str) -> Preparation:
    """Load ``name`` and prepare its default edit in the background, once per loaded copy of the model."""
    with _registry:
        preparation = _preparations.setdefault(name, Preparation(name))
    return preparation.start(lambda progress: shared_model(name, progress=progress), config.EDIT_OPTIONS)


class Workspace:
    """One browser session's state: its model, its edits over that shared model, its running jobs, its files."""

    def __init__(self, model_name: str = DEFAULT_MODEL):
        self.model_name = model_name
        self._session: EditSession | None = None
        self._let_go: tuple[list, set] | None = None  # the session's edits (and those off) while its model is released
        self._files: dict[str, Path] = {}
        self._jobs: weakref.WeakSet[threading.Event] = weakref.WeakSet()  # the cancel flags of jobs still running
        _workspaces.add(self)

    def __deepcopy__(self, memo) -> Workspace:
        # Gradio deep-copies a State's initial value for each new browser session: start that one empty.
        return Workspace(self.model_name)

    @property
    def session(self) -> EditSession:
        """This session's edits over its model; a model released from memory meanwhile is loaded again, with the
        session's edits on it as before."""
        session = self._session
        if session is None:
            handle = shared_model(self.model_name)
            kept, self._let_go = self._let_go, None
            session = EditSession(handle) if kept is None else EditSession.carrying(handle, *kept)
            self._session = session
        return session

    def let_go(self, handle: LoadedModel) -> None:
        """Stop holding ``handle`` (released from memory), keeping the edits made on it."""
        if self._session is not None and self._session.handle is handle:
            self._let_go = (self._session.edits, self._session.switched_off)
            self._session = None

    def has_running_jobs(self) -> bool:
        return len(self._jobs) > 0

    def switch_model(self, name: str, handle: LoadedModel) -> None:
        """Work on ``handle`` from now on; edits made on the previous model are dropped."""
        self.model_name, self._session = name, EditSession(handle)

    def new_job(self) -> threading.Event:
        """A cancel flag for a job starting now, set by :meth:`cancel_jobs` while the job runs."""
        flag = threading.Event()
        self._jobs.add(flag)
        return flag

    def cancel_jobs(self) -> None:
        """Ask every job of this session that is still running to stop (each at its next progress step)."""
        for flag in list(self._jobs):
            flag.set()

    def files(self, kind: str) -> Path:
        """This session's download folder for results of ``kind`` ("trace", "average", "severed"), emptied for each
        new result of that kind: the links another tab still shows keep working."""
        old = self._files.pop(kind, None)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._files[kind] = Path(tempfile.mkdtemp(prefix=f"rome-explorer-{kind}-"))
        return self._files[kind]

    def close(self) -> None:
        """Remove this session's download folders (Gradio calls it when the session's state is deleted)."""
        for folder in self._files.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._files.clear()


EDIT_LIST_HEADERS = ["#", "applied", "subject", "prompt", "target_new", "layer", "method", "|ΔW|"]


def active_rows(session: EditSession) -> list[list]:
    """The session's edits, oldest first, each applied ("on") or kept but switched off ("off")."""
    return [[i + 1, "on" if e["on"] else "off", e["request"]["subject"], e["request"]["prompt"], e["request"]["target_new"],
             e["layer"], e["method"], round(e["delta_norm"], 3)] for i, e in enumerate(session.active())]


def model_summary(handle: LoadedModel) -> str:
    parameters = sum(p.numel() for p in handle.model.parameters())
    return (f"**{plots.safe_label(handle.name)}**: {handle.arch.model_type}, {handle.num_layers} layers, "
            f"{parameters / 1e6:.0f}M parameters")


def status_line(workspace: Workspace):
    """The model status line: this session's model and its background preparation; the poll stops once it is done."""
    name = workspace.model_name
    preparation = _preparations.get(name)
    status = preparation.status() if preparation else None
    loaded = _models.get(name)
    line = model_summary(loaded) if loaded is not None else f"Model: **{plots.safe_label(name)}**"
    if status is None:
        line += "" if loaded is not None else " (loaded on first use)"
    elif status.running:
        line += f" · {plots.safe_label(status.message)} ({100 * status.fraction:.0f}%)"
    else:
        line += f" · {'could not prepare: ' if status.failed else ''}{plots.safe_label(status.message)}"
    return line, gr.Timer(active=bool(status and status.running))


def preparation_status(name: str) -> dict:
    """Where the background preparation of model ``name`` stands, for scripts that wait for it."""
    preparation = _preparations.get(name)
    status = preparation.status() if preparation else Status(0.0, "not started", running=False, loaded=name in _models)
    return {"model": name, **status.to_json()}


@user_errors
def load_session_model(name, workspace: Workspace, progress=gr.Progress()):
    """Switch this session to another model (a hub name or a local folder); its edits on the old model are dropped."""
    name = str(name or "").strip() or DEFAULT_MODEL
    check_model(name, config.LIMITS)  # which models, how large: refused here before anything is loaded or downloaded
    handle = shared_model(name, progress=lambda f, m: progress(f, desc=m))
    workspace.switch_model(name, handle)
    start_preparation(name)  # the model is loaded: this prepares its first edit in the background
    line, poll = status_line(workspace)
    return line, active_rows(workspace.session), workspace, poll
