"""Domain errors. Each carries a hint; the CLI prints both on one line and exits non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MfpruneError(Exception):
    """Base of every error mfprune reports to a user (never a traceback)."""

    exit_code = 2
    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ModelError(MfpruneError):
    """The model folder is missing, unsafe, inconsistent or not supported."""


class CheckpointError(ModelError):
    """A safetensors file or index is malformed."""

    default_hint = "re-export the checkpoint with `save_pretrained(..., safe_serialization=True)`"


class ArchError(MfpruneError):
    """An architecture adapter is unknown or malformed."""


class PlanError(MfpruneError):
    """A plan is malformed or infeasible for this model."""

    default_hint = "see docs/plan-format.md"

    def __init__(self, problems: str | Iterable[str], *, hint: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the plan: " + "; ".join(self.problems)
        super().__init__(message, hint=hint)


class OutputError(MfpruneError):
    """The output location is unusable (inside the source, not empty, not writable)."""


class DataError(MfpruneError):
    """Task data for profiling is missing, empty or unreadable."""

    default_hint = "see `mfprune profile --help` for the data formats"


class StatsError(MfpruneError):
    """A stats file is missing, corrupted, inconsistent or from another model."""

    default_hint = "re-create it with `mfprune profile` (docs/stats-format.md)"


def did_you_mean(name: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str:
    """' — did you mean 'x'?' for the closest choice, or '' when nothing is close.

    ``cutoff`` is difflib's similarity ratio a choice must reach (0..1); model families share
    suffixes such as ``_moe``, so their lookups ask for a higher one."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f" — did you mean '{close[0]}'?" if close else ""


class ConfigError(MfpruneError):
    """A config file (``mfprune shrink --config``) is unreadable or invalid; lists every problem."""

    default_hint = "see docs/ci.md for the shrink.toml keys"

    def __init__(self, problems: str | Iterable[str], *, source: str = "", hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = where + self.problems[0]
        else:
            message = f"{where}{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message, hint=hint)


class GateFailed(MfpruneError):
    """The quality gate (``--max-drop``) failed: quality fell past the allowed drop."""

    exit_code = 4
    default_hint = "the table above says which metric failed; keep more experts or raise --max-drop"
