"""Start the real app (`python app.py` of the checkout) on a free loopback port, as users and Spaces start it."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: app.py lies beside the explorer package
CHROMIUM = "/usr/bin/chromium"
# Flags that work on the project's machines; nothing may download or phone home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_page(url: str, process: subprocess.Popen, log: Path, timeout: float) -> float:
    """Seconds until ``url`` answers 200; fails early when the app process dies."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - began
        time.sleep(0.25)
    raise TimeoutError(f"the app did not serve {url} within {timeout} s")


@contextlib.contextmanager
def running_app(model: str | None = None, timeout: float = 600, **env: str):
    """``python app.py`` with ``model`` (None: the embedded default), yielding (url, seconds until the page was served)."""
    if not (REPO / "app.py").is_file():
        raise FileNotFoundError(f"no app.py in {REPO}: running_app needs a checkout installed with `pip install -e .`")
    port = free_port()
    environment = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", **env}
    environment.pop("GRADIO_SERVER_NAME", None)  # the app's own default: loopback only
    if model is not None:
        environment["ROME_EXPLORER_MODEL"] = str(model)
    log_file = tempfile.NamedTemporaryFile("w", prefix="rome-explorer-app-", suffix=".log", delete=False)
    log = Path(log_file.name)
    # A file, not a pipe: nobody reads the app's output while it runs, and a full pipe would block it.
    process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        seconds = wait_for_page(url, process, log, timeout)
        yield url, seconds
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()
        log.unlink(missing_ok=True)


def launch_browser(playwright, profile: Path):
    """Debian's Chromium through Playwright with a fresh profile: one browser session per profile."""
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000}
    )
