"""The one output sink: rich tables on a terminal, JSON for machines, or quiet.

Results go to stdout; diagnostics and errors go to stderr. NO_COLOR is respected (rich).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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

    def show(self, render: Any) -> None:
        """Part of a result, printed (stdout) in human mode only; json mode has it in the data."""
        if self.format is OutputFormat.human:
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

    @contextmanager
    def progress(self, *, unit: str) -> Iterator[Ticker]:
        """A progress bar on stderr with ``unit``/s, drawn only in human mode on a terminal
        (never into logs or pipes); otherwise every call on the yielded ticker does nothing."""
        if self.format is not OutputFormat.human or not self.err.is_terminal:
            yield Ticker()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.0f} {unit}/s" if speed else f"-- {unit}/s")

        bar = Progress(
            BarColumn(),
            MofNCompleteColumn(),
            Rate(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        with bar:
            yield _RichTicker(bar, bar.add_task(unit, total=None))


class Ticker:
    """Progress of a long step: ``set_total`` once it is known, ``advance`` as work is done."""

    def set_total(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


class _RichTicker(Ticker):
    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def set_total(self, total: int) -> None:
        self.bar.reset(self.task, total=total)  # the clock starts now

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
