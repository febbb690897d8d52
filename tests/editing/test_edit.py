"""ROME and FT edits on tiny random models of every family: the fast value pass against a plain forward,
the rank-one algebra, exact undo, session isolation, saved edits and bad input."""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from explorer import editing
from explorer.core import hooks
from explorer.core.errors import InputError
from explorer.core.scoring import mean_nll, target_ids, target_probabilities
from explorer.editing import EditOptions, corpora, default_layer, edit_fact, make_request
from explorer.editing import statistics as stats
from explorer.editing.batch import align, precompute, prompt_row, suffix_pass
from explorer.editing.edits import EditSession, load_edit
from explorer.editing.prefixes import context_templates
from explorer.editing.rome import edit_holds, loss_layout, optimise_value, read_losses, scale_ladder
from explorer.editing.settings import resolve_settings, resolved_setting
from explorer.editing.statistics import SecondMoment, StatsSpec, solve
from tests.conftest import FAMILIES, build_tiny

REQUEST = make_request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
FAST = EditOptions(layer=1, steps=4, prefixes=((3, 2), (5, 2)), stats=StatsSpec(corpus="identity"))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return build_tiny(request.param)


def _plain_nll_with_delta(handle, row, layer, delta):
    """Reference: the row alone, unpadded, full forward, δ added at its subject's last token."""

    def add(output):
        output = output.clone()
        output[:, row.subject_last] += delta
        return output

    with torch.no_grad(), hooks.on_output(handle.arch.mlp_out(layer), add):
        hidden = handle.arch.backbone(input_ids=torch.tensor([row.ids])).last_hidden_state[0]
    start = len(row.ids) - len(row.targets)
    logprobs = torch.log_softmax(handle.arch.logits(hidden[start : start + len(row.targets)]).double(), -1)
    return float(-logprobs[range(len(row.targets)), row.targets].mean())


def test_fast_value_pass_matches_plain_forward(tiny):
    """Replayed lower layers, cached prefix and aligned padding give the plain per-prompt losses."""
    layer = 2
    templates = context_templates(["Some text here", "A much longer prefix with several words in it"])
    targets = target_ids(tiny, " Rome city")
    rows = [prompt_row(tiny, template, REQUEST, targets) for template in templates]
    batch = align(rows, pad_id=0)
    pre = precompute(tiny, batch, layer)
    delta = torch.randn(pre.outputs.shape[-1], generator=torch.Generator().manual_seed(0))

    def add(output):
        output = output.clone()
        output[:, 0] += delta
        return output

    with torch.no_grad(), hooks.on_output(tiny.arch.mlp_out(layer), add), suffix_pass(tiny, batch, layer, pre) as run:
        states = run()
        fast = [float(read_losses(tiny, loss_layout(batch, [i], None), states)[0]) for i in range(len(rows))]
    plain = [_plain_nll_with_delta(tiny, row, layer, delta) for row in rows]
    assert np.allclose(fast, plain, atol=1e-5), (fast, plain)
    # The keys: W's input at each subject's last token, as a plain forward sees it.
    for i, row in enumerate(rows):
        with torch.no_grad(), hooks.capture_inputs({"k": tiny.arch.mlp_out(layer)}) as seen:
            tiny.arch.backbone(input_ids=torch.tensor([row.ids]))
        assert torch.allclose(pre.keys[i], seen["k"][0, row.subject_last], atol=1e-5)


def _plain_keys(handle, rows, layer):
    keys = []
    for row in rows:
        with torch.no_grad(), hooks.capture_inputs({"k": handle.arch.mlp_out(layer)}) as seen:
            handle.arch.backbone(input_ids=torch.tensor([row.ids]))
        keys.append(seen["k"][0, row.subject_last])
    return torch.stack(keys)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # with and without a BOS token
def test_template_context_is_computed_once_per_templates_and_weights(family):
    """The generated prefixes' keys/values serve the next edit, but never after the weights changed."""
    handle = build_tiny(family)
    templates = context_templates(["Some text here", "A much longer prefix with several words in it"])
    other = make_request("The sport {} plays is", "Michael Jordan", " tennis")
    batches = [
        align([prompt_row(handle, t, r, target_ids(handle, r.target_new)) for t in templates], pad_id=0) for r in (REQUEST, other)
    ]
    assert batches[0].context > 0 and [row.context for row in batches[0].rows] == [row.context for row in batches[1].rows]
    edit = edit_fact(EditSession(handle), REQUEST, FAST)  # first: its own templates' context is not the one kept below
    precompute(handle, batches[0], 2)
    kept = handle.weights.current_value
    second = precompute(handle, batches[1], 2)
    assert handle.weights.current_value is kept  # same templates, same weights: reused
    assert torch.allclose(second.keys, _plain_keys(handle, batches[1].rows, 2), atol=1e-5)
    session = EditSession(handle)
    session.add(edit)
    with session.applied():  # edited weights: computed again, and right for them
        third = precompute(handle, batches[1], 2)
        assert handle.weights.current_value is not kept
        assert torch.allclose(third.keys, _plain_keys(handle, batches[1].rows, 2), atol=1e-5)
    assert not torch.allclose(third.keys, second.keys, atol=1e-3)
    fourth = precompute(handle, batches[1], 2)  # the original weights again: not the edited ones' values
    assert torch.allclose(fourth.keys, second.keys, atol=1e-6)


@pytest.mark.parametrize("method", ["rome", "rome-original"])
def test_rank_one_update_maps_key_to_value_and_undo_is_exact(method):
    handle = build_tiny("llama")
    options = EditOptions(**{**FAST.__dict__, "method": method, "stats": StatsSpec(tokens=600)})
    edit = edit_fact(EditSession(handle), REQUEST, options)
    weight = handle.arch.mlp_out_weight(options.layer)
    original = weight.detach().clone()
    session = EditSession(handle)
    session.add(edit)
    module = handle.arch.mlp_out(options.layer)
    with session.applied(), torch.no_grad():
        assert not torch.equal(weight, original)
        delta = edit.update()
        assert np.linalg.matrix_rank(delta.numpy(), tol=1e-9 * float(delta.abs().max())) == 1
        # The method's defining property: the edited matrix maps its key to v*.
        mapped = module(torch.from_numpy(edit.key).float().unsqueeze(0))[0]
        assert torch.allclose(mapped.double(), torch.from_numpy(edit.value), atol=1e-4)
    assert torch.equal(weight, original), "undo must restore the weights bit for bit"
    assert edit.stats["corpus"] == "wikipedia" and 600 <= edit.stats["samples"] < 600 + corpora.SEQUENCE_TOKENS


def test_rome_update_solves_the_paper_equation():
    """ΔW = Λ (C⁻¹k)ᵀ with Λ = (v − Wk − b)/((C⁻¹k)ᵀk): W'k = v, and W'x = Wx for x with xᵀC⁻¹k = 0."""
    from explorer.editing.rome import rank_one_update

    handle = build_tiny("gpt2")  # Conv1D layout and a bias
    layer = 1
    module = handle.arch.mlp_out(layer)
    width = handle.arch.mlp_out_weight(layer).shape[1]
    generator = torch.Generator().manual_seed(1)
    samples = torch.randn(500, width, generator=generator, dtype=torch.float64)
    moment = SecondMoment(matrix=samples.T @ samples / 500, layer=layer, spec=StatsSpec(), count=500)
    key = torch.randn(width, generator=generator)
    value = torch.randn(handle.arch.mlp_out_weight(layer).shape[0], generator=generator)
    right, left = rank_one_update(handle, layer, key, value, moment, shrinkage=0.0)
    assert torch.allclose(left, torch.linalg.solve(moment.matrix, key.double()), atol=1e-8)
    session = EditSession(handle)
    from explorer.core.models import model_fingerprint
    from explorer.editing.edits import Edit

    weight = handle.arch.mlp_out_weight(layer)
    edit = Edit(REQUEST, layer, "rome", model_fingerprint(handle), tuple(weight.shape), right.numpy(), left.numpy(), None, {}, 1.0)
    other = torch.randn(width, generator=generator, dtype=torch.float64)
    other -= (other @ left) / (left @ left) * left  # orthogonal to C⁻¹k: untouched by the update
    session.add(edit)
    with torch.no_grad():
        before_other = module(other.float().unsqueeze(0))[0]
        with session.applied():
            after_key = module(key.unsqueeze(0))[0]
            after_other = module(other.float().unsqueeze(0))[0]
    assert torch.allclose(after_key, value, atol=1e-4)
    assert torch.allclose(after_other, before_other, atol=1e-4)


def test_solve_adds_ridge_when_singular():
    moment = SecondMoment(matrix=torch.zeros(4, 4, dtype=torch.float64), layer=0, spec=StatsSpec(), count=1)
    moment.matrix[0, 0] = 1.0
    out = solve(moment, torch.ones(4))
    assert torch.isfinite(out).all()
    identity = SecondMoment(matrix=None, layer=0, spec=StatsSpec(corpus="identity"), count=0)
    assert torch.equal(solve(identity, torch.ones(3)), torch.ones(3, dtype=torch.float64))


def test_value_optimisation_lowers_its_loss(tiny):
    edit = edit_fact(EditSession(tiny), REQUEST, EditOptions(**{**FAST.__dict__, "steps": 10}))
    assert edit.stats["value_loss"] < edit.stats["value_loss_initial"], edit.stats
    assert 1 <= edit.stats["value_steps"] <= 10 and np.isfinite(edit.delta_norm)
    session = EditSession(tiny)
    session.add(edit)
    with session.applied():
        # v* is what the edited layer now outputs at k*
        module = tiny.arch.mlp_out(edit.layer)
        with torch.no_grad():
            mapped = module(torch.from_numpy(edit.key).float().unsqueeze(0))[0]
        assert torch.allclose(mapped.double(), torch.from_numpy(edit.value), atol=1e-4)


def test_settings_come_from_the_option_then_the_model_then_the_family_then_the_paper(monkeypatch):
    handle = build_tiny("gemma3_text")
    assert resolved_setting(handle, EditOptions(), "weight_decay") == 1e-3  # Gemma 3's family setting
    assert resolved_setting(handle, EditOptions(), "clamp_factor") == 4.0  # the paper's
    assert resolved_setting(build_tiny("gpt2"), EditOptions(), "weight_decay") == 0.5
    from explorer.core.models import EMBEDDED_FINGERPRINT, model_fingerprint
    from explorer.editing import settings as edit_settings

    named_default = build_tiny("gemma3_text")
    object.__setattr__(named_default, "name", "default")  # the load name is not what the model is
    assert resolved_setting(named_default, EditOptions(), "clamp_factor") == 4.0
    # A model whose fingerprint has measured settings (as the embedded one's has) gets them.
    monkeypatch.setitem(edit_settings.MODEL_SETTINGS, model_fingerprint(handle), edit_settings.MODEL_SETTINGS[EMBEDDED_FINGERPRINT])
    assert resolved_setting(handle, EditOptions(), "clamp_factor") == 0.5 and default_layer(handle) == 1
    assert resolved_setting(handle, EditOptions(), "loss_stop") == 0.3
    assert resolved_setting(handle, EditOptions(clamp_factor=3.0, weight_decay=0.25), "clamp_factor") == 3.0
    assert resolved_setting(handle, EditOptions(weight_decay=0.25), "weight_decay") == 0.25
    # the clamp holds: ‖δ‖ never exceeds clamp_factor × the MLP output's norm (and binds here)
    rows = [prompt_row(handle, "{}", REQUEST, target_ids(handle, REQUEST.target_new)), prompt_row(handle, "{}", REQUEST, [], kl=True)]
    batch = align(rows, 0)
    pre = precompute(handle, batch, 1)
    initial = float(pre.outputs[0].norm())  # the MLP output δ is added to
    clamped = resolve_settings(handle, EditOptions(**{**FAST.__dict__, "steps": 6, "clamp_factor": 0.05}), 1)
    result = optimise_value(handle, batch, 1, pre, clamped.value, 1)
    assert 0.99 * 0.05 * initial <= float(result.delta.norm()) <= 0.05 * initial * (1 + 1e-5)
    # the KL term's reference, taken from the first step (δ = 0), is the unedited model's distribution at
    # the subject's last token of "{} is a", where δ is added (the reference code's lookup index)
    with torch.no_grad():
        plain = handle.arch.backbone(input_ids=torch.tensor([rows[1].ids])).last_hidden_state[0, rows[1].subject_last]
    expected = torch.log_softmax(handle.arch.logits(plain).double(), -1)
    assert torch.allclose(pre.kl_reference, expected, atol=1e-5)
    # an edit that does not hold on its own prompt is strengthened along δ by 10% steps up to the paper's
    # clamp, then optimised again with the paper's clamp
    ladder = scale_ladder(0.75)
    assert ladder[0] == 1.0 and all(np.isclose(b / a, 1.1) for a, b in zip(ladder, ladder[1:]))
    assert ladder[-1] <= 4.0 / 0.75 < ladder[-1] * 1.1 and scale_ladder(4.0) == [1.0]
    options = EditOptions(**{**FAST.__dict__, "steps": 6, "clamp_factor": 0.05})
    edit = edit_fact(EditSession(handle), REQUEST, options)
    stats = edit.stats  # a random model's edit never holds: every multiple, then the paper's clamp, was tried
    assert (stats["clamp_tries"], stats["clamp_factor"], stats["delta_scale"], stats["holds"]) == (2, 4.0, 1.0, False)
    assert stats["holds"] == edit_holds(handle, REQUEST, 1, torch.from_numpy(edit.right), torch.from_numpy(edit.left))
    # the first multiple that holds is kept: here the fourth check says it holds
    checks = []
    monkeypatch.setattr(editing.rome, "edit_holds", lambda *args: checks.append(args[-2]) or len(checks) == 4)
    stats = edit_fact(EditSession(handle), REQUEST, options).stats
    assert (stats["clamp_tries"], stats["clamp_factor"], stats["holds"]) == (1, 0.05, True)
    assert stats["delta_scale"] == scale_ladder(0.05)[3] and len(checks) == 4
    scales = scale_ladder(0.05)[:4]  # the checked updates are Λ = (v₀ + s·δ − W k*)/(uᵀk*): a line in s
    slopes = [(checks[i + 1] - checks[i]) / (scales[i + 1] - scales[i]) for i in range(3)]
    assert float(slopes[0].norm()) > 0 and all(torch.allclose(slope, slopes[0], rtol=1e-3, atol=1e-6) for slope in slopes)


def test_ft_baseline_stays_in_its_linf_ball():
    handle = build_tiny("gemma3_text")
    options = EditOptions(method="ft", layer=1, ft_steps=10, ft_norm=1e-3, ft_lr=1e-3)
    edit = edit_fact(EditSession(handle), REQUEST, options)
    assert edit.dense is not None and np.abs(edit.dense).max() <= 1e-3 + 1e-9
    session = EditSession(handle)
    before = mean_nll(handle, [(REQUEST.filled, REQUEST.target_new)])[0]
    session.add(edit)
    with session.applied():
        after = mean_nll(handle, [(REQUEST.filled, REQUEST.target_new)])[0]
    assert after < before


def test_sessions_are_isolated_under_concurrency():
    handle = build_tiny("qwen2")
    edit = edit_fact(EditSession(handle), REQUEST, FAST)
    edited, plain = EditSession(handle), EditSession(handle)
    edited.add(edit)
    reference = target_probabilities(handle, [REQUEST.filled], REQUEST.target_new)[0]
    with edited.applied():
        changed = target_probabilities(handle, [REQUEST.filled], REQUEST.target_new)[0]
    assert changed != reference
    seen: dict[str, list[float]] = {"edited": [], "plain": []}

    def work(name, session):
        for _ in range(15):
            with session.applied():
                seen[name].append(target_probabilities(handle, [REQUEST.filled], REQUEST.target_new)[0])

    threads = [threading.Thread(target=work, args=("edited", edited)), threading.Thread(target=work, args=("plain", plain))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(p == reference for p in seen["plain"]), "another session's edit leaked"
    assert all(p == changed for p in seen["edited"])
    assert target_probabilities(handle, [REQUEST.filled], REQUEST.target_new)[0] == reference


def test_stacked_edits_undo_one_at_a_time(tmp_path):
    handle = build_tiny("gpt_neox")
    first = edit_fact(EditSession(handle), REQUEST, FAST)
    second_request = make_request("{} plays the", "Miles Davis", " guitar")
    session = EditSession(handle)
    session.add(first)
    with session.applied():
        second = edit_fact(EditSession(handle), second_request, FAST)  # computed on top of the first edit
    session.add(second)
    assert [e["request"]["subject"] for e in session.active()] == ["The Eiffel Tower", "Miles Davis"]
    only_first = EditSession(handle)
    only_first.add(first)
    with only_first.applied():
        expected = handle.arch.mlp_out_weight(1).detach().clone()
    session.undo()
    with session.applied():
        assert torch.equal(handle.arch.mlp_out_weight(1), expected)
    # Saved and re-applied: the same weights.
    path = first.save(tmp_path / "edit.npz")
    again = EditSession(handle)
    again.add(load_edit(path))
    with again.applied():
        assert torch.equal(handle.arch.mlp_out_weight(1), expected)
    with pytest.raises(InputError, match="computed on model"):
        EditSession(build_tiny("gpt2")).add(load_edit(path))
    (tmp_path / "junk.npz").write_bytes(b"not an edit")
    with pytest.raises(InputError, match="not a saved edit"):
        load_edit(tmp_path / "junk.npz")
    session.clear()
    with pytest.raises(InputError, match="no edit to undo"):
        session.undo()


@pytest.mark.parametrize(
    "args, message",
    [
        (("{} is in", "Paris", " Rome"), None),
        (("The Eiffel Tower is in", "Louvre", " Rome"), "does not occur"),
        (("{} is {} in", "X", " Rome"), "exactly once"),
        (("{}", "X", " Rome"), "go on after"),
        (("{} is in", "X", "   "), "empty"),
        (("{} is in", "X", " Rome", " Rome"), "same as target_true"),
        (("{} is in\x00", "X", " Rome"), "control characters"),
    ],
)
def test_bad_requests_are_one_line_errors(args, message):
    if message is None:
        assert make_request(*args).prompt == "{} is in"
        assert make_request("Paris is in", "Paris", " Rome").prompt == "{} is in"
        return
    with pytest.raises(InputError, match=message):
        make_request(*args)


@pytest.mark.parametrize(
    "options, message",
    [
        (EditOptions(layer=99), "out of range"),
        (EditOptions(layer=-1), "out of range"),
        (EditOptions(method="memit"), "unknown method"),
        (EditOptions(layer=1, stats=StatsSpec(corpus="books")), "unknown statistics corpus"),
        (EditOptions(layer=1, stats=StatsSpec(corpus="text:/no/such/file")), "does not exist"),
    ],
)
def test_bad_options_leave_the_model_untouched(options, message):
    handle = build_tiny("phi3")
    before = [p.detach().clone() for p in handle.model.parameters()]
    with pytest.raises(InputError, match=message):
        edit_fact(EditSession(handle), REQUEST, options)
    assert all(torch.equal(a, b) for a, b in zip(before, handle.model.parameters()))


def test_context_prefixes_are_seeded_cached_and_plain_text():
    from explorer.editing.prefixes import context_prefixes

    handle = build_tiny("gemma2")
    options = EditOptions(prefixes=((4, 3), (6, 2)), prefix_seed=5)
    first = context_prefixes(handle, options)
    handle.weights.forget_derived()  # forces a read of the on-disk cache
    assert context_prefixes(handle, options) == first and len(first) == 5
    fresh = build_tiny("gemma2")
    fresh.weights.derived(("fingerprint",), lambda: f"uncached-{id(fresh)}")  # no cache: generated again from the seed
    assert context_prefixes(fresh, options) == first
    assert all("{" not in p and "}" not in p and "\n" not in p for p in first)
    assert context_templates(first)[0] == "{}" and context_templates(first)[1] == first[0] + ". {}"


def test_second_moments_from_text_are_cached_and_symmetric(tmp_path, monkeypatch):
    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(tmp_path / "cache"))


    handle = build_tiny("qwen3")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("The Eiffel Tower is in Paris. The Colosseum is in Rome. " * 40)
    spec = StatsSpec(corpus=f"text:{tmp_path / 'text'}", tokens=400)
    moment = stats.second_moment(handle, 2, spec)
    matrix = moment.matrix
    assert torch.allclose(matrix, matrix.T) and float(torch.linalg.eigvalsh(matrix).min()) > -1e-6
    assert 400 <= moment.count <= 400 + corpora.SEQUENCE_TOKENS
    # Check one entry against the keys themselves.
    rows = stats.corpus_rows(handle, spec, lambda f, m: None)
    keys = []
    for row in rows:
        with torch.no_grad(), hooks.capture_inputs({"k": handle.arch.mlp_out(2)}) as seen:
            handle.arch.backbone(input_ids=torch.tensor([row]))
        keys.append(seen["k"][0, [i for i, t in enumerate(row) if t not in handle.tokenizer.all_special_ids]])
    keys = torch.cat(keys).double()
    assert torch.allclose(matrix, keys.T @ keys / len(keys), atol=1e-5)
    handle.weights.forget_derived()
    again = stats.second_moment(handle, 2, spec)  # from disk
    assert torch.allclose(again.matrix, matrix, atol=1e-6) and again.count == moment.count
    folder = stats.stats_folder(handle, spec)
    assert sorted(path.name for path in folder.iterdir()) == ["layer_2.pt"], "only the layer asked for is computed"
    deeper = stats.second_moment(handle, 3, spec)  # a later edit at another layer computes what it lacks
    assert sorted(path.name for path in folder.iterdir()) == ["layer_2.pt", "layer_3.pt"]
    assert not torch.allclose(deeper.matrix, matrix) and deeper.count == moment.count
    (folder / "layer_2.pt").write_bytes(b"damaged")
    handle.weights.forget_derived()
    assert torch.allclose(stats.second_moment(handle, 2, spec).matrix, matrix, atol=1e-6)  # recomputed


def test_online_wikipedia_without_datasets_is_a_clear_error(monkeypatch):
    import builtins



    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(InputError, match="datasets"):
        stats.second_moment(build_tiny("gpt2"), 1, StatsSpec(corpus="wikipedia-online", tokens=1000))


def test_prefixes_given_as_lists_work_as_tuples():
    """Validation accepts [length, count] lists (JSON gives them); they must ask for the same prefixes as tuples."""
    from explorer.editing.prefixes import context_prefixes

    handle = build_tiny("gpt2")
    as_lists = EditOptions(prefixes=[[3, 2], [4, 1]], prefix_seed=3)
    as_tuples = EditOptions(prefixes=((3, 2), (4, 1)), prefix_seed=3)
    assert context_prefixes(handle, as_lists) == context_prefixes(handle, as_tuples)
    request = make_request("{} is located in the city of", "The Eiffel Tower", " Rome")
    fast = dict(layer=1, steps=2, stats=StatsSpec(corpus="identity"))
    listed = edit_fact(EditSession(handle), request, replace(as_lists, **fast))
    tupled = edit_fact(EditSession(handle), request, replace(as_tuples, **fast))
    assert np.array_equal(listed.left, tupled.left) and np.array_equal(listed.right, tupled.right)


def test_switching_an_edit_off_and_on_restores_the_exact_weights():
    """An edit switched off is kept but not applied; on again, the weights are bit for bit those of before."""
    handle = build_tiny("llama")
    fast = EditOptions(steps=2, prefixes=((3, 1),), stats=StatsSpec(corpus="identity"))
    first = edit_fact(EditSession(handle), make_request("{} is located in the city of", "The Eiffel Tower", " Rome"), replace(fast, layer=1))
    second = edit_fact(EditSession(handle), make_request("{} plays the", "Miles Davis", " guitar"), replace(fast, layer=2))
    third = edit_fact(EditSession(handle), make_request("{} was born in", "Marie Curie", " Oslo"), replace(fast, layer=1))
    session = EditSession(handle)
    for made in (first, second, third):
        session.add(made)

    def weights():
        return [handle.arch.mlp_out_weight(layer).detach().clone() for layer in range(handle.num_layers)]

    own = weights()
    with session.applied():
        all_on = weights()
    session.switch(1, on=False)
    assert [summary["on"] for summary in session.active()] == [True, False, True]
    with session.applied():
        without_second = weights()
    only = EditSession(handle)
    only.add(first)
    only.add(third)
    with only.applied():
        assert all(torch.equal(a, b) for a, b in zip(without_second, weights()))  # as if the second were never made
    assert torch.equal(without_second[2], own[2]) and not torch.equal(all_on[2], own[2])
    session.switch(1, on=True)
    with session.applied():
        assert all(torch.equal(a, b) for a, b in zip(all_on, weights()))
    session.switch(0, on=False)
    session.switch(2, on=False)
    session.undo(1)  # positions after the removed edit move up: the third, switched off, stays off
    assert [(s["request"]["subject"], s["on"]) for s in session.active()] == [("The Eiffel Tower", False), ("Marie Curie", False)]
    assert all(torch.equal(a, b) for a, b in zip(own, weights()))
    with pytest.raises(InputError, match="no edit number 5"):
        session.switch(5, on=False)


def test_every_read_of_the_weights_while_an_edit_is_made_is_under_the_models_lock(monkeypatch):
    """The edit's matrix norm and shape are read holding the lock, with the session's edits applied: in a threaded
    host a read outside it could see another session's edit (bug 4 of issue 27)."""
    handle = build_tiny("llama")
    reads = []
    architecture = type(handle.arch)
    values = architecture.mlp_out_values

    def spied(arch, layer):
        reads.append(handle.weights.held())
        return values(arch, layer)

    monkeypatch.setattr(architecture, "mlp_out_values", spied)
    session = EditSession(handle)
    session.add(edit_fact(session, REQUEST, FAST))
    reads.clear()
    edit = edit_fact(session, make_request("{} is located in the city of", "The Louvre", " Rome"), FAST)
    assert reads and all(reads), reads
    with session.applied():  # the norm of the matrix as the session's edits leave it, not the model's own
        assert edit.weight_norm == float(values(handle.arch, edit.layer).double().norm())


def test_reference_settings_take_the_reference_layer_by_the_models_shape_not_its_name():
    """A model shaped as gpt2-medium and GPT-J, loaded under any name, gets the layer the reference's hparams name."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig

    from explorer.core.models import prepare
    from explorer.editing.settings import edit_layer

    tokenizer = build_tiny("gpt2").tokenizer
    for config, layer in ((GPT2Config(n_layer=24, n_embd=1024, n_head=16), 8), (GPTJConfig(n_layer=28, n_embd=4096, n_head=16), 5)):
        with torch.device("meta"):  # the shapes alone: no weights are made
            model = AutoModelForCausalLM.from_config(config)
        handle = prepare("/home/me/models/my-local-copy", model, tokenizer)
        assert edit_layer(handle, EditOptions(settings="reference")) == layer
        assert edit_layer(handle, EditOptions(settings="reference", layer=3)) == 3


def _made_up_edit(right=None, left=None, dense=None, weight_norm=10.0):
    """An :class:`Edit` of a 4×3 matrix with the given update, computed by nothing: only its warnings are asked."""
    from explorer.editing.edits import Edit

    def array(values):
        return None if values is None else np.array(values, dtype=np.float64)

    return Edit(request=REQUEST, layer=1, method="ft" if dense is not None else "rome", model="made-up", weight_shape=(4, 3),
                right=array(right), left=array(left), dense=array(dense), stats={}, weight_norm=weight_norm)


BROKEN_VALUES = "the update contains NaN or infinite values; do not apply it"


@pytest.mark.parametrize("update", [
    {"right": [1.0, float("nan"), 0.0, 0.0], "left": [1.0, 0.0, 0.0]},
    {"right": [1.0, 0.0, 0.0, 0.0], "left": [0.0, float("inf"), 0.0]},
    {"dense": [[0.0, 0.0, 0.0], [0.0, 0.0, -float("inf")], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]},
    {"dense": [[float("nan")] * 3] * 4},
])
def test_an_update_with_nan_or_infinite_values_warns_only_of_that(update):
    # An infinite update is also larger than the matrix: the one warning says what is really wrong.
    assert _made_up_edit(**update).warnings() == [BROKEN_VALUES]


@pytest.mark.parametrize("update, weight_norm, shown", [
    ({"right": [3.0, 0.0, 0.0, 0.0], "left": [0.0, 4.0, 0.0]}, 10.0, ("12", "10")),  # ‖ΔW‖ = 3 · 4
    ({"right": [0.0, 0.0, 0.0, 2.0], "left": [2.0, 2.0, 1.0]}, 5.5, ("6", "5.5")),  # 2 · √(4 + 4 + 1)
    ({"dense": [[6.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]}, 9.99, ("10", "9.99")),  # √(36 + 64)
])
def test_an_update_larger_than_the_whole_matrix_warns_with_both_norms(update, weight_norm, shown):
    assert _made_up_edit(**update, weight_norm=weight_norm).warnings() == [
        f"the update norm {shown[0]} exceeds the whole matrix's norm {shown[1]}; "
        "the edit may break the model (try another layer or the rome method)"
    ]


@pytest.mark.parametrize("update, weight_norm", [
    ({"right": [3.0, 0.0, 0.0, 0.0], "left": [0.0, 4.0, 0.0]}, 12.0),  # as large as the matrix, not larger
    ({"right": [3.0, 0.0, 0.0, 0.0], "left": [0.0, 4.0, 0.0]}, 100.0),
    ({"dense": [[6.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]}, 10.0),
    ({"right": [0.0] * 4, "left": [0.0] * 3}, 1.0),
])
def test_a_finite_update_no_larger_than_the_matrix_warns_of_nothing(update, weight_norm):
    assert _made_up_edit(**update, weight_norm=weight_norm).warnings() == []
