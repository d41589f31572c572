"""``rafsfs ls``: names of a directory's entries, or ``ls -l``-style lines."""
from __future__ import annotations

import os
import stat
import time

from ..image import Inode, RafsImage


def list_path(image: RafsImage, path: str, long: bool = False) -> list[str]:
    """Entries of the directory at ``path`` (without ``.`` and ``..``, in on-disk order, i.e. sorted by name
    bytes), or the single non-directory at ``path``.  Names are decoded with os.fsdecode (surrogateescape)."""
    ino = image.resolve(path)
    if ino.is_dir():
        entries = [(e.name, image.inode(e.nid)) for e in image.readdir(ino) if e.name not in (b".", b"..")]
    else:
        entries = [(os.fsencode(path).rstrip(b"/").rpartition(b"/")[2] or b"/", ino)]
    if not long:
        return [os.fsdecode(name) for name, _ in entries]
    rows = [_long_fields(image, name, i) for name, i in entries]
    if not rows:
        return []
    # right-align the numeric columns like ls does
    widths = [max(len(r[c]) for r in rows) for c in range(1, 5)]
    return [" ".join([r[0]] + [r[c].rjust(widths[c - 1]) for c in range(1, 5)] + [r[5], r[6]]) for r in rows]


def _long_fields(image: RafsImage, name: bytes, ino: Inode) -> list[str]:
    if stat.S_ISCHR(ino.mode) or stat.S_ISBLK(ino.mode):
        size = f"{os.major(ino.rdev)}, {os.minor(ino.rdev)}"
    else:
        size = str(ino.size)
    shown = os.fsdecode(name)
    if ino.is_symlink():
        shown += " -> " + os.fsdecode(image.readlink(ino))
    return [stat.filemode(ino.mode), str(ino.nlink), str(ino.uid), str(ino.gid), size, _mtime(ino.mtime), shown]


def _mtime(t: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return str(t)
