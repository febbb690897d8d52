"""Many users at once through `gradio_client`: sessions stay apart, the shared model stays unedited, a full queue says busy."""
from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.app_server import tiny_app
from tests.conftest import traced_scores as scores

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
TRACE = (PROMPT, SUBJECT, ["hidden", "mlp"], 3, 2, 3, "")
EDIT = ("{} is located in the city of", SUBJECT, " Rome", "", "1", "rome", "The Eiffel Tower is in the city of",
        "The Louvre is located in the city of", "The Eiffel Tower is")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with tiny_app(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("cache")) as (url, _folder):
        yield url


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
    with tiny_app(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("cache"), ROME_EXPLORER_QUEUE="1") as (url, _):
        clients = [client(url) for _ in range(6)]
        slow = (PROMPT, SUBJECT, ["hidden", "mlp", "attn"], 50, 4, 3, "")
        with ThreadPoolExecutor(len(clients)) as pool:
            outcomes = list(pool.map(lambda c: _outcome(c, slow), clients))
        busy = [o for o in outcomes if o != "done"]
        assert "done" in outcomes and busy, outcomes
        assert all("queue is full" in message.lower() for message in busy), busy


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
