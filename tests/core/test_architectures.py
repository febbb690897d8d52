import pytest
import torch

from explorer.core import hooks
from explorer.core.architectures import UnsupportedModelError, architecture_for
from tests.conftest import FAMILIES, build_tiny

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_every_module(family):
    handle = build_tiny(family)
    arch = handle.arch
    assert arch.num_layers == 4
    hidden = handle.model.config.hidden_size if hasattr(handle.model.config, "hidden_size") else 64
    assert arch.embedding.weight.shape[1] == hidden
    for layer in range(arch.num_layers):
        for kind in ("hidden", "mlp", "attn"):
            assert isinstance(arch.state_module(kind, layer), torch.nn.Module)
        weight = arch.mlp_out_weight(layer)
        # [out, in]: out is the residual width, in the MLP's inner width
        assert weight.shape[0] == hidden and weight.shape[1] > hidden
    ids = handle.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = handle.model(input_ids=ids).logits[:, -1]
        final = arch.backbone(input_ids=ids).last_hidden_state[:, -1]
    torch.testing.assert_close(arch.logits(final), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_leave_logits_unchanged_and_capture_states(family):
    handle = build_tiny(family)
    arch = handle.arch
    ids = handle.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = handle.model(input_ids=ids).logits
        modules = {f"{k}{l}": arch.state_module(k, l) for k in ("hidden", "mlp", "attn") for l in range(4)}
        with hooks.capture_outputs(modules) as seen, hooks.on_output(arch.mlp(1), lambda t: t.clone()), hooks.on_input(
            arch.mlp_out(2), lambda t: None
        ):
            hooked = handle.model(input_ids=ids).logits
    assert torch.equal(plain, hooked)
    assert set(seen) == set(modules)
    assert all(t.shape[:2] == ids.shape for t in seen.values())


def test_output_replacement_changes_logits_and_is_removed_after_an_error():
    handle = build_tiny("llama")
    ids = handle.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = handle.model(input_ids=ids).logits
        with hooks.on_output(handle.arch.mlp(0), lambda t: t * 0):
            zeroed = handle.model(input_ids=ids).logits
        assert not torch.equal(plain, zeroed)

        def boom(*_args, **_kwargs):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            with hooks.on_output(handle.arch.block(1), boom):
                handle.model(input_ids=ids)
        with pytest.raises(RuntimeError):
            with hooks.bypass(handle.arch.block(1), boom):
                handle.model(input_ids=ids)
        after = handle.model(input_ids=ids).logits
    assert torch.equal(plain, after)
    assert not handle.arch.block(1)._forward_hooks
    assert "forward" not in handle.arch.block(1).__dict__


def test_unknown_family_names_the_type_and_the_supported_ones():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="'bert'.*gpt2.*llama"):
        architecture_for(model)


def test_gpt2_conv1d_weight_is_read_as_out_by_in():
    handle = build_tiny("gpt2")
    conv = handle.arch.mlp_out(0)
    assert conv.weight.shape == (256, 64)  # Conv1D stores [in, out]
    assert handle.arch.mlp_out_weight(0).shape == (64, 256)
