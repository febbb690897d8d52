"""ROME on the real default model: the edit takes, its paraphrase follows, a neighbour keeps its answer,
and the weights come back bit for bit."""
from __future__ import annotations

import numpy as np
import torch

from explorer.editing import EditOptions, default_layer, edit_fact, make_request, traced_peak_layer
from explorer.editing.edits import EditSession
from explorer.editing.statistics import StatsSpec
from explorer.studies.compare import Probes, compare


def test_eiffel_tower_moves_to_rome(default_model):
    handle = default_model
    request = make_request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
    weight = handle.arch.mlp_out_weight(1).detach().clone()
    # The default layer (1); C = identity keeps CI from sampling the statistics corpus (minutes).
    edit = edit_fact(EditSession(handle), request, EditOptions(stats=StatsSpec(corpus="identity")))
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


def test_the_embedded_models_settings_follow_its_weights_not_its_load_name(default_model):
    """Loaded from its converted folder, the embedded model is the same model: same fingerprint, so the same
    measured settings (layer 1, clamp 0.5, early stop 0.3), not the family's and the paper's (bug 5 of issue 27)."""
    from explorer.core.models import EMBEDDED_FINGERPRINT, default_model_folder, load_model, model_fingerprint
    from explorer.editing.settings import resolve_settings

    assert model_fingerprint(default_model) == EMBEDDED_FINGERPRINT, "update EMBEDDED_FINGERPRINT (the model's id changed)"
    folder, _ = default_model_folder()
    by_path = load_model(str(folder))
    assert by_path.name != default_model.name and model_fingerprint(by_path) == EMBEDDED_FINGERPRINT
    for handle in (default_model, by_path):
        assert default_layer(handle) == 1
        value = resolve_settings(handle, EditOptions(), default_layer(handle)).value
        assert (value.clamp_factor, value.loss_stop, value.weight_decay) == (0.5, 0.3, 1e-3)
