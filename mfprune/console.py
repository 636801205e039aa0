"""The one output sink: rich tables on a terminal, JSON for machines, or quiet.

Results go to stdout; diagnostics and errors go to stderr. NO_COLOR is respected (rich).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Any

from rich.console import Console


class OutputFormat(StrEnum):
    human = "human"
    json = "json"
    quiet = "quiet"


class Sink:
    def __init__(self, fmt: OutputFormat = OutputFormat.human) -> None:
        self.format = fmt
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def result(self, data: dict[str, Any], render: Any = None) -> None:
        """The command's result: JSON in json mode, ``render`` (a rich renderable) otherwise."""
        if self.format is OutputFormat.json:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        elif self.format is OutputFormat.human and render is not None:
            self.out.print(render)

    def info(self, message: str) -> None:
        if self.format is OutputFormat.human:
            self.err.print(message)

    def warn(self, message: str) -> None:
        if self.format is not OutputFormat.quiet:
            self.err.print(f"warning: {message}", markup=False)

    def error(self, message: str, hint: str = "") -> None:
        line = f"error: {message}" + (f" (hint: {hint})" if hint else "")
        sys.stderr.write(line.replace("\n", " ") + "\n")
