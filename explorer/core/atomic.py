"""Files and folders that readers never see half-written: write beside the target, then rename over it."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary path)`` in ``path``'s folder, then rename the result onto ``path``.

    A failure (or an interruption) leaves ``path`` as it was and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_folder_atomically(folder: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary folder)`` beside ``folder``, then swap the result in for ``folder``.

    An old ``folder`` (stale or damaged) is moved aside before the swap and removed; a failure leaves
    ``folder`` as it was and removes the temporary one.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        write(temporary)
        if folder.exists():
            stale = Path(tempfile.mkdtemp(prefix=folder.name + ".stale-", dir=folder.parent))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder
