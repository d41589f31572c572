"""Replace a file as a whole, durably: write a private temporary file next to it, fsync it, rename it over the
target, fsync the directory.

Readers see the old file or the new one, never a part, also after a power loss (without the fsync before the rename,
ext4 and XFS can keep the rename but not the data: a zero-length bootstrap that every later mount trusts); two
writers of the same path (two daemons, two ``rafsfs`` commands) each write their own temporary file instead of
interleaving in one with a fixed name.  The new file gets the mode ``0666 & ~umask``, as ``open()`` would give it.
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it (``/proc``), or set-and-restored under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:  # only threads that use this module are kept out of the window
        old = os.umask(0o022)
        os.umask(old)
    return old


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, path: str, mode: int = 0o666, durable: bool = True) -> None:
    """Give the written temporary file ``tmp`` its final mode, rename it to ``path``, and make the rename durable.
    The caller has fsync'ed ``tmp``'s data."""
    os.chmod(tmp, mode & ~umask())  # mkstemp makes it 0600
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextmanager
def replacing(path: str, mode: str = "wb", *, file_mode: int = 0o666, durable: bool = True) -> Iterator[IO]:
    """``with replacing(path) as f: f.write(...)``: ``path`` is replaced when the block ends without an error;
    on an error the temporary file is removed and ``path`` is left as it was.  ``durable=False`` skips the two
    fsyncs, for files nobody needs after a power loss (statistics rewritten every half second)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        publish(tmp, path, file_mode, durable)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: str, text: str, durable: bool = True) -> None:
    with replacing(path, "w", durable=durable) as f:
        f.write(text)
