"""The editing engine against the plain oracle (explorer/testing/edit_oracle.py, which imports nothing from explorer).

Tiny random models of three families, fixed context templates (``templates``) and a fixed C read from a file
(``stats_file``, in ROME's runningstats ``.npz`` layout and as this project's layer file): k* (through u = C⁻¹k*),
the loss at every step, v*, Λ and ΔW must equal the oracle's for ``rome`` (with the project's strengthening),
``rome-original`` and ``--settings reference``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from explorer.editing import EditOptions, EditSession, edit_fact, make_request
from explorer.editing.statistics import StatsSpec
from explorer.testing.edit_oracle import OracleSettings, oracle_rome
from tests.conftest import build_tiny, one_torch_thread

LAYER = 1
TEMPLATES = ("{}", "The city is large. {}", "It was a long day in the city of Rome. {}")
REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome", "target_true": " Paris"}
# The module ROME rewrites, named here (not through the package's architecture table).
MLP_OUT = {
    "gpt2": lambda model, layer: model.transformer.h[layer].mlp.c_proj,
    "llama": lambda model, layer: model.model.layers[layer].mlp.down_proj,
    "gemma3_text": lambda model, layer: model.model.layers[layer].mlp.down_proj,
}
CASES = {
    # the project's rome: its clamp binds and the edit does not hold at first on a random model, so it is strengthened
    "rome": (EditOptions(method="rome", layer=LAYER, steps=6, clamp_factor=0.05, weight_decay=1e-3, loss_stop=0.3),
             OracleSettings(variant="rome", steps=6, clamp=0.05, decay=1e-3, loss_stop=0.3, strengthen=True)),
    "rome-original": (EditOptions(method="rome-original", layer=LAYER, steps=8, clamp_factor=4.0, weight_decay=0.5, strengthen=False),
                      OracleSettings(variant="rome-original", steps=8, clamp=4.0, decay=0.5, loss_stop=0.05)),
    # every value the reference's: 20 losses at most, clamp 4, decay 0.5, lr 0.5, KL 0.0625, no strengthening
    "reference": (EditOptions(settings="reference", layer=LAYER), OracleSettings(variant="rome-original")),
}


@pytest.fixture(scope="module", params=list(MLP_OUT))
def tiny(request):
    with one_torch_thread():
        yield request.param, build_tiny(request.param)


def _second_moment(handle, layer: int, seed: int = 1) -> tuple[np.ndarray, int]:
    """A well-conditioned random sum of k kᵀ over 200 "keys", and the count: C = sum / count."""
    width = handle.arch.mlp_out_weight(layer).shape[1]
    keys = np.random.default_rng(seed).standard_normal((200, width))
    return keys.T @ keys + 20.0 * np.eye(width), 200


def _stats_file(tmp_path, handle, layout: str):
    summed, count = _second_moment(handle, LAYER)
    if layout == "npz":
        path = tmp_path / "layer_stats.npz"
        np.savez(path, **{"mom2.mom2": summed.astype(np.float32), "mom2.count": np.array(count)})
        return path, torch.from_numpy(summed.astype(np.float32).astype(np.float64) / count)
    path = tmp_path / f"layer_{LAYER}.pt"
    matrix = torch.from_numpy(summed / count).float()
    torch.save({"format": 2, "count": count, "matrix": matrix}, path)
    return path, matrix.double()


def _hard_request(handle) -> dict:
    """REQUEST with its two targets ordered so that the unedited model prefers target_true: the edit must work."""
    ids = handle.tokenizer(REQUEST["prompt"].replace("{}", REQUEST["subject"]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = handle.model(input_ids=ids).logits[0, -1]
    first = {name: handle.tokenizer(REQUEST[name], add_special_tokens=False)["input_ids"][0] for name in ("target_new", "target_true")}
    if logits[first["target_new"]] < logits[first["target_true"]]:
        return dict(REQUEST)
    return {**REQUEST, "target_new": REQUEST["target_true"], "target_true": REQUEST["target_new"]}


@pytest.mark.parametrize("case", list(CASES))
def test_edit_equals_the_oracle(tiny, case, tmp_path):
    family, handle = tiny
    options, settings = CASES[case]
    path, matrix = _stats_file(tmp_path, handle, "npz" if case != "rome" else "pt")
    options = EditOptions(**{**options.__dict__, "templates": TEMPLATES, "stats_file": str(path),
                             "stats": StatsSpec(corpus="identity")})
    with one_torch_thread():
        plain = _hard_request(handle)
        request = make_request(plain["prompt"], plain["subject"], plain["target_new"], plain["target_true"])
        edit = edit_fact(EditSession(handle), request, options)
        want = oracle_rome(handle.model, handle.tokenizer, MLP_OUT[family](handle.model, LAYER), plain, list(TEMPLATES),
                           matrix, settings)
    stats = edit.stats
    assert stats["corpus"] == f"file:{path}" and stats["settings"] == options.settings
    # k*: u = C⁻¹k* is the edit's left vector
    assert torch.allclose(torch.from_numpy(edit.left), want.u, rtol=1e-4, atol=1e-6 * float(want.u.abs().max()))
    # the loss at every step (the report rounds to 4 decimals), and as many steps
    assert len(stats["value_losses"]) == len(want.losses), (stats["value_losses"], want.losses)
    assert np.allclose(stats["value_losses"], want.losses, rtol=1e-4, atol=1e-4), (stats["value_losses"], want.losses)
    assert (stats["delta_scale"], stats["clamp_factor"], stats["holds"]) == pytest.approx((want.scale, want.clamp, want.holds))
    # v*, Λ and ΔW
    assert torch.allclose(torch.from_numpy(edit.value), want.value, rtol=1e-4, atol=1e-5 * float(want.value.norm()))
    assert torch.allclose(torch.from_numpy(edit.right), want.right, rtol=1e-4, atol=1e-5 * float(want.right.norm()))
    relative = float((edit.update() - want.update).norm() / want.update.norm())
    assert relative < 1e-4, relative
    if case == "rome":  # strengthening changed the edit: δ was scaled up, or optimised again with the paper's clamp
        assert stats["delta_scale"] > 1 or stats["clamp_tries"] == 2, stats
    if case == "reference":  # the reference's step semantics: 20 losses, 19 updates, none after the last
        assert stats["value_steps"] == len(want.losses) and stats["strengthen"] is False
