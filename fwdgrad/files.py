"""Writing files so that nothing is ever half written, and holding a run's output folder.

Every output (metrics, logs, checkpoints, models, bundles, plots, reports) is written to a temporary file
in the same folder, flushed and fsynced, then renamed over the destination: a reader (or a crash) sees the
old file or the new one, never a 0-byte or half file. The replacement keeps the permission bits of the file
it replaces; a new file gets the usual 0666 & ~umask (0644 under the common umask 022). Temporary files are
named `.<name>.<pid>.fwdgrad-tmp`; `remove_stale_temps` deletes those whose writer is gone (a kill -9).

Standard library only: the numpy edge runtime uses it too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".fwdgrad-tmp"
_TEMP = re.compile(r"^\..+\.(\d+)\.fwdgrad-tmp$")
LOCK_NAME = ".fwdgrad.lock"


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_path(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is renamed into place (same folder, so the rename is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}{TEMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path` through (for writers that take a file name: savefig,
    np.savez, torch.save); on success it is fsynced and renamed over `path`, on error removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = _new_file_mode()
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw) -> Iterator[IO]:
    """`open(path, mode)` that replaces `path` atomically when the block ends without error."""
    with atomic_path(path) as tmp, open(tmp, mode, **kw) as f:
        yield f
        f.flush()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, **kw) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **({"indent": 2, "default": str} | kw))


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """`writer(temporary path)` writes the file; it then replaces `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the temporary files of interrupted writers (their process is gone) in `folder`; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.rglob(f"*{TEMP_SUFFIX}") if recursive else folder.glob(f"*{TEMP_SUFFIX}"):
        m = _TEMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class FolderInUse(ValueError):
    """Another process holds the folder's lock (a bad-input error: one line, exit 2)."""


class FolderLock:
    """An exclusive, non-blocking lock on a run's output folder (`<folder>/.fwdgrad.lock`, flock): a second
    run into the same folder stops with a one-line error instead of mixing its files with the first's. The
    lock is released when the process ends, however it ends. Taking it also removes stale temporary files."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUse(
                    f"out_dir {str(self.folder)!r} is in use by another run ({holder}); allowed: a folder no "
                    "running job writes to (wait for it, or set out_dir)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        remove_stale_temps(self.folder)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def save_figure(fig, path: str | os.PathLike, **kw) -> None:
    """A matplotlib figure saved atomically (the format from the file name's extension)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, **kw))
