"""The weights' owner: setting a thread's hold aside between the steps of a job."""
from __future__ import annotations

import threading
from contextlib import ExitStack

import pytest
import torch

from tests.conftest import build_tiny


@pytest.mark.parametrize("depth", [1, 3])
def test_set_aside_releases_the_lock_and_the_edit_and_takes_both_back(depth):
    handle = build_tiny("gpt2")
    weights, arch = handle.weights, handle.arch
    original = arch.mlp_out_weight(1).detach().clone()
    delta = torch.ones(original.shape, dtype=torch.float64)
    edited_matrix = (original.double() + delta).to(original.dtype)
    other_thread_saw = {}

    def other():
        with weights.locked():  # blocks if the lock was not released
            other_thread_saw["weight"] = torch.equal(arch.mlp_out_weight(1), original)
            other_thread_saw["depth_inside"] = weights.held()

    with weights.edited([(1, lambda: delta)]), ExitStack() as nested:
        for _ in range(depth - 1):
            nested.enter_context(weights.locked())
        with weights.set_aside():
            assert not weights.held()
            assert torch.equal(arch.mlp_out_weight(1), original)
            thread = threading.Thread(target=other)
            thread.start()
            thread.join(timeout=5)
            assert other_thread_saw == {"weight": True, "depth_inside": True}
        assert weights.held()
        assert torch.equal(arch.mlp_out_weight(1), edited_matrix)
        nested.close()
        assert weights.held()  # the edited block's own hold is still there after the nested ones closed
    assert torch.equal(arch.mlp_out_weight(1), original)
    assert not weights.held()


def test_set_aside_outside_the_lock_does_nothing():
    handle = build_tiny("gpt2")
    original = handle.arch.mlp_out_weight(0).detach().clone()
    with handle.weights.set_aside():
        assert not handle.weights.held()
    assert torch.equal(handle.arch.mlp_out_weight(0), original)


def test_setting_aside_with_a_hook_on_the_model_is_refused():
    """A step boundary inside a hook's context would leave the hook acting on another job's passes."""
    from explorer.core import hooks

    handle = build_tiny("llama")
    with handle.weights.locked(), hooks.on_output(handle.arch.mlp_out(0), lambda output: None):
        with pytest.raises(RuntimeError, match="hooks on the shared model"), handle.weights.set_aside():
            pass
        assert handle.weights.held()
