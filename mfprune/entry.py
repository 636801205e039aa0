"""The `mfprune` console entry point, kept free of heavy imports so that Ctrl-C is handled from
the first moment: the signal handlers are installed before typer, rich, torch or transformers
are imported, and an interrupt at any point — start-up, option parsing, the command, clean-up —
prints one line and exits 130 (SIGINT) or 143 (SIGTERM)."""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

#: what is true after an interrupt: outputs are staged and only renamed into place when done
INTERRUPT_HINT = "nothing was written; run the command again to start over"


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. A BaseException, not KeyboardInterrupt, so that no library's
    ``except Exception`` swallows it and no option parser turns it into a silent exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


def _interrupt(signum: int, _frame: Any) -> None:
    # one interrupt is enough: later ones during clean-up are ignored (no second traceback)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def install_handlers() -> None:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def interrupted_line(hint: str = INTERRUPT_HINT) -> str:
    return f"error: interrupted (hint: {hint})\n"


def main(argv: list[str] | None = None) -> NoReturn:
    install_handlers()
    try:
        from mfprune.cli import run

        code = run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except Interrupted as exc:
        sys.stderr.write(interrupted_line())
        code = exc.exit_code
    except BrokenPipeError:  # `mfprune ... | head`: the reader left; not an error of ours
        code = 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: exit without a traceback
    sys.exit(code)
