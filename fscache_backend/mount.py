"""mount(2) / umount(2) of EROFS in fscache mode, and finding those mounts in /proc/self/mountinfo."""
from __future__ import annotations

import os

from rafsfs import sysmount

from .state import MountRecord

SOURCE = "rafsfs"  # mount(2) ignores the source in fscache mode; it shows up in mountinfo


def mount(rec: MountRecord) -> None:
    """Blocks until the kernel has read the superblock through the daemon: call it from a worker thread."""
    sysmount.mount(SOURCE, rec.mountpoint, "erofs", rec.options)


def umount(mountpoint: str, lazy: bool = False) -> None:
    sysmount.umount(mountpoint, lazy=lazy)


def mounted_fsids() -> dict[str, str]:
    """fsid -> mountpoint of every EROFS fscache mount in this mount namespace."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if len(fields) < 3 or fields[0] != "erofs":
                continue
            for opt in fields[2].split(","):
                if opt.startswith("fsid="):
                    out[opt[5:]] = _unescape(left.split()[4])
    return out


def is_mountpoint(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
