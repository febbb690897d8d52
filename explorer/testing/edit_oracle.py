"""A ROME edit computed the plain way, one prompt and one forward pass at a time: the editing tests' oracle.

Written from the paper (Meng et al. 2022, section 3 and appendix) and the reference code's description
(github kmeng01/rome: ``compute_u``, ``compute_v``, ``rome_main``), and importing nothing from
``explorer``, so that the engine (batched, replaying what does not change) is checked against something
that shares none of its code:

- **k\\*** is the mean, over the context templates (each filled with the request's prompt), of the MLP
  output projection's input at the subject's last token.
- **v\\*** = o + δ, o the projection's output at the subject's last token of the first template (the bare
  prompt). δ is added there in every prompt and optimised with Adam on
  mean over templates of the target's mean token NLL (teacher-forced after the prompt)
  + kl_factor · KL(p ‖ p₀) at the subject's last token of "{subject} is a" (p₀ before any update)
  + decay · ‖δ‖ / ‖o‖²,
  at most ``steps`` losses evaluated, the loop ending before an update after the last of them or once a
  loss is below ``loss_stop``; ‖δ‖ is clamped to ``clamp`` · ‖o‖ after each update.
- **ΔW** = Λ uᵀ with u = C⁻¹k\\* and Λ = (v\\* − W(k)) / (uᵀk): k = k\\* for ``rome`` (the paper's equation),
  the bare prompt's own key for ``rome-original`` (the reference code).
- **Strengthening** (the project's settings only): if the edited model does not prefer target_new over
  target_true after the filled prompt (or give target_new a probability of at least one half when there
  is no true target), δ is scaled by 1.1, 1.21, … while the scale stays within 4 / clamp; if none holds
  and clamp < 4, δ is optimised again with clamp 4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KL_PROMPT = "{} is a"
PAPER_CLAMP = 4.0
SCALE_STEP = 1.1


@dataclass
class OracleSettings:
    """The value optimisation's settings (the paper's GPT-2 XL values by default)."""

    variant: str = "rome"  # or "rome-original"
    steps: int = 20
    lr: float = 0.5
    clamp: float = 4.0
    decay: float = 0.5
    kl_factor: float = 0.0625
    loss_stop: float = 0.05
    strengthen: bool = False


@dataclass
class OracleEdit:
    """What the oracle computed: k*, u = C⁻¹k*, the losses, δ, v*, Λ and ΔW ([out, in], float64)."""

    key: torch.Tensor
    u: torch.Tensor
    losses: list[float]
    delta: torch.Tensor
    value: torch.Tensor
    right: torch.Tensor
    update: torch.Tensor
    scale: float = 1.0
    clamp: float = 4.0
    holds: bool | None = None
    tries: list[str] = field(default_factory=list)


def subject_last_index(tokenizer, text: str, start: int, end: int) -> int:
    """Index of the last token overlapping the characters ``[start, end)`` of ``text`` (special tokens count)."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    last = None
    for index, (begin, stop) in enumerate(encoded["offset_mapping"]):
        if stop > begin and begin < end and stop > start:
            last = index
    if last is None:
        raise ValueError(f"no token of {text!r} covers the subject")
    return last


def filled(template: str, subject: str) -> tuple[str, int, int]:
    """``template`` with the subject in its ``{}``, and the subject's character span."""
    start = template.index("{}")
    return template.replace("{}", subject, 1), start, start + len(subject)


class _Probe:
    """Hooks on one module: records its input and output at a position, and adds a vector to its output there."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.position, self.add = module, 0, None
        self.input = self.output = None

    def __enter__(self):
        def before(_module, args):
            self.input = args[0][0, self.position].detach().clone()

        def after(_module, _args, output):
            self.output = output[0, self.position].detach().clone()
            if self.add is None:
                return output
            changed = output.clone()
            changed[0, self.position] = changed[0, self.position] + self.add
            return changed

        self.handles = [self.module.register_forward_pre_hook(before), self.module.register_forward_hook(after)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def oracle_rome(model, tokenizer, module: torch.nn.Module, request: dict, templates: list[str],
                second_moment: torch.Tensor | None, settings: OracleSettings) -> OracleEdit:
    """One ROME edit of ``request`` ({prompt, subject, target_new, target_true}) at ``module``, the plain way."""
    subject, prompt = request["subject"], request["prompt"]
    target = list(tokenizer(request["target_new"], add_special_tokens=False)["input_ids"])
    rows = []
    for template in templates:
        text, start, end = filled(template.replace("{}", prompt, 1), subject)
        rows.append((_ids(tokenizer, text), subject_last_index(tokenizer, text, start, end)))
    kl_text, kl_start, kl_end = filled(KL_PROMPT, subject)
    kl_row = (_ids(tokenizer, kl_text), subject_last_index(tokenizer, kl_text, kl_start, kl_end))
    bare_text, bare_start, bare_end = filled(prompt, subject)
    bare_row = (_ids(tokenizer, bare_text), subject_last_index(tokenizer, bare_text, bare_start, bare_end))

    with torch.no_grad(), _Probe(module) as probe:
        keys = []
        for ids, position in rows:
            probe.position = position
            model(input_ids=torch.tensor([ids]))
            keys.append(probe.input)
            if len(keys) == 1:
                initial = probe.output
        key = torch.stack(keys).mean(0)
        probe.position = bare_row[1]
        model(input_ids=torch.tensor([bare_row[0]]))
        bare_key, bare_output = probe.input, probe.output

    u = key.double() if second_moment is None else torch.linalg.solve(second_moment.double(), key.double())

    def update_for(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = initial.double() + delta.double()
        if settings.variant == "rome-original":
            lambda_key, lambda_output = bare_key.double(), bare_output.double()
        else:
            with torch.no_grad():
                lambda_key, lambda_output = key.double(), module(key.unsqueeze(0))[0].double()
        right = (value - lambda_output) / float(u @ lambda_key)
        return right, torch.outer(right, u)

    clamps = [settings.clamp] + ([PAPER_CLAMP] if settings.strengthen and settings.clamp < PAPER_CLAMP else [])
    for clamp in clamps:
        losses, delta = _optimise(model, module, rows, kl_row, target, initial, settings, clamp)
        scales = [1.0]
        while settings.strengthen and scales[-1] * SCALE_STEP <= PAPER_CLAMP / clamp * (1 + 1e-9):
            scales.append(scales[-1] * SCALE_STEP)
        for scale in scales:
            right, update = update_for(scale * delta)
            holds = _holds(model, tokenizer, module, request, update)
            if holds:
                break
        if holds:
            break
    return OracleEdit(key=key, u=u, losses=losses, delta=scale * delta, value=initial.double() + scale * delta.double(),
                      right=right, update=update, scale=scale, clamp=clamp, holds=holds)


def _optimise(model, module, rows, kl_row, target, initial, settings: OracleSettings, clamp: float):
    """δ and the loss of each step, one forward pass per prompt."""
    delta = torch.zeros_like(initial, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=settings.lr)
    reference_logprobs = None
    losses = []
    with _Probe(module) as probe:
        for step in range(settings.steps):
            nll = 0.0
            for ids, position in rows:
                probe.position, probe.add = position, delta
                logits = model(input_ids=torch.tensor([ids + target[:-1]])).logits[0]
                logprobs = torch.log_softmax(logits.float(), -1)
                first = len(ids) - 1  # the prompt's last token predicts the target's first
                token_nll = [-logprobs[first + j, token] for j, token in enumerate(target)]
                nll = nll + torch.stack(token_nll).mean() / len(rows)
            probe.position, probe.add = kl_row[1], delta
            kl_logprobs = torch.log_softmax(model(input_ids=torch.tensor([kl_row[0]])).logits[0, kl_row[1]].double(), -1)
            if reference_logprobs is None:
                reference_logprobs = kl_logprobs.detach()
            kl = torch.sum(kl_logprobs.exp() * (kl_logprobs - reference_logprobs))
            loss = nll + settings.kl_factor * kl.float() + settings.decay * delta.norm() / initial.norm() ** 2
            losses.append(float(loss.detach()))
            if losses[-1] < settings.loss_stop or step == settings.steps - 1:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                limit = clamp * float(initial.norm())
                if float(delta.norm()) > limit:
                    delta.mul_(limit / float(delta.norm()))
    return losses, delta.detach()


def _holds(model, tokenizer, module, request: dict, update: torch.Tensor) -> bool:
    """Whether the model with ΔW added to ``module`` prefers target_new after the filled prompt."""
    text = request["prompt"].replace("{}", request["subject"], 1)
    prompt_ids = _ids(tokenizer, text)
    change = update.float()

    def add_update(_module, args, output):
        return output + args[0] @ change.T

    handle = module.register_forward_hook(add_update)
    try:
        nlls = []
        for target in [request["target_new"]] + ([request["target_true"]] if request.get("target_true") else []):
            ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + ids[:-1]])).logits[0].float(), -1)
            nlls.append(float(torch.stack([-logprobs[len(prompt_ids) - 1 + j, t] for j, t in enumerate(ids)]).mean()))
    finally:
        handle.remove()
    return nlls[0] < nlls[1] if len(nlls) > 1 else nlls[0] < math.log(2)
