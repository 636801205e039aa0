"""The `mfprune` console entry point, kept free of heavy imports so that Ctrl-C is handled from
the first moment: the signal handlers are installed before typer, rich, torch or transformers
are imported, and an interrupt at any point — start-up, option parsing, the command, clean-up —
prints one line and exits 130 (SIGINT) or 143 (SIGTERM)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, NoReturn

#: what is true after an interrupt: outputs are staged and only renamed into place when done
INTERRUPT_HINT = "nothing was written; run the command again to start over"


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. A BaseException, not KeyboardInterrupt, so that no library's
    ``except Exception`` swallows it and no option parser turns it into a silent exit. A
    library that catches even that gets the next signal; and whatever exception it then raises
    is reported as the interrupt it follows (``received``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


_received: list[int] = []  # the signals received, in order
_exiting = [False]  # True once mfprune is reporting an interrupt: later signals are ignored


#: seconds after which an interrupt that no mfprune handler has reported is raised again (a
#: library caught it and carried on)
RESEND_AFTER = 10.0


def _interrupt(signum: int, _frame: Any) -> None:
    _received.append(signum)
    if _exiting[0]:
        return
    if len(_received) == 1:
        threading.Thread(target=_resend, args=(signum,), daemon=True).start()
    raise Interrupted(signum)


def _resend(signum: int) -> None:
    while not _exiting[0]:
        time.sleep(RESEND_AFTER)
        if not _exiting[0]:
            os.kill(os.getpid(), signum)


def install_handlers() -> None:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def received() -> int | None:
    """The first signal received, if any: an exception raised after it is its consequence (a
    library that caught the interrupt and failed on a half-imported module, say)."""
    return _received[0] if _received else None


def stop_interrupts() -> None:
    """Reporting an interrupt: a second Ctrl-C during the clean-up must not add a traceback."""
    _exiting[0] = True


def interrupted_line(hint: str = INTERRUPT_HINT) -> str:
    return f"error: interrupted (hint: {hint})\n"


def main(argv: list[str] | None = None) -> NoReturn:
    install_handlers()
    try:
        from mfprune.cli import run

        code = run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except Interrupted as exc:
        stop_interrupts()
        sys.stderr.write(interrupted_line())
        code = exc.exit_code
    except BrokenPipeError:  # `mfprune ... | head`: the reader left; not an error of ours
        code = 0
    stop_interrupts()  # the work is done: exit without a traceback
    sys.exit(code)
