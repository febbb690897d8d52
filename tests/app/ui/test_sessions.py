"""Models held in memory are counted across browser sessions: the least recently used idle one is released by
every session, and a session that needs it again gets it back with its edits."""
from __future__ import annotations

import gc
import weakref

import torch

from explorer.app import ui
from explorer.app.ui import sessions
from explorer.editing import EditOptions, StatsSpec, edit_fact, make_request
from tests.conftest import build_tiny


def empty_registry(monkeypatch) -> None:
    """No model loaded and no session yet, with room for two models."""
    monkeypatch.setattr(sessions, "_models", type(sessions._models)())
    monkeypatch.setattr(sessions, "_retired", weakref.WeakValueDictionary())
    monkeypatch.setattr(sessions, "_loading", {})
    monkeypatch.setattr(sessions, "_workspaces", weakref.WeakSet())
    monkeypatch.setattr(ui.config, "MAX_LOADED_MODELS", 2)


def test_sessions_do_not_pin_more_models_than_the_cap_and_get_theirs_back_with_their_edits(monkeypatch):
    loads: list[str] = []

    def load(name, progress=None):
        loads.append(name)
        return build_tiny("llama")  # the same seed: every copy has the same weights, as a model loaded again does

    monkeypatch.setattr(sessions, "load_model", load)
    empty_registry(monkeypatch)

    first, second, third = (ui.Workspace(name) for name in ("a", "b", "c"))
    session = first.session
    options = EditOptions(steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"), layer=1)
    edit = edit_fact(session, make_request("{} is in", "The Eiffel Tower", " Rome"), options)
    session.add(edit)
    with session.applied():
        edited_weight = session.handle.arch.mlp_out_weight(1).detach().clone()
    held = weakref.ref(session.handle)
    del session
    second.session, third.session  # noqa: B018 - loading "b" then "c" goes over the cap of two
    gc.collect()
    assert held() is None, "a session kept a model released from memory"
    assert list(sessions._models) == ["b", "c"]

    again = first.session  # loaded again, with the session's edit on it
    assert loads == ["a", "b", "c", "a"]
    assert len(again.edits) == 1 and again.edits[0] is edit
    with again.applied():
        assert torch.equal(again.handle.arch.mlp_out_weight(1), edited_weight)
    assert list(sessions._models) == ["c", "a"]


def test_a_model_a_job_runs_on_is_not_the_one_released(monkeypatch):
    monkeypatch.setattr(sessions, "load_model", lambda name, progress=None: build_tiny("gpt2"))
    empty_registry(monkeypatch)

    busy, idle, newcomer = (ui.Workspace(name) for name in ("busy", "idle", "new"))
    busy.session, idle.session  # noqa: B018
    running = busy.new_job()  # a job of the least recently used model is still running
    newcomer.session  # noqa: B018
    assert list(sessions._models) == ["busy", "new"]
    assert busy._session is not None and idle._session is None
    del running
