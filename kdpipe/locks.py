"""Lock files that other users cannot turn against you.

Jobs on one machine serialise on flock(2) files, one per stage cache key. They live in a private
folder per user (`kdpipe-locks-<uid>` in the temp dir, mode 0700, or `$KDPIPE_LOCK_DIR`) and are
opened without truncating and without following a symlink, so a link planted where a lock file
will be (`/tmp/kdpipe-locks/<hash>.lock -> ~/thesis.tex`) is refused, never written through, and a
folder made by another user is refused with the fix instead of a PermissionError. Imports nothing
heavy: the command line checks the folder before a job starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


class LockError(OSError):
    """The lock folder or a lock file cannot be used safely; the message says why and what to do."""


def lock_dir(create: bool = True) -> Path:
    """`$KDPIPE_LOCK_DIR`, else `kdpipe-locks-<uid>` in the temp dir, created private (0700).
    The default folder must be a real folder of this user that nobody else can write to. With
    `create=False` (the command line's early check) a folder that does not exist yet is fine."""
    given = os.environ.get("KDPIPE_LOCK_DIR")
    path = Path(given) if given else Path(tempfile.gettempdir()) / f"kdpipe-locks-{os.getuid()}"
    fix = "remove it, or set KDPIPE_LOCK_DIR to a folder of yours"
    if not create and not os.path.lexists(path):
        return path
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise LockError(f"cannot create the lock folder {path} ({exc.strerror}); set KDPIPE_LOCK_DIR "
                        f"to a writable folder of yours") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise LockError(f"the lock folder {path} is a symlink or not a folder; {fix}")
    if not given and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise LockError(f"the lock folder {path} belongs to another user or others can write to it; {fix}")
    return path


def lock_path(name: str) -> Path:
    return lock_dir() / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.lock"


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold the exclusive lock `name` (any string: a store URI and a cache key) until the block ends."""
    path = lock_path(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LockError(f"cannot open the lock file {path} ({exc.strerror}): a symlink or another user's "
                        f"file is refused there; remove it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
