"""The real app on a tiny random model, for the tests; starting the app itself is ``explorer.testing.app_server``
(shared with the benchmarks), whose names stay importable from here."""
from __future__ import annotations

import contextlib
from pathlib import Path

from explorer.testing.app_server import (  # noqa: F401  (the tests import these from here)
    CHROMIUM,
    CHROMIUM_FLAGS,
    REPO,
    free_port,
    launch_browser,
    running_app,
    wait_for_page,
)
from tests.conftest import save_tiny  # noqa: F401  (the tests import it from here too)


@contextlib.contextmanager
def tiny_app(folder: Path, cache: Path, **env: str):
    """The app serving a tiny random Llama saved under ``folder``, caching under ``cache``: yields (url, folder)."""
    save_tiny(folder)
    with running_app(folder, ROME_EXPLORER_CACHE=str(cache), **env) as (url, _seconds):
        yield url, folder
