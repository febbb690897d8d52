"""The engines under accelerate's dispatch: a model loaded with a ``device_map`` that keeps some modules in
memory and offloads others to disk traces and edits exactly as the plain load of the same folder does.

An offloaded module's parameters are ``meta`` placeholders; accelerate's AlignDevicesHook (the module's
``_hf_hook``) loads their values from ``_hf_hook.weights_map`` (for a safetensors checkpoint, read from
the checkpoint file itself) before each forward and drops them after it. Reading such a weight, or
writing an edit into it, therefore has to go through that map; and undoing an edit has to leave both
the map and the files on disk as they were.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from explorer.core import models
from explorer.core.models import load_model, model_fingerprint
from explorer.core.scoring import target_probabilities
from explorer.editing import EditOptions, edit_fact, make_request
from explorer.editing import statistics as stats
from explorer.editing.edits import EditSession
from explorer.editing.statistics import StatsSpec
from explorer.tracing import KINDS, TraceOptions, trace, trace_severed
from tests.conftest import CORPUS, build_tiny

PROMPT = "The capital city of Japan is"  # few tokens from the subject on: few restoration passes
SUBJECT = "Japan"
REQUEST = make_request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
SCORED = [REQUEST.filled, "The Eiffel Tower is in", "Where is the Eiffel Tower? In", "The Colosseum is located in the city of"]
TRACE = TraceOptions(samples=2, window=3, seed=2)

# Per family: the device_map. Layers 1 and 3 always sit on disk (the edits below change layers 1 and 3), layers
# 0 and 2 in memory. The head and embedding placements differ: llama's own head on disk, GPT-2's tied
# embedding/head pair and positional embedding on disk, Gemma 3's tied pair in memory and its final norm on disk.
LLAMA_LIKE = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu"}
DEVICE_MAPS = {
    "llama": {**LLAMA_LIKE, "lm_head": "disk"},
    "gpt2": {"transformer.wte": "disk", "lm_head": "disk", "transformer.wpe": "disk", "transformer.ln_f": "cpu"},
    "gemma3_text": {**LLAMA_LIKE, "model.norm": "disk", "lm_head": "cpu"},
}
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gemma3_text": "model.layers"}


def device_map(family: str) -> dict[str, str]:
    return {**DEVICE_MAPS[family], **{f"{LAYERS[family]}.{i}": "disk" if i % 2 else "cpu" for i in range(4)}}


def offload_hook(module: torch.nn.Module):
    """accelerate's AlignDevicesHook of ``module`` when it offloads the module's weights (read here as the
    test's own independent view of accelerate, not through the engine's helpers)."""
    hook = getattr(module, "_hf_hook", None)
    return hook if getattr(hook, "offload", False) else None


def stored_weights(handle) -> dict[str, torch.Tensor]:
    """Every parameter's values as the model holds them: in memory, or in its offload hook's weights_map."""
    values = {}
    for name, parameter in handle.model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        hook = offload_hook(handle.model.get_submodule(owner))
        if parameter.device.type == "meta":
            assert hook is not None, name
            values[name] = hook.weights_map[leaf].detach().clone()
        else:
            values[name] = parameter.detach().clone()
    return values


def files_digest(*folders) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module", params=list(DEVICE_MAPS))
def loads(request, tmp_path_factory):
    """(plain load, dispatched load, checkpoint folder, offload folder) of one tiny model saved to disk."""
    family = request.param
    root = tmp_path_factory.mktemp(f"dispatch-{family}")
    tiny = build_tiny(family)
    tiny.model.save_pretrained(root / "model")
    tiny.tokenizer.save_pretrained(root / "model")
    plain = load_model(str(root / "model"))
    dispatched = load_model(str(root / "model"), device_map=device_map(family), offload_folder=root / "offload")
    # The dispatch is real: some decoder weights (among them the edited projections) are meta placeholders.
    offloaded = {name for name, p in dispatched.model.named_parameters() if p.device.type == "meta"}
    assert {f"{LAYERS[family]}.1.", f"{LAYERS[family]}.3."} <= {name[: len(LAYERS[family]) + 3] for name in offloaded}
    for layer in (1, 3):
        assert dispatched.arch.mlp_out_weight(layer).device.type == "meta"
        assert offload_hook(dispatched.arch.mlp_out(layer)) is not None
    assert not any(name.startswith(f"{LAYERS[family]}.0.") for name in offloaded)
    return plain, dispatched, root / "model", root / "offload"


def test_same_model_same_fingerprint_and_device(loads):
    plain, dispatched, _folder, _offload = loads
    assert dispatched.device == plain.device == torch.device("cpu")
    # Statistics, prefixes and saved edits are keyed by this id: it must not depend on the placement.
    assert model_fingerprint(dispatched) == model_fingerprint(plain)


def test_traces_match_the_plain_load(loads):
    plain, dispatched, _folder, _offload = loads
    # accelerate wraps each module's forward in an instance attribute; the engine swaps forwards during passes.
    wrappers = {name: module.__dict__.get("forward") for name, module in dispatched.model.named_modules()}
    assert wrappers[LAYERS[dispatched.arch.model_type] + ".1.mlp"] is not None
    expected, got = trace(plain, PROMPT, SUBJECT, TRACE), trace(dispatched, PROMPT, SUBJECT, TRACE)
    assert got.answer_id == expected.answer_id
    np.testing.assert_allclose([got.high_score, got.low_score], [expected.high_score, expected.low_score], atol=1e-6, rtol=0)
    for kind in KINDS:
        np.testing.assert_allclose(got.scores[kind], expected.scores[kind], atol=1e-5, rtol=0, err_msg=kind)
    assert np.abs(expected.scores["hidden"] - expected.low_score).max() > 1e-3  # the comparison has something to compare
    expected, got = trace_severed(plain, PROMPT, SUBJECT, TRACE), trace_severed(dispatched, PROMPT, SUBJECT, TRACE)
    for key in expected.scores:
        np.testing.assert_allclose(got.scores[key], expected.scores[key], atol=1e-5, rtol=0, err_msg=key)
    # The traces left accelerate's hooks in place, and the offloaded weights are placeholders again.
    assert {name: module.__dict__.get("forward") for name, module in dispatched.model.named_modules()} == wrappers
    assert dispatched.arch.mlp_out_weight(1).device.type == "meta"


def test_key_statistics_match_the_plain_load(loads):
    plain, dispatched, _folder, _offload = loads
    rows = [plain.tokenizer(line.split('",')[0].strip('"'))["input_ids"] for line in CORPUS[:16]]
    expected, count = stats.accumulate_second_moments(plain, rows, [1, 2], lambda _f, _m: None)
    got, got_count = stats.accumulate_second_moments(dispatched, rows, [1, 2], lambda _f, _m: None)
    assert got_count == count > 0
    for layer in (1, 2):
        torch.testing.assert_close(got[layer], expected[layer], atol=1e-5, rtol=1e-5)


def test_edits_match_the_plain_load_and_undo_restores_every_weight(loads, tmp_path, monkeypatch):
    plain, dispatched, folder, offload = loads
    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(tmp_path / "cache"))  # prefixes made here, not in the suite's cache
    rome = EditOptions(layer=1, steps=4, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))
    ft = EditOptions(method="ft", layer=3, ft_steps=3, ft_norm=0.05, ft_lr=0.01)
    before_files = files_digest(folder, offload)
    before = stored_weights(dispatched)
    hooks_before = {layer: offload_hook(dispatched.arch.mlp_out(layer)).weights_map for layer in (1, 3)}

    edits = {}
    for name, handle in (("plain", plain), ("dispatched", dispatched)):
        edits[name] = [edit_fact(EditSession(handle), REQUEST, rome), edit_fact(EditSession(handle), REQUEST, ft)]
    for expected, got in zip(edits["plain"], edits["dispatched"]):
        assert got.model == expected.model and got.weight_shape == expected.weight_shape
        assert got.weight_norm == pytest.approx(expected.weight_norm, rel=1e-6)
        for field in ("right", "left", "key", "value", "dense"):
            if getattr(expected, field) is not None:
                np.testing.assert_allclose(getattr(got, field), getattr(expected, field), atol=1e-5, rtol=1e-4, err_msg=field)
    assert edits["plain"][0].stats["value_steps"] == edits["dispatched"][0].stats["value_steps"]

    unedited = target_probabilities(plain, SCORED, REQUEST.target_new)
    np.testing.assert_allclose(target_probabilities(dispatched, SCORED, REQUEST.target_new), unedited, atol=1e-6, rtol=0)
    edited = {}
    for name, handle in (("plain", plain), ("dispatched", dispatched)):
        session = EditSession(handle)
        for edit in edits["plain"]:  # the plain load's edits: an edit applies to the same model however loaded
            session.add(edit)
        with session.applied():
            edited[name] = target_probabilities(handle, SCORED, REQUEST.target_new)
            with handle.weights.own():  # values derived from the model see its own weights, also when offloaded
                np.testing.assert_allclose(target_probabilities(handle, SCORED, REQUEST.target_new), unedited, atol=1e-6, rtol=0)
            np.testing.assert_allclose(target_probabilities(handle, SCORED, REQUEST.target_new), edited[name], atol=0, rtol=0)
        session.undo()
        session.undo()
        with session.applied():
            np.testing.assert_allclose(target_probabilities(handle, SCORED, REQUEST.target_new), unedited, atol=1e-6, rtol=0)
    np.testing.assert_allclose(edited["dispatched"], edited["plain"], atol=1e-5, rtol=0)
    assert edited["plain"][0] > 3 * unedited[0]  # the edit does something

    # Undone bit for bit: every weight, in memory or in the offload map, as loaded and as in the plain load.
    after = stored_weights(dispatched)
    plain_weights = dict(plain.model.named_parameters())
    # accelerate's own forward of an offloaded tied embedding (GPT-2's here) unties the head from it: the head
    # then counts as a parameter of its own, whose values are still the embedding's.
    tied = dispatched.model.all_tied_weights_keys
    assert set(plain_weights) <= set(after) <= set(plain_weights) | set(tied)
    for name, value in after.items():
        assert torch.equal(value, before.get(name, before[tied.get(name, name)])), f"{name} differs after the edits were undone"
        assert torch.equal(value, plain_weights.get(name, plain_weights[tied.get(name, name)])), f"{name} differs from the plain load"
    for layer in (1, 3):  # the offload maps are accelerate's own again, and nothing on disk was written
        assert offload_hook(dispatched.arch.mlp_out(layer)).weights_map is hooks_before[layer]
        assert dispatched.arch.mlp_out_weight(layer).device.type == "meta"
    assert files_digest(folder, offload) == before_files
    assert models._fingerprint(dispatched) == model_fingerprint(plain)  # also computed afresh after all those passes
