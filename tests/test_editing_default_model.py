"""ROME on the real default model: the edit takes, its paraphrase follows, a neighbour keeps its answer,
and the weights come back bit for bit."""
from __future__ import annotations

import numpy as np
import torch

from explorer.compare import Probes, compare
from explorer.editing import EditOptions, compute_edit, default_layer, make_request, traced_peak_layer
from explorer.edits import EditSession
from explorer.stats import StatsSpec


def test_eiffel_tower_moves_to_rome(default_model):
    handle = default_model
    request = make_request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
    weight = handle.arch.mlp_out_weight(1).detach().clone()
    # The default layer (1); C = identity keeps CI from sampling the statistics corpus (minutes).
    edit = compute_edit(handle, request, EditOptions(stats=StatsSpec(corpus="identity")))
    assert edit.layer == 1
    session = EditSession(handle)  # compare() adds the edit for "after" only
    probes = Probes(
        paraphrases=("The Eiffel Tower can be found in the city of",),
        neighborhood=("The Louvre is located in the city of",),
        generate=("The Eiffel Tower is located in",),
        new_tokens=8,
    )
    report = compare(session, edit, probes)
    before, after = report["before"], report["after"]
    assert before["target_true_prob"] > 0.5 > before["target_new_prob"]
    assert after["target_new_prob"] > 0.9 and after["target_true_prob"] < 0.05
    assert after["paraphrases"]["target_new_prob"][0] > after["paraphrases"]["target_true_prob"][0]
    louvre = after["neighborhood"]
    assert louvre["target_true_prob"][0] > louvre["target_new_prob"][0], "the edit spilled onto the Louvre"
    assert "Rome" in after["generations"][0]["text"] and "Rome" not in before["generations"][0]["text"]
    assert torch.equal(handle.arch.mlp_out_weight(1), weight)
    assert not report["warnings"], report["warnings"]
    assert np.isfinite(edit.delta_norm) and edit.stats["corpus"] == "identity"


def test_traced_peak_layer_is_early_to_middle(default_model):
    assert default_layer(default_model) == 1  # measured: docs/evaluation.md's settings tables
    layer = traced_peak_layer(default_model, facts_limit=4)
    # The paper's finding, which docs/tracing.md's science check shows on this model: MLP effects at the last
    # subject token peak in early-to-middle layers (layer 4 of 18 here).
    assert 1 <= layer <= default_model.num_layers // 2
