"""Where results are written: output folders that are checked before any work, writes that never leave
a half-written file, names that never replace a file the user owns, a lock against two runs in one
folder, and room for the next write.

The rule every command follows: nothing a user wrote is overwritten or deleted. A command writes new
files, or replaces files it recognizes as its own (a marker it stored in them), never anything else.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from .errors import OutputError

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]  # every path argument of the package

# Written into every picture and page we make (PNG "Software" text chunk, HTML generator meta tag),
# so that a later run can tell its own files from the user's.
GENERATOR = "dynamicvit"


def describe_os_error(e: OSError) -> str:
    """`No space left on device` rather than `[Errno 28] No space left on device: '/x/.y.tmp'`."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e) or type(e).__name__


def prepare_output_dir(path: PathLike, flag: str = "--output") -> Path:
    """Create `path` (and its parents) and check that files can be written in it.

    Raises:
        OutputError: `path` is a file, lies under a read-only or virtual file system (/proc), or
            cannot be written; the message names the path and the flag to change.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; choose a folder for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path} cannot be written ({describe_os_error(e)}); choose a writable folder") from None
    return path


def check_output_dir(path: PathLike, flag: str = "--output") -> Path:
    """Like `prepare_output_dir`, but leaves nothing behind: for commands that check their inputs first.

    A folder that does not exist yet is created for the check and removed again.
    """
    path = Path(path).expanduser()
    created = [p for p in (path, *path.absolute().parents) if not p.exists()]
    try:
        return prepare_output_dir(path, flag)
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass


def check_output_file(path: PathLike, flag: str) -> Path:
    """Check, before any work, that the file `path` can be written later (its folder is checked as in
    `check_output_dir`; a folder in the place of the file is an error)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name")
    check_output_dir(path.parent, flag)
    return path


def check_free_space(folder: PathLike, needed: int, what: str, flag: str = "--output") -> None:
    """Raise `OutputError` unless `folder` has `needed` bytes free (`what` says what they are for)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"{flag} {folder} has {_mb(free)} free, but {what} need about {_mb(needed)}; free some space or "
            "choose another folder"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def temp_name_prefix(name: str) -> str:
    """Prefix of the temporary files `atomic_write` makes for a file called `name`."""
    return f".{name}."


def atomic_write(path: PathLike, write_fn) -> None:
    """Call `write_fn(tmp_path)`, then move the file into place: a crash never leaves a half-written `path`.

    Raises:
        OutputError: the folder or the file cannot be written (a file in the way, no permission, disk
            full); `path` is then as it was before the call.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {describe_os_error(e)}; choose a writable folder") from None
    try:
        write_fn(tmp)
        # mkstemp creates the file 0600; give it the mode a plain open() would (or the old file's).
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(_write_failed(path, describe_os_error(e))) from None
    except RuntimeError as e:  # torch.save's zip writer reports a full disk as "file write failed"
        if "write" not in str(e):
            raise
        raise OutputError(_write_failed(path, f"the writer failed ({str(e).splitlines()[-1].strip()}), is the disk full?")) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_failed(path: Path, why: str) -> str:
    kept = "the previous file is intact" if path.exists() else "nothing was written"
    return f"cannot write {path}: {why}; {kept}. Free some space or choose another folder"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temp_files(folder: PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files an interrupted `atomic_write` of `folder/<name>` left behind.

    Only call this while holding the folder's `RunLock`: then no other process is writing them.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f"{temp_name_prefix(name)}*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError as e:
                _logger.warning("cannot remove the stale temporary file %s: %s", tmp, describe_os_error(e))
    if removed:
        _logger.info("removed %d temporary file(s) an interrupted run left in %s", len(removed), folder)
    return removed


class RunLock:
    """An exclusive lock on an output folder for as long as a run writes to it.

    The lock is an advisory `flock` on `<folder>/.lock`; the system releases it when the process dies,
    so a killed run never leaves the folder locked. Where `flock` is unavailable (not POSIX) the lock
    is a no-op.
    """

    def __init__(self, folder: PathLike, flag: str = "--output"):
        self.path = Path(folder) / ".lock"
        self.flag = flag
        self._file = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise OutputError(
                f"{self.flag} {self.path.parent} is in use by a running job (pid {holder}); wait for it to end "
                "or choose another folder"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


class OutputNames:
    """File names in an output folder that never replace a file this command does not own.

    A name is free when no file has it, or when the file there is one of ours (`is_ours`, e.g. a
    picture from an earlier run) and not one of this run's inputs. Otherwise `_2`, `_3`, ... is
    appended to the stem until a free name is found.
    """

    def __init__(self, folder: PathLike, inputs: Iterable[PathLike] = (), is_ours: Optional[Callable[[Path], bool]] = None):
        self.folder = Path(folder)
        self.inputs = {_resolve(p) for p in inputs}
        self.is_ours = is_ours or (lambda p: False)
        self.used: set[str] = set()

    def claim(self, stem: str, suffixes: Iterable[str] = (".png",)) -> Path:
        """A free stem for every suffix at once: returns folder/<stem'> (without a suffix)."""
        suffixes = tuple(suffixes)
        candidate, n = stem, 1
        while candidate in self.used or not all(self._free(self.folder / f"{candidate}{s}") for s in suffixes):
            n += 1
            candidate = f"{stem}_{n}"
        if candidate != stem:
            _logger.debug("%s%s is taken; writing %s%s", stem, suffixes[0], candidate, suffixes[0])
        self.used.add(candidate)
        return self.folder / candidate

    def claim_file(self, stem: str, suffix: str = ".png") -> Path:
        """folder/<free stem><suffix>."""
        free = self.claim(stem, (suffix,))
        return free.parent / f"{free.name}{suffix}"

    def _free(self, path: Path) -> bool:
        if not os.path.lexists(path):
            return True
        return path.is_file() and not path.is_symlink() and _resolve(path) not in self.inputs and self.is_ours(path)


def _resolve(path: PathLike) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(os.path.abspath(path))
