"""The one output sink: rich tables on a terminal, JSON for machines, or quiet.

Results go to stdout; diagnostics and errors go to stderr. NO_COLOR is respected (rich).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from enum import StrEnum
from typing import Any

from rich.console import Console

#: the width tables are laid out in when stdout is not a terminal (wide enough for any row)
PIPE_WIDTH = 10_000


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def plural(n: int, word: str) -> str:
    """``1 token``, ``2,048 tokens``."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


class OutputFormat(StrEnum):
    human = "human"
    json = "json"
    quiet = "quiet"


class Sink:
    def __init__(self, fmt: OutputFormat = OutputFormat.human) -> None:
        self.format = fmt
        # bound to the streams of now: library output captured later never swallows ours
        # piped (`| less`, `> file`): no terminal width to fit, so tables never wrap mid-entry
        width = None if _is_terminal(sys.stdout) or os.environ.get("COLUMNS") else PIPE_WIDTH
        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)
        self._stderr = sys.stderr

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
        self._stderr.write(line.replace("\n", " ") + "\n")

    @contextmanager
    def progress(self, *, unit: str) -> Iterator[Ticker]:
        """Progress of a long step on stderr, in human mode: a bar with ``unit``/s on a
        terminal; in a log or pipe (CI), one plain line every ``LogTicker.INTERVAL`` seconds;
        in json / quiet mode nothing (every call on the yielded ticker does nothing)."""
        if self.format is not OutputFormat.human:
            yield Ticker()
            return
        if not self.err.is_terminal:  # a CI log: a plain line every few seconds, no bar
            yield LogTicker(self._stderr, unit=unit)
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


#: environment switches of third-party progress bars and logs, set while they are silenced
_QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
_LIBRARY_LOGGERS = ("transformers", "datasets", "lm-eval", "lm_eval", "evaluate", "accelerate")
_LIBRARY_LOGGERS += ("huggingface_hub", "torch", "urllib3", "filelock", "fsspec")


@contextmanager
def library_output(*, verbose: bool) -> Iterator[None]:
    """What third-party libraries print while they work for mfprune (lm-eval's per-request
    progress, datasets' "Generating split", transformers' load reports, warnings): with
    ``verbose``, shown on stderr; otherwise captured and dropped. Either way never on stdout,
    which holds the command's result alone. mfprune's own lines go through a ``Sink``, bound to
    the real streams when it was made, and are not affected."""
    if verbose:
        with redirect_stdout(sys.stderr):
            yield
        return
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    hf = _transformers_logging()
    hf_state = (hf.get_verbosity(), hf.is_progress_bar_enabled()) if hf else None
    if hf:
        hf.set_verbosity_error()
        hf.disable_progress_bar()
    sink = io.StringIO()
    try:
        with redirect_stdout(sink), redirect_stderr(sink):
            yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if hf and hf_state:
            hf.set_verbosity(hf_state[0])
            if hf_state[1]:
                hf.enable_progress_bar()


def _transformers_logging() -> Any:
    """transformers' logging module if transformers is already imported (never imports it)."""
    if "transformers" not in sys.modules:
        return None
    from transformers.utils import logging as hf_logging

    return hf_logging


class Ticker:
    """Progress of a long step: ``set_total`` once it is known, ``advance`` as work is done."""

    def set_total(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


class LogTicker(Ticker):
    """Progress for logs: ``progress: 1,234 / 5,678 tokens (22%), 456 tokens/s, 12 s`` at
    most once every ``interval`` seconds (never a bar or a carriage return)."""

    INTERVAL = 5.0

    def __init__(
        self,
        stream: Any,
        *,
        unit: str,
        interval: float | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.stream, self.unit, self.clock = stream, unit, clock
        self.interval = LogTicker.INTERVAL if interval is None else interval
        self.total: int | None = None
        self.done = 0
        self.start = self.last = clock()

    def set_total(self, total: int) -> None:
        self.total, self.done = total, 0
        self.start = self.last = self.clock()  # the clock starts now

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = f"{self.done:,.0f}"
        if self.total:
            done += f" / {self.total:,} {self.unit} ({self.done / self.total:.0%})"
        else:
            done += f" {self.unit}"
        rate = self.done / max(elapsed, 1e-9)
        return f"progress: {done}, {rate:,.0f} {self.unit}/s, {elapsed:.0f} s"


class _RichTicker(Ticker):
    def __init__(self, bar: Any, task: Any) -> None:
        self.bar, self.task = bar, task

    def set_total(self, total: int) -> None:
        self.bar.reset(self.task, total=total)  # the clock starts now

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
