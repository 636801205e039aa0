"""The one output-path guard: every command that writes goes through here, for folders and
single files alike.

Before any work, ``claim_folder`` / ``claim_file`` vet the path and take an exclusive lock on it:

* an empty path is refused (an unset CI variable must never mean "the working folder");
* the output may not be, contain, or lie inside any input (the source model, the data, the
  config file, the stats, the plan) nor be or contain the working folder; paths are compared
  with symlinks resolved;
* a symlink or a non-regular file (device, FIFO, socket) at the output path is refused: mfprune
  neither replaces nor writes through links and special files (name the real path instead);
* an existing non-empty folder is replaced only with ``overwrite``, and only when mfprune wrote
  it (it holds mfprune's provenance, shrink summary, or is a lone plan.json); what was replaced
  is reported;
* the lock (``.NAME.mfprune-lock`` beside the output, flock) makes a second run on the same
  output fail at once, and the final rename refuses to replace a path that appeared meanwhile.

Then ``staged_folder`` / ``write_file`` build the output beside its final path (a hidden temp
folder or file), fsync it and rename it into place only when complete: a failure, Ctrl-C or
kill never leaves a half-written output that looks valid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mfprune.errors import OutputError
from mfprune.io.writer import fsync_path

_TMP = ".mfprune-tmp-"
_OLD = ".mfprune-old-"
_LOCK = ".mfprune-lock"
# files by which a folder shows mfprune wrote it (a JSON object whose "format" is mfprune's)
OWNER_FILES = ("mfprune_provenance.json", "shrink.json")
LONE_OWNER_FILES = ("plan.json",)  # counts only when it is the folder's only file


@dataclass(frozen=True)
class Input:
    """A path a command reads, which no output may touch: ``what`` names it in messages."""

    path: Path
    what: str

    @staticmethod
    def of(path: str | Path | None, what: str) -> list[Input]:
        return [] if path is None or str(path) == "" else [Input(Path(path), what)]


_HELD: list[OutputTarget] = []  # every target of this process that still holds its lock


def release_all() -> None:
    """Release every lock this process still holds (the CLI calls it when a command ends)."""
    for target in list(_HELD):
        target.release()


@dataclass(eq=False)
class OutputTarget:
    """A vetted, locked output path. ``replaced`` says what an overwrite will remove."""

    path: Path
    kind: str  # "folder" or "file"
    replaced: str | None = None
    _lock_fd: int | None = field(default=None, repr=False)
    _lock_path: Path | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def held(self) -> Iterator[OutputTarget]:
        """Release the lock when the block ends, however it ends."""
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        """Drop the lock (also at process exit); idempotent."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            if self._lock_path is not None:
                os.unlink(self._lock_path)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        self._lock_fd = None
        with contextlib.suppress(ValueError):
            _HELD.remove(self)


def not_empty(path: str | Path | None, *, flag: str = "--out") -> Path:
    """``path`` as a Path; refuse an empty or blank one (``Path("")`` would mean ".")."""
    if path is None or not str(path).strip():
        raise OutputError(
            f"{flag} is empty",
            hint=f"give {flag} a path (an unset variable in a CI script expands to nothing)",
        )
    return Path(path).expanduser()


def claim_folder(
    out: str | Path | None,
    *,
    inputs: Iterable[Input] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> OutputTarget:
    """Vet and lock an output folder before any work; raise OutputError."""
    path = _vet(not_empty(out, flag=flag), inputs=inputs, flag=flag, folder=True)
    replaced = None
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputError(
                f"output folder {path} exists and is not empty",
                hint="pass --overwrite to replace it (atomically), or choose a new folder",
            )
        replaced = _owned_description(path)
        if replaced is None:
            raise OutputError(
                f"output folder {path} was not written by mfprune (no "
                f"{' or '.join(OWNER_FILES)}): --overwrite only replaces mfprune's own outputs",
                hint="remove it yourself if you mean it, or choose a new folder",
            )
    return _locked(OutputTarget(path=path, kind="folder", replaced=replaced), flag=flag)


def claim_file(
    out: str | Path | None,
    *,
    inputs: Iterable[Input] = (),
    flag: str = "--out",
    example: str = "out.json",
    replaceable: Callable[[Path], bool] | None = None,
    kind_name: str = "file",
) -> OutputTarget:
    """Vet and lock an output file before any work; raise OutputError.

    An existing regular file is replaced (atomically) unless ``replaceable`` says it is not
    one of the files this output writes (e.g. a safetensors file that is not a stats file).
    """
    path = _vet(not_empty(out, flag=flag), inputs=inputs, flag=flag, folder=False)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder", hint=f"name a file, e.g. {example}")
    replaced = None
    if path.exists():
        if replaceable is not None and not replaceable(path):
            raise OutputError(
                f"{flag} {path} exists and is not {kind_name}: mfprune will not replace it",
                hint="remove it yourself if you mean it, or choose a new file name",
            )
        replaced = f"the previous {path.name}"
    return _locked(OutputTarget(path=path, kind="file", replaced=replaced), flag=flag)


def _vet(path: Path, *, inputs: Iterable[Input], flag: str, folder: bool) -> Path:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        blocker = _existing_parent(path.absolute())
        raise OutputError(
            f"cannot create {path}: {blocker} is a file", hint="choose another path"
        ) from None
    except OSError as exc:
        raise OutputError(
            f"cannot use {flag} {path}: {exc.strerror}", hint="choose a writable output location"
        ) from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(
            f"{flag} {path} is a symlink; mfprune neither replaces links nor writes through them",
            hint=f"give the real path ({path.resolve()}) or a new one",
        )
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise OutputError(
            f"{flag} {path} is a {_special(st.st_mode)}, not a regular "
            f"{'folder' if folder else 'file'}; mfprune does not write to special files",
            hint="write to a regular file and copy it where it must go",
        )
    # resolve symlinks of the parents too; the output itself is not a link (checked above)
    path = path.absolute()
    real = path.resolve() if path.name in ("", ".", "..") else path.parent.resolve() / path.name
    for item in [*inputs, Input(Path.cwd(), "the working folder")]:
        src = item.path.expanduser().resolve()
        if real == src:
            raise OutputError(
                f"{flag} {path} is {item.what}", hint=f"choose an output that is not {item.what}"
            )
        if src.is_relative_to(real):
            raise OutputError(
                f"{flag} {path} contains {item.what} ({src})",
                hint=f"choose an output outside {item.what}",
            )
        if src.is_dir() and real.is_relative_to(src) and item.what != "the working folder":
            raise OutputError(
                f"{flag} {path} lies inside {item.what} ({src})",
                hint=f"write outside {item.what}: mfprune never writes into its inputs",
            )
    if folder and st is not None and stat.S_ISREG(st.st_mode):
        raise OutputError(f"output {path} exists and is a file", hint="choose a folder path")
    parent = _existing_parent(real.parent)
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: {parent} is a file", hint="choose another path")
    _probe(parent, path)
    return real


def _probe(parent: Path, path: Path) -> None:
    """Create and remove a hidden folder in ``parent``: the only write test that holds as root
    (access() says yes to root even on /proc) and on read-only mounts."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mfprune-probe-", dir=parent))
    except OSError as exc:
        raise OutputError(
            f"cannot write {path}: {parent} is not writable ({exc.strerror or exc})",
            hint="choose a writable output location",
        ) from None


def _special(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return "socket" if stat.S_ISSOCK(mode) else "special file"


def _existing_parent(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p


def _owned_description(folder: Path) -> str | None:
    """What the folder is if mfprune wrote it ("an mfprune output: 7 files, 9.2 MB"), else None."""
    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    names = {p.name for p in files}
    markers = [n for n in OWNER_FILES if n in names]
    if not markers and len(files) == 1 and files[0].name in LONE_OWNER_FILES:
        markers = [files[0].name]
    if not any(_is_mfprune_json(folder / n) for n in markers):
        return None
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    count = sum(1 for p in folder.rglob("*") if p.is_file())
    return f"{folder} (an mfprune output with {markers[0]}: {count} files, {size / 1e6:.2f} MB)"


def _is_mfprune_json(path: Path) -> bool:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("mfprune.")


def _locked(target: OutputTarget, *, flag: str) -> OutputTarget:
    """Take ``.NAME.mfprune-lock`` beside the output, or fail at once if another run holds it."""
    path = target.path
    if not path.parent.exists():  # locked when the parent is made, just before writing
        return target
    lock = path.parent / f".{path.name}{_LOCK}"
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(
                f"cannot create {lock}: {exc.strerror}", hint="choose a writable output location"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"another mfprune run is writing {flag} {path}",
                hint="wait for it to finish, or choose another output",
            ) from None
        try:  # the file we locked may have been unlinked by a run that just finished
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                target._lock_fd, target._lock_path = fd, lock
                _HELD.append(target)
                return target
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OutputError(f"cannot lock {lock}", hint="retry")


# ------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def staged_folder(target: OutputTarget) -> Iterator[Path]:
    """Yield a temp folder beside the output; on success it takes the output's place
    atomically (replacing the previous mfprune output only if the claim allowed it)."""
    out = target.path
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if target._lock_fd is None:  # the parent did not exist when claimed
            _locked(target, flag="output")
        _remove_stale(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:  # e.g. /proc or /sys, where even root's access() checks pass
        target.release()
        raise OutputError(
            f"cannot create the output folder {out}: {exc.strerror or exc}",
            hint="choose a writable output location",
        ) from None
    try:
        yield tmp
        for f in tmp.iterdir():  # data before names: every file is on disk before the rename
            fsync_path(f)
        fsync_path(tmp)
        old = None
        if out.is_dir() and not out.is_symlink():
            if any(out.iterdir()):
                if target.replaced is None:
                    raise OutputError(
                        f"output folder {out} appeared while mfprune was writing it",
                        hint="another program wrote there; choose another output",
                    )
                old = out.parent / f".{out.name}{_OLD}{os.getpid()}"
                os.rename(out, old)
            else:
                out.rmdir()
        _rename_noreplace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        target.release()


def write_file(target: OutputTarget, data: bytes | str) -> Path:
    """Write ``data`` to a temp file beside the output, fsync, and rename it into place."""
    out = target.path
    blob = data.encode("utf-8") if isinstance(data, str) else data
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if target._lock_fd is None:
            _locked(target, flag="output")
        _remove_stale(out)
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if target.replaced is not None:
            if out.is_symlink() or (out.exists() and not out.is_file()):
                raise OutputError(
                    f"{out} was replaced by a link or special file while mfprune was writing",
                    hint="choose another output",
                )
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if the path appeared meanwhile
            except FileExistsError:
                raise OutputError(
                    f"{out} appeared while mfprune was writing it",
                    hint="another program wrote there; choose another output",
                ) from None
            os.unlink(tmp)
        fsync_path(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        target.release()
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails if ``dst`` exists (renameat2 RENAME_NOREPLACE where the kernel and
    filesystem have it; else a plain rename, which cannot replace a non-empty folder)."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise OutputError(
                f"{dst} appeared while mfprune was writing it",
                hint="another program wrote there; choose another output",
            )
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise OutputError(
            f"{dst} appeared while mfprune was writing it",
            hint="another program wrote there; choose another output",
        )
    os.rename(src, dst)


def _remove_stale(out: Path) -> None:
    """Remove temp folders left by runs that were killed (their process no longer exists)."""
    for p in out.parent.glob(f".{out.name}.mfprune-*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
