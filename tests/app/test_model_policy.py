"""Which models the app's model field loads: any locally; where the public can reach it, only those offered,
within the size caps, refused before any weight is read or downloaded (no test touches the network)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import transformers
from huggingface_hub import HfApi

from explorer.app import model_policy, ui
from explorer.app.limits import AppLimits
from explorer.core.errors import InputError, ModelLoadError
from tests.conftest import build_tiny, save_tiny, tiny_config

QUIET = {"progress": lambda *a, **k: None}
POLICY_ENV = ("SPACE_ID", "GRADIO_SHARE", *model_policy.BIND_ENV, model_policy.MODELS_ENV, model_policy.ANY_MODEL_ENV,
              model_policy.START_MODEL_ENV)
PUBLIC = [{"SPACE_ID": "someone/rome-explorer"}, {"GRADIO_SERVER_NAME": "0.0.0.0"}]
REPO = Path(__file__).resolve().parents[2]


def _fail(what: str):
    def called(*args, **kwargs):
        raise AssertionError(f"{what} was called: {args!r}")

    return called


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    """No policy variable from the machine the tests run on; a fresh model registry for the app."""
    for variable in POLICY_ENV:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(ui.sessions, "_models", type(ui.sessions._models)())
    monkeypatch.setattr(ui.sessions, "_preparations", {})
    monkeypatch.setattr(ui.config, "LIMITS", AppLimits())
    # Loading is what is tested here; the first edit's background preparation (a minute on CPU) is not.
    monkeypatch.setattr(ui.sessions, "start_preparation", lambda name: None)
    return monkeypatch


@pytest.fixture()
def no_weights(monkeypatch):
    """Any attempt to load weights (the app's loader, transformers, the hub's file list) fails the test."""
    monkeypatch.setattr(ui.sessions, "load_model", _fail("the app's model loader"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _fail("from_pretrained"))
    monkeypatch.setattr(HfApi, "model_info", _fail("the hub's model_info"))


@pytest.fixture()
def nothing_read(monkeypatch, no_weights):
    """As ``no_weights``, and not even a configuration may be read."""
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _fail("AutoConfig.from_pretrained"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def _tiny_size(folder: Path) -> tuple[int, int]:
    """(parameters, bytes of weight files) of the saved tiny model, counted independently of the policy."""
    parameters = sum(p.numel() for p in build_tiny("gpt2").model.parameters())
    return parameters, sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def _load(name):
    workspace = ui.Workspace()
    status, _edits, workspace, _poll = ui.load_session_model(str(name), workspace, **QUIET)
    return status, workspace


@pytest.mark.parametrize("env, public", [
    ({}, False),
    ({"GRADIO_SERVER_NAME": "127.0.0.1"}, False),
    ({"GRADIO_SERVER_NAME": "localhost"}, False),
    ({"GRADIO_SERVER_NAME": "::1"}, False),
    ({"GRADIO_SERVER_NAME": "[::1]"}, False),
    ({"GRADIO_SERVER_NAME": "127.0.0.2"}, False),
    ({"SPACE_ID": "someone/rome-explorer"}, True),
    ({"GRADIO_SERVER_NAME": "0.0.0.0"}, True),
    ({"GRADIO_SERVER_NAME": "::"}, True),
    ({"GRADIO_SERVER_NAME": ""}, True),  # set but empty: Gradio binds every interface
    ({"GRADIO_SERVER_NAME": "192.168.1.20"}, True),
    ({"GRADIO_SERVER_NAME": "myhost.example"}, True),
    ({"GRADIO_NODE_SERVER_NAME": "0.0.0.0"}, True),
    ({"GRADIO_SHARE": "True"}, True),
    ({"SPACE_ID": ""}, False),
])
def test_public_when_a_space_or_bound_beyond_loopback(env, public):
    assert (model_policy.public_reason(env) is not None) is public
    assert (model_policy.allowed_models(env) is not None) is public  # without a list, local = any model


@pytest.mark.parametrize("env", PUBLIC, ids=["space", "bind"])
def test_public_app_refuses_unlisted_names_and_folders_without_reading_anything(env, tiny_folder, tmp_path, nothing_read, monkeypatch):
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    messages = {}
    for name in ["gpt2", "meta-llama/Llama-3.1-405B", str(tiny_folder), str(tmp_path / "missing"), "/etc", "../models"]:
        with pytest.raises(gr.Error) as refused:
            _load(name)
        messages[name] = str(refused.value)
        assert "this public app only loads default; run the app yourself (see the README)" in messages[name], messages[name]
    # The answer for an existing folder is the answer for a missing one: the field cannot probe the disk.
    assert messages[str(tiny_folder)] == messages[str(tmp_path / "missing")]
    assert not ui.sessions._models and not ui.sessions._preparations
    assert model_policy.field_label() == "Model: 'default' (embedded Gemma 3 270M)"


def test_opt_in_does_not_open_local_paths(nothing_read, tiny_folder, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/rome-explorer")
    monkeypatch.setenv(model_policy.ANY_MODEL_ENV, "1")
    monkeypatch.chdir(tiny_folder.parent)  # a hub-shaped name that is also a folder here: transformers would read it
    for name in [str(tiny_folder), tiny_folder.name, "./x", "../x", "/etc", "~/models", "a/b/c", "a..b", "owner/-x"]:
        with pytest.raises(InputError, match="loads models from the Hugging Face hub only"):
            model_policy.check_model(name, AppLimits())
    assert "a Hugging Face name" in model_policy.field_label() and "local folder" not in model_policy.field_label()


@pytest.mark.parametrize("value", ["0", "false", "", "no", "on please"])
def test_anything_but_a_clear_yes_keeps_the_public_app_closed(value, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/rome-explorer")
    monkeypatch.setenv(model_policy.ANY_MODEL_ENV, value)
    assert model_policy.allowed_models() == {"default"}


def test_public_app_loads_a_listed_model_under_the_caps(tiny_folder, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/rome-explorer")
    monkeypatch.setenv(model_policy.MODELS_ENV, f" {tiny_folder} , other/model")
    assert model_policy.allowed_models() == {"default", str(tiny_folder), "other/model"}
    assert str(tiny_folder) in model_policy.field_label()
    status, workspace = _load(tiny_folder)
    assert "gpt2, 4 layers" in status and workspace.session.handle.arch.model_type == "gpt2"
    assert list(ui.sessions._models) == [str(tiny_folder)]
    # Exactly at both caps still loads: the caps are inclusive.
    parameters, size = _tiny_size(tiny_folder)
    model_policy.check_model(str(tiny_folder), AppLimits(max_model_parameters=parameters, max_model_bytes=size))


def test_over_the_parameter_cap_is_refused_before_the_weights_are_read(tiny_folder, no_weights, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv(model_policy.MODELS_ENV, str(tiny_folder))
    parameters, _size = _tiny_size(tiny_folder)
    monkeypatch.setattr(ui.config, "LIMITS", replace(AppLimits(), max_model_parameters=parameters - 1))
    with pytest.raises(gr.Error, match=rf"has {parameters:,} parameters, over this app's limit of {parameters - 1:,} "
                                       r"\(ROME_EXPLORER_MAX_MODEL_PARAMETERS\); run the app yourself"):
        _load(tiny_folder)
    assert not ui.sessions._models


def test_over_the_byte_cap_is_refused_before_the_weights_are_read(tiny_folder, no_weights, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/rome-explorer")
    monkeypatch.setenv(model_policy.MODELS_ENV, str(tiny_folder))
    _parameters, size = _tiny_size(tiny_folder)
    monkeypatch.setattr(ui.config, "LIMITS", replace(AppLimits(), max_model_bytes=size - 1))
    with pytest.raises(gr.Error, match=rf"has {size:,} bytes of weights, over this app's limit of {size - 1:,} "
                                       r"\(ROME_EXPLORER_MAX_MODEL_BYTES\)"):
        _load(tiny_folder)
    assert not ui.sessions._models


def test_local_app_loads_any_model_and_sets_no_size_cap(tiny_folder, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    monkeypatch.setattr(ui.config, "LIMITS", replace(AppLimits(), max_model_parameters=1, max_model_bytes=1))
    status, _workspace = _load(tiny_folder)
    assert "gpt2, 4 layers" in status and list(ui.sessions._models) == [str(tiny_folder)]


def test_the_start_models_skip_the_caps(nothing_read, monkeypatch):
    """The default and ROME_EXPLORER_MODEL are loaded at start whatever the field asks: no check, no I/O."""
    monkeypatch.setenv("SPACE_ID", "someone/rome-explorer")
    monkeypatch.setenv(model_policy.START_MODEL_ENV, "owner/start-model")
    tiny = AppLimits(max_model_parameters=1, max_model_bytes=1)
    for name in ["default", "owner/start-model"]:
        model_policy.check_model(name, tiny)
    assert model_policy.allowed_models() == {"default", "owner/start-model"}


def _hub(monkeypatch, files: dict[str, int | None], config=None, calls: list | None = None):
    """A fake hub: ``model_info`` lists ``files`` with their sizes, ``AutoConfig`` returns ``config``."""
    def model_info(self, name, files_metadata=False):
        assert files_metadata, "sizes need files_metadata=True"
        if calls is not None:
            calls.append(name)
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f, size=s) for f, s in files.items()])

    monkeypatch.setattr(HfApi, "model_info", model_info)
    if config is not None:
        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda name, *a, **k: config)


@pytest.mark.parametrize("files, expected", [
    # One model.safetensors is what transformers reads; the other formats and subfolders are not downloaded.
    ({"model.safetensors": 500, "pytorch_model.bin": 900, "tf_model.h5": 900, "onnx/model.onnx": 900, "config.json": 1}, 500),
    ({"model.safetensors": 500, "consolidated.safetensors": 500, "adapter_model.safetensors": 9}, 500),
    ({"model-00001-of-00002.safetensors": 6_000, "model-00002-of-00002.safetensors": 5_000,
      "model.safetensors.index.json": 10, "pytorch_model.bin": 1}, 11_000),
    ({"pytorch_model.bin": 700, "flax_model.msgpack": 900}, 700),
    ({"pytorch_model-00001-of-00002.bin": 300, "pytorch_model-00002-of-00002.bin": 300}, 600),
])
def test_hub_weight_sizes_come_from_the_file_metadata(files, expected, monkeypatch):
    _hub(monkeypatch, files)
    assert model_policy.weight_bytes("owner/model") == expected


def test_hub_sizes_that_cannot_be_read_refuse(monkeypatch):
    _hub(monkeypatch, {"model.safetensors": None})
    with pytest.raises(ModelLoadError, match="could not tell how large"):
        model_policy.weight_bytes("owner/model")
    _hub(monkeypatch, {"tf_model.h5": 5})
    with pytest.raises(ModelLoadError, match="no model.safetensors or pytorch_model.bin"):
        model_policy.weight_bytes("owner/model")

    def offline(self, name, files_metadata=False):
        raise OSError("offline")

    monkeypatch.setattr(HfApi, "model_info", offline)
    with pytest.raises(ModelLoadError, match="could not read the file sizes of 'owner/model' from the hub: offline"):
        model_policy.weight_bytes("owner/model")


def test_opt_in_loads_hub_names_within_the_caps_only(no_weights, monkeypatch):
    """With ROME_EXPLORER_ANY_MODEL=1 a public app takes any hub name, still measured before any download."""
    monkeypatch.setenv("SPACE_ID", "someone/rome-explorer")
    monkeypatch.setenv(model_policy.ANY_MODEL_ENV, "1")
    assert model_policy.allowed_models() is None
    calls: list[str] = []
    # A 7B Llama configuration: refused from its parameter count alone, the hub's file list is never asked.
    _hub(monkeypatch, {"model.safetensors": 1}, config=transformers.LlamaConfig(), calls=calls)
    with pytest.raises(gr.Error, match="has 6,738,415,616 parameters, over this app's limit of 2,000,000,000"):
        _load("owner/big-model")
    assert calls == []
    # Few parameters but more bytes of weights than the cap.
    _hub(monkeypatch, {"model.safetensors": 10_000_000_001}, config=tiny_config("gpt2", vocab=400), calls=calls)
    with pytest.raises(gr.Error, match="has 10,000,000,001 bytes of weights, over this app's limit of 10,000,000,000"):
        _load("owner/padded-model")
    assert calls == ["owner/padded-model"] and not ui.sessions._models
    # Within both caps: the check passes (the load itself would then download; not in a test).
    _hub(monkeypatch, {"model.safetensors": 400_000}, config=tiny_config("gpt2", vocab=400))
    model_policy.check_model("owner/small-model", AppLimits())


def test_unsupported_configurations_are_refused_before_counting(no_weights, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/rome-explorer")
    monkeypatch.setenv(model_policy.ANY_MODEL_ENV, "1")
    _hub(monkeypatch, {"model.safetensors": 1}, config=transformers.T5Config())
    with pytest.raises(ModelLoadError, match="not a supported decoder-only model"):
        model_policy.check_model("owner/t5", AppLimits())


def test_the_policy_variables_are_documented():
    security = (REPO / "SECURITY.md").read_text()
    readme = (REPO / "README.md").read_text()
    for variable in (model_policy.ANY_MODEL_ENV, model_policy.MODELS_ENV, "ROME_EXPLORER_MAX_MODEL_PARAMETERS",
                     "ROME_EXPLORER_MAX_MODEL_BYTES", "SPACE_ID"):
        assert f"`{variable}`" in security, variable
    assert f"`{model_policy.ANY_MODEL_ENV}" in readme
