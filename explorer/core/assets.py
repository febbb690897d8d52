"""Where the bundled data files are: ``assets/`` of the checkout, or the copy a wheel installs inside the package."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
# A wheel (pyproject.toml maps assets/ to the package's assets/ folder) puts them inside the package; a checkout,
# run in place or installed editable, keeps them beside it.
ASSETS = _PACKAGE / "assets" if (_PACKAGE / "assets").is_dir() else _PACKAGE.parent / "assets"
