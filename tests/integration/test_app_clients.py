"""Many users at once through `gradio_client`: sessions stay apart, the shared model stays unedited, a full queue says busy;
and each named endpoint (compare, average, severed, load_model) answers with values that mean something."""
from __future__ import annotations

import base64
import json
import math
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.app_server import save_tiny, tiny_app
from tests.conftest import traced_scores as scores

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
TRACE = (PROMPT, SUBJECT, ["hidden", "mlp"], 3, 2, 3, "")
EDIT = ("{} is located in the city of", SUBJECT, " Rome", "", "1", "rome", "The Eiffel Tower is in the city of",
        "The Louvre is located in the city of", "The Eiffel Tower is")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, model folder) of the app serving a tiny random Llama, shared by this module's tests."""
    with tiny_app(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("cache")) as served:
        yield served


@pytest.fixture(scope="module")
def app_url(served):
    return served[0]


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_concurrent_sessions_see_only_their_own_edits(app_url):
    unedited = scores(client(app_url).predict(*TRACE, api_name="/trace"))
    plain_completion = client(app_url).predict("The Eiffel Tower is", api_name="/complete")
    a, b = client(app_url), client(app_url)
    # A edits and then traces while B traces and completes; the app interleaves their requests on one model.
    a_edit = a.submit(*EDIT, api_name="/edit")
    b_jobs = [b.submit(*TRACE, api_name="/trace"), b.submit("The Eiffel Tower is", api_name="/complete")]
    a_edit.result(timeout=300)
    a_trace = a.submit(*TRACE, api_name="/trace")
    b_jobs.append(b.submit(*TRACE, api_name="/trace"))
    edited = scores(a_trace.result(timeout=300))
    b_first, b_completion, b_second = (job.result(timeout=300) for job in b_jobs)
    assert scores(b_first) == unedited and scores(b_second) == unedited  # exactly: same floats in the JSON
    assert b_completion == plain_completion and "0 edit(s) active" in b_completion
    assert edited != unedited
    assert scores(a.predict(*TRACE, api_name="/trace")) == edited  # A's edited model is stable too
    assert "1 edit(s) active" in a.predict("The Eiffel Tower is", api_name="/complete")
    a.predict("", api_name="/undo")
    assert scores(a.predict(*TRACE, api_name="/trace")) == unedited


def test_the_app_listens_on_loopback_only(app_url):
    address = _outward_address()
    if address is None or address.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    port = int(app_url.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
        pass


def test_a_full_queue_answers_busy(tmp_path_factory):
    with tiny_app(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("cache"), ROME_EXPLORER_QUEUE="1",
                  ROME_EXPLORER_MAX_RUNNING="1") as (url, _):
        clients = [client(url) for _ in range(6)]
        slow = (PROMPT, SUBJECT, ["hidden", "mlp", "attn"], 50, 4, 3, "")
        with ThreadPoolExecutor(len(clients)) as pool:
            outcomes = list(pool.map(lambda c: _outcome(c, slow), clients))
        busy = [o for o in outcomes if o != "done"]
        assert "done" in outcomes and busy, outcomes
        assert all("queue is full" in message.lower() for message in busy), busy


def test_a_later_visitors_short_trace_does_not_wait_for_an_earlier_long_one(app_url):
    """Jobs take turns step by step: a short trace pressed while another visitor's long trace runs is done long
    before it (one job at a time, it waited for the whole long trace)."""
    import time

    long_trace = (PROMPT, SUBJECT, ["hidden", "mlp", "attn"], 50, 4, 3, "")
    short_trace = (PROMPT, SUBJECT, ["hidden"], 2, 2, 3, "")
    first, second = client(app_url), client(app_url)
    first.predict(*short_trace, api_name="/trace")  # the model is loaded and warm before timing anything
    began = time.monotonic()
    running = first.submit(*long_trace, api_name="/trace")
    while not running.outputs() and time.monotonic() - began < 120:  # the long trace has drawn its estimate
        time.sleep(0.05)
    assert running.outputs() and not running.done()
    short = second.submit(*short_trace, api_name="/trace")
    short.result(timeout=300)
    short_done = time.monotonic()
    assert not running.done(), "the long trace ended before the short one: no turns were taken"
    running.result(timeout=600)
    assert time.monotonic() - short_done > 0.3 * (short_done - began)


def test_gradio_refuses_an_upload_over_the_cap_before_the_handler_sees_it(tmp_path_factory, tmp_path):
    from gradio_client import handle_file

    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"subject": "The Eiffel Tower", "prompt": PROMPT, "attribute": " Paris"}] * 20))
    with tiny_app(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("cache"),
                  ROME_EXPLORER_MAX_UPLOAD_BYTES=str(facts.stat().st_size - 1)) as (url, _):
        with pytest.raises(Exception, match="(?i)file size|too large|exceed") as refused:
            client(url).predict(handle_file(str(facts)), 1, ["hidden"], 2, api_name="/average")
    assert "over the limit of" not in str(refused.value)  # refused by Gradio, not by the handler's own check


def _outward_address() -> str | None:
    """This machine's address on its default route (a UDP "connect" sends nothing), None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            return probe.getsockname()[0]
        except OSError:
            return None


def _outcome(c, args) -> str:
    try:
        c.predict(*args, api_name="/trace")
        return "done"
    except Exception as error:  # gradio_client reports a refused request as an exception carrying Gradio's message
        return str(error)


def test_model_status_reports_the_start_up_preparation(app_url):
    import time

    watcher = client(app_url)
    deadline = time.monotonic() + 300
    status = watcher.predict("", api_name="/model_status")
    while status["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
        status = watcher.predict("", api_name="/model_status")
    assert status["loaded"] and not status["running"] and status["fraction"] == 1.0, status
    # The tiny model's default layer is traced (it has no measured one) and C comes from offline Wikipedia.
    assert not status["failed"] and re.fullmatch(r"ready to edit \(default layer \d; C from [\d,]+ keys of wikipedia\)",
                                                 status["message"]), status
    assert watcher.predict("no-such-model", api_name="/model_status")["message"] == "not started"


def plotted(output) -> dict:
    """The plotly figure of a Plot output (a bare value, or an update that carries one) as JSON."""
    value = output.get("value", output) if output.get("__type__") == "update" else output
    return json.loads(value["plot"])


def array(values) -> np.ndarray:
    """A figure's data array: a plain list, or plotly's typed-array encoding (base64 ``bdata``, ``dtype``, ``shape``)."""
    if isinstance(values, dict):
        flat = np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
        shape = [int(n) for n in str(values.get("shape", len(flat))).split(",")]
        return flat.reshape(shape).astype(float)
    return np.asarray(values, dtype=float)


def saved_trace(trace_output) -> dict:
    """The JSON download of a `/trace` result."""
    json_path = next(path for path in trace_output[5] if str(path).endswith(".json"))
    return json.loads(Path(json_path).read_text(encoding="utf-8"))


def finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


COMPARE = ("{} is located in the city of", SUBJECT, " Rome", ["mlp"], 3, 2, 3)


def test_compare_traces_the_original_and_the_edited_model(app_url):
    from gradio_client.exceptions import AppError

    c = client(app_url)
    with pytest.raises(AppError, match="no active edits"):
        c.predict(*COMPARE, api_name="/compare")
    c.predict(*EDIT, api_name="/edit")
    *figures, caption = c.predict(*COMPARE, api_name="/compare")
    # Three original maps, then three edited ones; only the asked-for kind is shown.
    assert [f.get("visible", True) for f in figures] == [False, True, False] * 2
    original, edited = (array(plotted(figures[i])["data"][0]["z"]) for i in (1, 4))
    # The original map is exactly what an unedited session traces for the filled prompt, with the same settings.
    unedited = scores(client(app_url).predict(PROMPT, SUBJECT, ["mlp"], 3, 2, 3, "", api_name="/trace"))["mlp"]
    np.testing.assert_allclose(original, np.asarray(unedited), rtol=1e-12)
    assert original.shape == edited.shape and np.isfinite(edited).all() and not np.allclose(original, edited)
    lines = caption.splitlines()
    assert [line.split(":")[0] for line in lines] == ["original", "edited"]
    answers = [re.search(r"answer ('.*?'|\".*?\"): p = ([\d.]+) clean", line) for line in lines]
    # Both maps show the probability of the original model's answer; the edit moved its clean probability.
    assert answers[0].group(1) == answers[1].group(1) and answers[0].group(2) != answers[1].group(2), caption
    c.predict("", api_name="/reset")
    with pytest.raises(AppError, match="no active edits"):
        c.predict(*COMPARE, api_name="/compare")


@pytest.fixture(scope="module")
def fact_file(served, tmp_path_factory):
    """A fact set of three: two the tiny model completes (their attribute relabelled to its own answer), one it does not."""
    from explorer.core.assets import ASSETS
    from explorer.core.facts import parse_facts
    from explorer.core.models import load_model
    from explorer.core.scoring import predicts, top_prediction

    handle = load_model(str(served[1]))  # the served folder, through the same loader as the app
    records = json.loads((ASSETS / "known_facts.json").read_text(encoding="utf-8"))
    unknown, known = records[0], []
    assert not predicts(handle, parse_facts([unknown], source="test")[0])
    for record in records[1:]:
        relabelled = {**record, "attribute": handle.tokenizer.decode([top_prediction(handle, record["prompt"])]).strip()}
        if relabelled["attribute"] and predicts(handle, parse_facts([relabelled], source="test")[0]):
            known.append(relabelled)
        if len(known) == 2:
            break
    assert len(known) == 2, "the tiny model completes too few of the bundled prompts"
    path = tmp_path_factory.mktemp("facts") / "facts.json"
    path.write_text(json.dumps([unknown, *known]), encoding="utf-8")
    return path, known


def test_average_over_an_uploaded_fact_set(app_url, fact_file):
    from gradio_client import handle_file

    path, known = fact_file
    figure, summary, download = client(app_url).predict(handle_file(str(path)), 3, ["hidden", "mlp"], 2, api_name="/average")
    assert summary == "2 of 3 facts completed correctly and traced."
    result = json.loads(Path(download).read_text(encoding="utf-8"))
    assert (result["facts_total"], result["facts_correct"]) == (3, 2)
    assert finite([result["low_score"], result["high_score"]]) and 0 <= result["low_score"] < result["high_score"] <= 1
    for kind in ("hidden", "mlp"):
        for category, numbers in result[kind].items():
            if numbers["count"]:
                assert len(numbers["mean"]) == len(numbers["ci95"]) == 4, (kind, category)  # one per layer
                assert finite(numbers["mean"] + numbers["ci95"]) and all(0 <= p <= 1 for p in numbers["mean"])
        assert result[kind]["last_token"]["count"] == result[kind]["last_subject_token"]["count"] == 2
    # The averages are the mean of the known facts' own traces (same settings: window 10, noise 3, seed 1).
    traces = [saved_trace(client(app_url).predict(f["prompt"], f["subject"], ["hidden", "mlp"], 2, 10, 3, "", api_name="/trace"))
              for f in known]
    for kind in ("hidden", "mlp"):
        last_subject = np.mean([np.asarray(t["traces"][kind])[t["subject_range"][1] - 1] for t in traces], axis=0)
        np.testing.assert_allclose(result[kind]["last_subject_token"]["mean"], last_subject, rtol=1e-5)
        np.testing.assert_allclose(result[kind]["last_token"]["mean"], np.mean([t["traces"][kind][-1] for t in traces], axis=0),
                                   rtol=1e-5)
    # The figure draws those numbers: one panel per kind, each category's mean line as in the JSON.
    data = plotted(figure)["data"]
    lines = {(t["name"].split(" (n=")[0], t.get("yaxis", "y")): array(t["y"]) for t in data if t.get("name")}
    assert {kind for _, kind in lines} == {"y", "y2"} and all(np.isfinite(y).all() for y in lines.values())
    np.testing.assert_allclose(lines["last token", "y2"], result["mlp"]["last_token"]["mean"])


def test_severed_paths_return_the_three_curves(app_url, fact_file):
    from gradio_client import handle_file

    figure, summary, download = client(app_url).predict(handle_file(str(fact_file[0])), 3, 2, api_name="/severed")
    assert summary == "2 of 3 facts completed correctly and severed."
    result = json.loads(Path(download).read_text(encoding="utf-8"))
    assert result["prompts"] == 2 and finite([result["low_score"], result["high_score"]])
    curves = {key: np.asarray(result[key]["mean"]) for key in ("ordinary", "mlp_severed", "attn_severed")}
    for key, curve in curves.items():
        assert curve.shape == (4,) and np.isfinite(curve).all() and ((0 <= curve) & (curve <= 1)).all(), key
        assert result[key]["count"] == 2 and finite(result[key]["ci95"])
    assert not np.allclose(curves["ordinary"], curves["mlp_severed"]) or not np.allclose(curves["ordinary"], curves["attn_severed"])
    lines = {t["name"].split(" (n=")[0]: array(t["y"]) for t in plotted(figure)["data"] if t.get("name")}
    assert set(lines) == {"ordinary", "mlp severed", "attn severed"}
    for key, curve in curves.items():
        np.testing.assert_allclose(lines[key.replace("_", " ")], curve)


def test_load_model_switches_this_session_only(served, tmp_path_factory):
    from gradio_client.exceptions import AppError

    url, own_folder = served
    other_folder = save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")
    mine, someone = client(url), client(url)
    mine.predict(*EDIT, api_name="/edit")
    status, edits, *_ = mine.predict(str(other_folder), api_name="/load_model")
    assert str(other_folder) in status and "gpt2, 4 layers" in status, status
    assert edits["data"] == []  # the edits made on the previous model are dropped with it
    assert "0 edit(s) active" in mine.predict("The Eiffel Tower is", api_name="/complete")
    trace = ("The Eiffel Tower is located in the city of", SUBJECT, ["hidden"], 2, 2, 3, "")

    def traced_model(c) -> tuple[str, str]:
        saved = saved_trace(c.predict(*trace, api_name="/trace"))
        return saved["model"], saved["tokens"][0]

    assert traced_model(mine) == (str(other_folder), "The")  # GPT-2's tokenizer adds no <bos>
    assert traced_model(someone) == (str(own_folder), "<bos>")  # another session keeps the app's model
    # A name that is no model: one line saying so, and the session goes on with the model it had.
    with pytest.raises(AppError) as raised:
        mine.predict(str(other_folder.parent / "no-such-model"), api_name="/load_model")
    message = str(raised.value)
    assert message.startswith("could not find model") and "\n" not in message and "Traceback" not in message, message
    assert traced_model(mine)[0] == str(other_folder)
