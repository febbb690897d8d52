"""The command line, run as users run it: a subprocess on a tiny model saved to a local folder."""
import json

import numpy as np
import pytest
import torch

from explorer.cli.arguments import build_parser
from explorer.cli.arguments import trace_options as _options
from tests.conftest import REPO, one_torch_thread, run_cli, save_tiny

PROMPT = "The Eiffel Tower is located in the city of"
BUNDLED = json.loads((REPO / "assets" / "known_facts.json").read_text())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


_run = run_cli


# The tests' own view of the saved tiny model: plain transformers calls, none of the explorer's code.
@pytest.fixture(scope="module")
def plain(tiny_folder):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    return tokenizer, model


_TOP: dict = {}


def _top(plain, prompt):
    """The model's top-1 next token after ``prompt`` (cached per model and prompt)."""
    tokenizer, model = plain
    key = (id(model), prompt)
    if key not in _TOP:
        with one_torch_thread(), torch.no_grad():
            _TOP[key] = int(model(input_ids=tokenizer(prompt, return_tensors="pt")["input_ids"]).logits[0, -1].argmax())
    return _TOP[key]


def _is_correct(plain, record):
    """The documented test of a known fact: the top-1 token is the first token of ' ' + attribute."""
    tokenizer = plain[0]
    answer = tokenizer(" " + record["attribute"].strip(), add_special_tokens=False)["input_ids"]
    return bool(answer) and answer[0] == _top(plain, record["prompt"])


@pytest.fixture(scope="module")
def mixed_facts(plain, tmp_path_factory):
    """Bundled prompts as a fact set the random tiny model half knows: 3 facts whose attribute is the model's
    own top-1 token (it gets them right), 2 with their true attribute (it gets them wrong), interleaved."""
    tokenizer = plain[0]
    right, wrong = [], []
    for record in BUNDLED:
        own = dict(record, attribute=tokenizer.decode([_top(plain, record["prompt"])]).strip(), prediction="")
        if len(right) < 3 and own["attribute"] and _is_correct(plain, own):
            right.append(own)
        elif len(wrong) < 2 and not _is_correct(plain, record):
            wrong.append(record)
        if len(right) == 3 and len(wrong) == 2:
            break
    assert len(right) == 3 and len(wrong) == 2
    records = [wrong[0], right[0], right[1], wrong[1], right[2]]
    path = tmp_path_factory.mktemp("facts") / "mixed.json"
    path.write_text(json.dumps(records))
    return path, records, right


def _noise_std(plain, multiple=3.0):
    """σ of the noise: ``multiple`` × std of the token embeddings of every bundled subject."""
    tokenizer, model = plain
    ids = [i for subject in sorted({r["subject"] for r in BUNDLED}) for i in tokenizer(subject, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        return multiple * float(model.get_input_embeddings()(torch.tensor([ids])).std())


def _oracle_hidden_trace(plain, prompt, subject, samples, seed=1):
    """ROME's hidden-state trace, one forward pass per cell: (scores [token, layer], low, high, subject range).

    Only the rows the tests read are computed (first and last subject token, last token); the others are NaN.
    """
    tokenizer, model = plain
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    ids = torch.tensor([encoding["input_ids"]]).repeat(samples + 1, 1)
    char_start = prompt.index(subject)
    covered = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < char_start + len(subject) and b > char_start]
    start, end = covered[0], covered[-1] + 1
    noise = torch.from_numpy(np.random.RandomState(seed).randn(samples, end - start, model.config.n_embd)).float()
    noise = noise * _noise_std(plain)

    def corrupt(_module, _inputs, output):
        output = output.clone()
        output[1:, start:end] += noise
        return output

    def run(restore=None):
        hooks = [model.get_input_embeddings().register_forward_hook(corrupt)]
        if restore is not None:
            layer, token = restore

            def patch(_module, _inputs, output):
                hidden = (output if isinstance(output, torch.Tensor) else output[0]).clone()
                hidden[1:, token] = hidden[0, token]
                return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

            hooks.append(model.transformer.h[layer].register_forward_hook(patch))
        try:
            with torch.no_grad():
                return torch.softmax(model(input_ids=ids).logits[:, -1].double(), dim=-1)
        finally:
            for hook in hooks:
                hook.remove()

    with one_torch_thread():
        clean = run()
        answer = int(clean[0].argmax())
        scores = np.full((ids.shape[1], model.config.n_layer), np.nan)
        for token in {start, end - 1, ids.shape[1] - 1}:
            scores[token] = [float(run((layer, token))[1:, answer].mean()) for layer in range(model.config.n_layer)]
    return scores, float(clean[1:, answer].mean()), float(clean[0, answer]), (start, end)


def test_trace_writes_json_npz_and_html(tiny_folder, tmp_path):
    out = _run("trace", PROMPT, "--subject", "Eiffel Tower", "--model", str(tiny_folder), "--samples", "3", "--window", "2",
               "--kinds", "hidden,mlp", "--kinds", "attn", "--json", str(tmp_path / "t.json"), "--npz", str(tmp_path / "t.npz"), "--html", str(tmp_path / "t.html"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "t.json").read_text())
    for key in ("model", "prompt", "subject", "tokens", "subject_range", "answer", "high_score", "low_score",
                "noise_std", "samples", "window", "seed", "seconds", "traces"):
        assert key in data
    assert set(data["traces"]) == {"hidden", "mlp", "attn"}
    assert np.array(data["traces"]["mlp"]).shape == (len(data["tokens"]), 4)
    start, end = data["subject_range"]
    assert "".join(data["tokens"][start:end]).strip() == "Eiffel Tower"
    npz = np.load(tmp_path / "t_mlp.npz")
    assert set(npz.files) == {"scores", "low_score", "high_score", "input_tokens", "subject_range", "answer", "window", "kind"}
    assert str(npz["kind"]) == "mlp" and np.allclose(npz["scores"], data["traces"]["mlp"])
    html = (tmp_path / "t.html").read_text()
    assert html.count("Plotly.newPlot") == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["trace", "", "--subject", "x"], "prompt is empty"),
        (["trace", PROMPT, "--kinds", "neurons"], "unknown kind"),
        (["trace", PROMPT, "--window", "0"], "window"),
        (["trace", PROMPT, "--samples", "1000000"], "samples"),
        (["trace", PROMPT, "--subject", "Louvre"], "does not occur"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_folder, args, message):
    out = _run(*args, "--model", str(tiny_folder))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last


def _close(actual, expected):
    return np.allclose(actual, expected, rtol=1e-4, atol=1e-5)


def _finite_probabilities(values):
    values = np.asarray(values, dtype=float)
    return bool(np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all())


def test_average_and_severed_use_exactly_the_known_facts(tiny_folder, plain, mixed_facts, tmp_path):
    path, records, right = mixed_facts
    traces = {r["prompt"]: _oracle_hidden_trace(plain, r["prompt"], r["subject"], samples=2) for r in right}
    n_layers = plain[1].config.n_layer

    out = _run("average", str(path), "--model", str(tiny_folder), "--samples", "2", "--kinds", "hidden", "--json", str(tmp_path / "a.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["facts_total"] == 5 and data["facts_correct"] == 3
    assert "3 of 5 facts predicted correctly" in out.stderr
    assert {"mlp", "attn"}.isdisjoint(data)
    # The averages are over the 3 known facts only: the oracle's traces of those, category by category.
    lows = [low for _, low, _, _ in traces.values()]
    highs = [high for _, _, high, _ in traces.values()]
    assert _close(data["high_score"], np.mean(highs)) and _close(data["low_score"], np.mean(lows))
    picks = {"first_subject_token": lambda scores, start, end: scores[start],
             "last_subject_token": lambda scores, start, end: scores[end - 1],
             "last_token": lambda scores, start, end: scores[-1]}
    for category, pick in picks.items():
        rows = [pick(scores, *span) for scores, _, _, span in traces.values()]
        effects = [pick(scores, *span) - low for scores, low, _, span in traces.values()]
        found = data["hidden"][category]
        assert found["count"] == 3 and found["indirect_effect"]["count"] == 3, category
        assert len(found["mean"]) == len(found["ci95"]) == n_layers
        assert _close(found["mean"], np.mean(rows, axis=0)), (category, found["mean"], np.mean(rows, axis=0))
        assert _close(found["indirect_effect"]["mean"], np.mean(effects, axis=0)), category
        assert np.isfinite(found["ci95"]).all() and (np.asarray(found["ci95"]) >= 0).all()
        assert _finite_probabilities(found["mean"])
    # Restoring the last layer at the last token gives back the clean run: the mean clean probability.
    assert _close(data["hidden"]["last_token"]["mean"][-1], data["high_score"])

    # severed: the fact set's known facts (3, in the file's order) and a typed prompt, both inputs used.
    out = _run("severed", str(path), PROMPT, "--subject", "Eiffel Tower", "--model", str(tiny_folder), "--samples", "2",
               "--json", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr
    severed = json.loads((tmp_path / "s.json").read_text())
    traces[PROMPT] = _oracle_hidden_trace(plain, PROMPT, "Eiffel Tower", samples=2)
    assert severed["prompts"] == 4
    assert _close(severed["high_score"], np.mean([high for _, _, high, _ in traces.values()]))
    assert _close(severed["low_score"], np.mean([low for _, low, _, _ in traces.values()]))
    ordinary = [scores[end - 1] for scores, _, _, (_, end) in traces.values()]
    assert severed["ordinary"]["count"] == 4 and _close(severed["ordinary"]["mean"], np.mean(ordinary, axis=0))
    for key in ("mlp_severed", "attn_severed"):
        assert severed[key]["count"] == 4 and len(severed[key]["mean"]) == n_layers
        assert _finite_probabilities(severed[key]["mean"]) and np.isfinite(severed[key]["ci95"]).all()
        # Nothing lies above the last layer to sever: there it is the ordinary restoration.
        assert _close(severed[key]["mean"][-1], severed["ordinary"]["mean"][-1])


def test_known_counts_predictions_and_json(tiny_folder, plain, mixed_facts, tmp_path):
    path, records, _ = mixed_facts
    tokenizer = plain[0]
    expected = {}
    for record in records:
        counts = expected.setdefault(record["relation_id"], {"correct": 0, "total": 0})
        counts["correct"] += _is_correct(plain, record)
        counts["total"] += 1
    assert sum(c["correct"] for c in expected.values()) == 3 and len(expected) == 2  # the fixture's mix

    out = _run("known", str(path), "--model", str(tiny_folder), "--write-predictions", str(tmp_path / "p.json"),
               "--json", str(tmp_path / "k.json"))
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "3 of 5 facts completed correctly"
    assert json.loads((tmp_path / "k.json").read_text()) == {"facts_total": 5, "facts_correct": 3, "relations": expected}
    written = json.loads((tmp_path / "p.json").read_text())
    assert len(written) == len(records)
    for index, (old, new) in enumerate(zip(records, written)):
        assert new["prediction"] == tokenizer.decode([_top(plain, old["prompt"])]), index
        assert new == {**old, "prediction": new["prediction"]}, index
        assert set(new) == {"known_id", "subject", "attribute", "template", "prediction", "prompt", "relation_id"}
    # The written file is itself a fact set: known reads it back with the same counts, to stdout without --json.
    again = _run("known", str(tmp_path / "p.json"), "--model", str(tiny_folder))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"facts_total": 5, "facts_correct": 3, "relations": expected}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ('[{"subject": "x"', "is not valid UTF-8 JSON"),
    ],
)
def test_known_bad_input_exits_2_with_one_line(tiny_folder, tmp_path, content, message):
    path = tmp_path / "facts.json"
    if content is not None:
        path.write_text(content)
    out = _run("known", str(path), "--model", str(tiny_folder), "--json", str(tmp_path / "k.json"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr
    assert not (tmp_path / "k.json").exists()


def test_edit_reports_saves_and_reapplies(tiny_folder, tmp_path):
    common = ("--model", str(tiny_folder), "--layer", "1", "--stats-corpus", "identity", "--steps", "3", "--tokens", "5")
    filled = "The Eiffel Tower is located in the city of"
    # Every list flag given twice, the first time with two values: all of them, in order, reach the report.
    out = _run("edit", "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", " Rome",
               "--generate", "The Eiffel Tower is", "Paris is", "--paraphrase", filled, "--neighborhood", filled,
               "--json", str(tmp_path / "e.json"), "--save-edit", str(tmp_path / "e.npz"),
               "--generate", "Rome is", "--paraphrase", "The Louvre is in", "--neighborhood", "The Colosseum is in",
               "--clamp-factor", "0.5", "--loss-stop", "0.01", *common)
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "e.json").read_text())
    for key in ("request", "layer", "method", "seconds", "stats", "delta_norm", "before", "after"):
        assert key in data
    assert data["layer"] == 1 and data["method"] == "rome" and data["stats"]["corpus"] == "identity"
    assert data["stats"]["clamp_factor"] == 0.5 and data["stats"]["loss_stop"] == 0.01
    assert data["request"]["target_true"]  # filled in from the model's own top-1 token
    for side in ("before", "after"):
        assert set(data[side]) >= {"target_new_prob", "target_true_prob", "generations"}
        assert [g["prompt"] for g in data[side]["generations"]] == ["The Eiffel Tower is", "Paris is", "Rome is"]
        for group, prob in (("paraphrases", "target_new_prob"), ("neighborhood", "target_true_prob")):
            # Both given: the first (the edit prompt itself) scores as the edit prompt, the second differently.
            first, second = data[side][group][prob]
            assert first == pytest.approx(data[side][prob], rel=1e-4) and second != pytest.approx(first, rel=1e-3)
    assert data["after"]["target_new_prob"] != data["before"]["target_new_prob"]
    stacked = _run("edit", "--prompt", "{} plays the", "--subject", "Miles Davis", "--target", " guitar",
                   "--apply-edit", str(tmp_path / "e.npz"), "--json", str(tmp_path / "s.json"),
                   "--apply-edit", str(tmp_path / "e.npz"), *common)
    assert stacked.returncode == 0, stacked.stderr
    assert json.loads((tmp_path / "s.json").read_text())["edits_applied_first"] == 2


def test_edit_takes_templates_and_c_from_files_for_a_comparison(tiny_folder, tmp_path):
    """--prefixes-file and --stats-file (a runningstats .npz) reach the edit: its report names the file, and a
    second run with the same files gives the same ΔW; a template file with two slots is refused."""
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(["{}", "The city is large. {}"]))
    width = 256  # the tiny GPT-2's MLP width
    keys = np.random.default_rng(0).standard_normal((400, width))
    np.savez(tmp_path / "c.npz", **{"mom2.mom2": (keys.T @ keys + 40 * np.eye(width)).astype(np.float32), "mom2.count": np.array(400)})
    common = ("edit", "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", " Rome",
              "--target-true", " Paris", "--model", str(tiny_folder), "--layer", "1", "--settings", "reference",
              "--prefixes-file", str(templates), "--stats-file", str(tmp_path / "c.npz"))
    for name in ("a", "b"):
        out = _run(*common, "--save-edit", str(tmp_path / f"{name}.npz"), "--json", str(tmp_path / f"{name}.json"), one_thread=True)
        assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["settings"] == "reference" and data["method"] == "rome-original" and data["stats"]["corpus"] == f"file:{tmp_path / 'c.npz'}"
    assert data["stats"]["samples"] == 400 and data["stats"]["strengthen"] is False
    assert set(data["metrics"]["after"]) >= {"ES", "decoded_efficacy", "decoded_paraphrase", "decoded_neighborhood"}
    first, second = (np.load(tmp_path / f"{name}.npz") for name in ("a", "b"))
    assert np.array_equal(first["left"], second["left"]) and np.array_equal(first["right"], second["right"])
    templates.write_text(json.dumps(["{}", "{} and {}"]))
    out = _run(*common, one_thread=True)
    assert out.returncode == 2 and "error:" in out.stderr.strip().splitlines()[-1], out.stderr


EDIT_BASE = ["edit", "--prompt", "{} is in", "--subject", "Paris", "--target", " Rome"]


@pytest.mark.parametrize("flag, dest", [("--generate", "generate"), ("--paraphrase", "paraphrase"),
                                        ("--neighborhood", "neighborhood"), ("--apply-edit", "apply_edit")])
def test_list_flags_add_up_when_repeated(flag, dest):
    parser = build_parser()
    assert getattr(parser.parse_args([*EDIT_BASE, flag, "A", "B"]), dest) == ["A", "B"]
    assert getattr(parser.parse_args([*EDIT_BASE, flag, "A", "--tokens", "5", flag, "B", "C"]), dest) == ["A", "B", "C"]
    assert getattr(parser.parse_args([*EDIT_BASE, flag, "A", flag, "B"]), dest) == ["A", "B"]
    # The default list is copied, not extended in place: a later parse without the flag starts empty again.
    assert getattr(parser.parse_args(EDIT_BASE), dest) == []
    assert getattr(build_parser().parse_args(EDIT_BASE), dest) == []


def test_kinds_add_up_when_repeated():
    parser = build_parser()

    def kinds(*argv):
        return _options(parser.parse_args(["trace", PROMPT, *argv])).kinds

    assert kinds() == ("hidden", "mlp", "attn")
    assert kinds("--kinds", "mlp") == ("mlp",)
    assert kinds("--kinds", "attn", "--samples", "2", "--kinds", "hidden,mlp") == ("attn", "hidden", "mlp")
    assert kinds("--kinds", "mlp,hidden", "--kinds", "mlp") == ("mlp", "hidden")
    assert kinds() == ("hidden", "mlp", "attn")


def test_severed_inputs_are_all_kept_or_refused(capsys):
    parser = build_parser()
    assert parser.parse_args(["severed", "a.json", PROMPT, "--samples", "2"]).inputs == ["a.json", PROMPT]
    assert parser.parse_args(["severed", "--samples", "2", "a.json", PROMPT]).inputs == ["a.json", PROMPT]
    # Inputs split by an option: argparse cannot take the second; it must say so, not drop it.
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["severed", "a.json", "--samples", "2", PROMPT])
    assert exit_.value.code == 2 and f"unrecognized arguments: {PROMPT}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (("--method", "memit"), "unknown method"),
        (("--layer", "9"), "out of range"),
        (("--stats-corpus", "novels"), "unknown statistics corpus"),
        (("--target", " "), "target_new is empty"),
        (("--apply-edit", "/no/such.npz"), "not a saved edit"),
        (("--clamp-factor", "-1"), "clamp_factor must be a number"),
        (("--loss-stop", "nan"), "loss_stop must be a number"),
        (("--settings", "reference", "--method", "ft"), "reference"),
        (("--prefixes-file", "/no/such.json"), "--prefixes-file /no/such.json does not exist"),
        (("--stats-file", "/no/such.npz"), "does not exist"),
    ],
)
def test_edit_bad_input_exits_2_with_one_line(tiny_folder, args, message):
    base = {"--prompt": "{} is in", "--subject": "Paris", "--target": " Rome", "--layer": "1", "--stats-corpus": "identity"}
    pairs = dict(base)
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in pairs:
            pairs[flag] = value
        else:
            extra += [flag, value]
    argv = [item for pair in pairs.items() for item in pair] + extra
    out = _run("edit", *argv, "--model", str(tiny_folder))
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, out.stderr


def test_evaluate_prints_table_and_writes_json(tiny_folder, tmp_path):
    out = _run("evaluate", str(REPO / "assets" / "handwritten_counterfact_cases.json"), "--limit", "2", "--skip-generation",
               "--model", str(tiny_folder), "--layer", "1", "--stats-corpus", "identity", "--steps", "2",
               "--json", str(tmp_path / "ev.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "ev.json").read_text())
    assert set(data) >= {"method", "cases", "metrics", "unedited", "per_case"}
    assert data["cases"] == 2 and set(data["metrics"]["ES"]) == {"mean", "ci95"}
    assert "unedited" in out.stderr and "rome" in out.stderr and " ES" in out.stderr
    assert not (tmp_path / "ev.json.partial.jsonl").exists()
    bad = _run("evaluate", str(tiny_folder / "config.json"), "--model", str(tiny_folder))
    assert bad.returncode == 2 and "non-empty JSON list" in bad.stderr.strip().splitlines()[-1]
