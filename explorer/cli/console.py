"""What the command line shows and writes: a progress bar on stderr, JSON to a file or stdout, the model loading."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..tracing.export import json_text

PROGRESS_WIDTH = 30


class ProgressBar:
    """A one-line progress bar with an estimate of the time left, on stderr."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.began = time.monotonic()

    def __call__(self, fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        elapsed = time.monotonic() - self.began
        left = f", ~{elapsed / fraction - elapsed:.0f}s left" if fraction > 0.02 else ""
        filled = int(PROGRESS_WIDTH * fraction)
        bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {fraction:4.0%} {elapsed:.0f}s{left} {message[:40]:<40}")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")


def load(args: argparse.Namespace):
    from ..core.models import load_model

    bar = ProgressBar("loading model")
    try:
        return load_model(args.model, dtype=args.dtype, device=args.device, progress=bar)
    finally:
        bar.done()


def write_json(path: str | None, data: dict) -> None:
    text = json_text(data)
    if path:
        Path(path).write_text(text, encoding="utf-8")
    else:
        print(text)
