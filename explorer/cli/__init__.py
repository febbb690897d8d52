"""Command line: ``python -m explorer trace|inspect|average|severed|known|edit|evaluate|sequential|sweep ...`` (the same engines as the app).

* ``arguments``: the parser, one function per command, and reading arguments into the engines' options.
* ``commands``: what each command runs and prints.
* ``console``: the progress bar, JSON output, model loading.
"""
from __future__ import annotations

import sys

from ..core.errors import InputError
from . import commands
from .arguments import build_parser

COMMANDS = {
    "trace": commands.run_trace,
    "inspect": commands.run_inspect,
    "average": commands.run_average,
    "severed": commands.run_severed,
    "known": commands.run_known,
    "edit": commands.run_edit,
    "evaluate": commands.run_evaluate,
    "sequential": commands.run_sequential,
    "sweep": commands.run_sweep,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input exits 2 with a one-line message."""
    from ..core.errors import ModelLoadError
    from ..core.progress import Cancelled

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (InputError, ModelLoadError, Cancelled, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]
