"""A look inside one cell: its restored answer equals the trace's score, its read-outs are the model's own."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer import cli
from explorer.core.errors import InputError
from explorer.tracing import KINDS, TraceOptions, trace
from explorer.tracing.inspection import inspect_cell, parse_cell
from tests.conftest import build_tiny

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_restored_answer_equals_the_traces_cell_and_the_lens_reads_the_model(family):
    handle = build_tiny(family)
    options = TraceOptions(samples=3, window=3, seed=2)
    result = trace(handle, PROMPT, SUBJECT, options)
    last_subject, last = result.subject_range[1] - 1, len(result.tokens) - 1
    for kind in KINDS:
        for token, layer in ((last_subject, 1), (last, 2), (result.subject_range[0], 0)):
            found = inspect_cell(handle, PROMPT, SUBJECT, kind, token, layer, options)
            assert found.answer_restored == pytest.approx(result.scores[kind][token, layer], abs=1e-5), (kind, token, layer)
            assert found.answer_corrupted == result.low_score and found.answer_clean == result.high_score
            assert found.restored_layers == ([layer] if kind == "hidden" else list(range(max(0, layer - 1), min(4, layer + 2))))
    # The logit lens after the last layer at the last token is the model's own next-token distribution.
    found = inspect_cell(handle, PROMPT, SUBJECT, "hidden", last, handle.num_layers - 1, options)
    ids = handle.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = torch.softmax(handle.model(input_ids=ids).logits[0, -1].double(), dim=-1)
    top = probs.topk(5)
    assert [text for text, _p in found.lens_clean] == [handle.tokenizer.decode([int(i)]) for i in top.indices]
    np.testing.assert_allclose([p for _t, p in found.lens_clean], top.values.numpy(), atol=1e-6)
    # A restored hidden state is the clean one: the same read-out.
    assert [t for t, _p in found.lens_restored] == [t for t, _p in found.lens_clean]
    np.testing.assert_allclose([p for _t, p in found.lens_restored], [p for _t, p in found.lens_clean], atol=1e-6)
    assert found.output_restored[0][1] >= found.output_restored[-1][1]


def test_cells_out_of_range_and_bad_cells_are_clear_errors():
    handle = build_tiny("gpt2")
    with pytest.raises(InputError, match="token 99 is out of range"):
        inspect_cell(handle, PROMPT, SUBJECT, "mlp", 99, 1)
    with pytest.raises(InputError, match="layer 4 is out of range; this model has layers 0 to 3"):
        inspect_cell(handle, PROMPT, SUBJECT, "mlp", 1, 4)
    for text in ("mlp,1", "neuron,1,2", "mlp,a,2", ""):
        with pytest.raises(InputError, match="kind,token,layer"):
            parse_cell(text)
    assert parse_cell(" attn , 3, 7") == ("attn", 3, 7)


def test_inspect_command_writes_the_read_outs(tmp_path):
    folder = tmp_path / "tiny"
    tiny = build_tiny("llama")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    out = tmp_path / "cell.json"
    assert cli.main(["inspect", PROMPT, "--subject", SUBJECT, "--cell", "mlp,5,1", "--model", str(folder),
                     "--samples", "2", "--window", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["kind"], data["token"], data["layer"]) == ("mlp", 5, 1) and len(data["lens_clean"]) == 5
    assert cli.main(["inspect", PROMPT, "--cell", "mlp;5;1", "--model", str(folder)]) == 2
