"""A run folder's lock: ``models/<run>/.train.lock`` (``flock``), held by the process training the run."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from dpcam.errors import UserError

LOCK_FILE = ".train.lock"  # in the run's folder while a process trains it


@contextlib.contextmanager
def run_lock(folder: Path, name: str) -> Iterator[None]:
    """Make ``folder`` and hold an exclusive lock on ``folder/.train.lock`` for the block.

    One line (UserError) when the folder cannot be made or written (before any training), or when
    another process holds the lock (naming its pid and host). The lock file is removed on the way
    out; a killed process's stale file is harmless (the kernel dropped its lock). Folders this
    call made are removed again when they are left empty. No-op where ``fcntl`` is missing.
    """
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(made)
        raise UserError(_unwritable(made[-1].parent if made else folder, folder, e)) from None
    try:
        fd = _lock(folder / LOCK_FILE, name)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield
    finally:
        if fd is not None:
            (folder / LOCK_FILE).unlink(missing_ok=True)  # still holding it: a waiter re-checks the path
            os.close(fd)
        _remove_empty(made)


def _unwritable(blocked: Path, folder: Path, e: OSError) -> str:
    return (
        f"{blocked} is not writable ({e.strerror or type(e).__name__}); the run's checkpoint, model and "
        f"train.json go to {folder}: fix its permissions (or run dpcam from a folder you can write)"
    )


def _lock(path: Path, name: str) -> int | None:
    """The locked file descriptor of ``path`` (our pid and host written in it); None without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a run that just ended empty-handed
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:
            raise UserError(_unwritable(path.parent, path.parent, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "a process"
            stop = f"stop it (kill {holder[0]})" if holder else "stop it"
            raise UserError(
                f"run {name!r} is being trained right now by {who} ({path} is locked); wait for it to finish, "
                f"or {stop} and continue it with --resume"
            ) from None
        except OSError as e:  # a file system without flock: train unlocked rather than not at all
            warnings.warn(
                f"{path}: cannot lock ({e.strerror}); two processes training {name} would clash", stacklevel=4
            )
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # not a file its last holder removed between our open and our lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)
    raise UserError(f"{path}: could not take the run's lock (it keeps changing hands); try again")


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _empty_folder(folder: Path) -> None:
    """Remove everything in ``folder`` but its lock file (a grid run's folder is rebuilt from scratch)."""
    for entry in folder.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
