"""The output folder: checked before any work, built in a hidden temp folder beside it, and
renamed into place only when complete. A failure, Ctrl-C or kill leaves no folder at the
output path that looks like a model; a stale temp folder from a killed run is removed next time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mfprune.errors import OutputError
from mfprune.io.writer import fsync_path

_TMP = ".mfprune-tmp-"
_OLD = ".mfprune-old-"


def check_output(out: Path, *, source: Path, overwrite: bool) -> Path:
    """Resolve and vet ``out``; raise OutputError before anything is written."""
    out = out.expanduser().resolve()
    source = source.resolve()
    if out == source or out.is_relative_to(source):
        raise OutputError(
            f"output {out} is the source folder or inside it",
            hint="write the pruned model to a new folder outside the source",
        )
    if source.is_relative_to(out):
        raise OutputError(
            f"output {out} contains the source folder", hint="choose an output outside the source"
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is a file", hint="choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"output folder {out} exists and is not empty",
            hint="pass --overwrite to replace it (atomically), or choose a new folder",
        )
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} is a file", hint="choose a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent}", hint="choose a writable output location")
    return out


def _existing_parent(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it replaces ``out`` atomically."""
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:  # e.g. /proc or /sys, where even root's access() checks pass
        raise OutputError(
            f"cannot create the output folder {out}: {exc.strerror or exc}",
            hint="choose a writable output location",
        ) from None
    try:
        yield tmp
        for f in tmp.iterdir():  # data before names: every file is on disk before the rename
            fsync_path(f)
        fsync_path(tmp)
        if out.exists():
            old = out.parent / f".{out.name}{_OLD}{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(out: Path) -> None:
    """Remove temp folders left by runs that were killed (their process no longer exists)."""
    for p in out.parent.glob(f".{out.name}.mfprune-*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
