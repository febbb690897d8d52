"""FT+L, the fine-tuning baseline: Adam on the edited projection's weights, the change held in an L∞ ball."""
from __future__ import annotations

import numpy as np
import torch

from ..core import hooks, offload
from ..core.models import LoadedModel
from ..core.scoring import target_ids
from .batch import prompt_row, replaying_below
from .edits import EditRequest
from .settings import FtSettings


def compute_ft(handle: LoadedModel, request: EditRequest, layer: int, settings: FtSettings) -> np.ndarray:
    """Dense ΔW from Adam steps on target_new's NLL after the prompt, clamped to ‖ΔW‖∞ ≤ ``settings.norm``."""
    arch, device = handle.arch, handle.device
    row = prompt_row(handle, "{}", request, target_ids(handle, request.target_new))
    ids = torch.tensor([row.ids], device=device)
    blocks = {str(l): arch.block(l) for l in range(layer)}
    with torch.no_grad(), hooks.capture_outputs(blocks, raw=True) as raw:
        arch.backbone(input_ids=ids, use_cache=False)
    below = [raw[str(l)] for l in range(layer)]  # the layers below never change: replayed in every step
    weight = arch.mlp_out_weight(layer)  # shape and dtype only: under offloading it is a meta placeholder
    device = offload.execution_device(arch.mlp_out(layer))  # where the projection's input arrives
    delta = torch.zeros(weight.shape, dtype=weight.dtype, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=settings.lr)
    prompt_length = len(row.ids) - len(row.targets) + 1
    where = [prompt_length - 1 + j for j in range(len(row.targets))]
    wanted = torch.tensor(row.targets, device=device)

    # delta is [out, in] whatever the module's own layout
    with hooks.adding_to_output(arch.mlp_out(layer), lambda x: x @ delta.T), replaying_below(handle, below):
        for _ in range(settings.steps):
            states = arch.backbone(input_ids=ids, use_cache=False).last_hidden_state[0, where]
            loss = torch.nn.functional.cross_entropy(arch.logits(states).float(), wanted)
            if float(loss.detach()) < 1e-2:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                delta.clamp_(-settings.norm, settings.norm)
    return delta.detach().double().cpu().numpy()
