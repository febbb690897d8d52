"""The first edit on a fresh machine, against the same edit with everything cached, in one run.

    python benchmarks/speed/bench_first_edit.py [--rounds 2] [--skip-cli] [--skip-app]

CLI: `python -m explorer edit` of the Eiffel Tower to Rome, first with empty statistics and prefix caches
(the converted model present, as after a first start), then again with them filled; each round uses a new
empty cache. Prints the wall time of both and the difference (the one-time cost of the first edit).

App: `python app.py` on an empty statistics/prefix cache; /edit is called through gradio_client as soon as
the page is served (it waits for the model and for the start-up preparation), while /model_status is polled
to see when the model finished loading. Prints seconds from the model being ready to the edit's panel, for
a fresh start and for a restart with the statistics cached.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from explorer.core.models import cache_root, default_model_folder
from explorer.testing.app_server import running_app

REPO = Path(__file__).resolve().parents[2]

EDIT = ["--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", " Rome"]
APP_EDIT = ("{} is located in the city of", "The Eiffel Tower", " Rome", "", "", "rome", "",
            "The Louvre is located in the city of", "The Eiffel Tower is located in")


def fresh_cache() -> Path:
    """An empty cache folder that shares the already converted model (so only statistics and prefixes are new)."""
    default_model_folder()  # converts once if this machine never did
    folder = Path(tempfile.mkdtemp(prefix="rome-first-edit-"))
    (folder / "models").symlink_to(cache_root() / "models", target_is_directory=True)
    return folder


def cli_edit(cache: Path) -> tuple[float, dict]:
    began = time.perf_counter()
    out = cache / "edit.json"
    subprocess.run([sys.executable, "-m", "explorer", "edit", *EDIT, "--json", str(out)], cwd=REPO, check=True,
                   env={**os.environ, "ROME_EXPLORER_CACHE": str(cache)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began, json.loads(out.read_text())


def app_first_edit(cache: Path) -> dict:
    """Seconds from `python app.py` to the page, to the model loaded, to the edit panel (clicked at once)."""
    from gradio_client import Client

    began = time.perf_counter()
    with running_app(ROME_EXPLORER_CACHE=str(cache)) as (url, served):
        loaded: dict[str, float] = {}
        watcher = Client(url, verbose=False)

        def watch() -> None:
            while "model" not in loaded:
                if watcher.predict("", api_name="/model_status")["loaded"]:
                    loaded["model"] = time.perf_counter() - began
                time.sleep(0.2)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        Client(url, verbose=False).predict(*APP_EDIT, api_name="/edit")
        done = time.perf_counter() - began
        thread.join(30)
        return {"served": served, "model_loaded": loaded["model"], "edit_done": done}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--skip-app", action="store_true")
    args = parser.parse_args()
    if not args.skip_cli:
        print("CLI `edit` Eiffel Tower -> Rome (wall time, model load included):")
        for round_ in range(1, args.rounds + 1):
            cache = fresh_cache()
            cold, report = cli_edit(cache)
            warm, _ = cli_edit(cache)
            phases = report.get("phases") or {}
            print(f"  round {round_}: empty caches {cold:6.1f} s, cached {warm:6.1f} s, difference {cold - warm:5.1f} s "
                  f"(first edit's statistics {phases.get('stats', float('nan')):.1f} s, prefixes "
                  f"{phases.get('prefixes', float('nan')):.1f} s; C from {report['stats']['samples']:,} keys of {report['stats']['corpus']})")
    if not args.skip_app:
        print("App: Edit clicked as soon as the page is served (seconds since `python app.py`):")
        cache = fresh_cache()
        for label in ("fresh start, empty caches", "restart, statistics cached"):
            times = app_first_edit(cache)
            print(f"  {label}: page {times['served']:.1f} s, model loaded {times['model_loaded']:.1f} s, edit panel "
                  f"{times['edit_done']:.1f} s = {times['edit_done'] - times['model_loaded']:.1f} s after the model was ready")


if __name__ == "__main__":
    main()
