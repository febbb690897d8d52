"""The command line, run as users run it: a subprocess on a tiny model saved to a local folder."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, build_tiny

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny = build_tiny("gpt2")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def _run(*args):
    return subprocess.run([sys.executable, "-m", "explorer", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_trace_writes_json_npz_and_html(tiny_folder, tmp_path):
    out = _run("trace", PROMPT, "--subject", "Eiffel Tower", "--model", str(tiny_folder), "--samples", "3", "--window", "2",
               "--json", str(tmp_path / "t.json"), "--npz", str(tmp_path / "t.npz"), "--html", str(tmp_path / "t.html"))
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


def test_average_and_severed_json(tiny_folder, tmp_path):
    facts = tmp_path / "facts.json"
    records = json.loads((REPO / "assets" / "known_facts.json").read_text())[:3]
    facts.write_text(json.dumps(records))
    out = _run("average", str(facts), "--model", str(tiny_folder), "--samples", "2", "--kinds", "hidden", "--json", str(tmp_path / "a.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["facts_total"] == 3 and 0 <= data["facts_correct"] <= 3
    assert set(data["hidden"]) >= {"first_subject_token", "last_subject_token", "last_token"}
    out = _run("severed", PROMPT, "--subject", "Eiffel Tower", "--model", str(tiny_folder), "--samples", "2", "--json", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr
    severed = json.loads((tmp_path / "s.json").read_text())
    assert len(severed["ordinary"]["mean"]) == len(severed["mlp_severed"]["mean"]) == 4


def test_edit_reports_saves_and_reapplies(tiny_folder, tmp_path):
    common = ("--model", str(tiny_folder), "--layer", "1", "--stats-corpus", "identity", "--steps", "3", "--tokens", "5")
    out = _run("edit", "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", " Rome",
               "--generate", "The Eiffel Tower is", "--json", str(tmp_path / "e.json"), "--save-edit", str(tmp_path / "e.npz"),
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
        assert data[side]["generations"][0]["prompt"] == "The Eiffel Tower is"
    assert data["after"]["target_new_prob"] != data["before"]["target_new_prob"]
    stacked = _run("edit", "--prompt", "{} plays the", "--subject", "Miles Davis", "--target", " guitar",
                   "--apply-edit", str(tmp_path / "e.npz"), "--json", str(tmp_path / "s.json"), *common)
    assert stacked.returncode == 0, stacked.stderr
    assert json.loads((tmp_path / "s.json").read_text())["edits_applied_first"] == 1


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
    out = _run("evaluate", str(REPO / "assets" / "counterfact_sample.json"), "--limit", "2", "--skip-generation",
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
