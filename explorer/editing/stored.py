"""JSON files in the on-disk cache (context prefixes, the traced layer): read leniently, written atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.atomic import write_atomically


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or cannot be read as JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON; readers never see half a file."""
    text = json.dumps(value, indent=1)
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
