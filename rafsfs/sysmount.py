"""mount(2) / umount2(2) without mount(8).

mount(8) puts a regular-file source on a loop device, after which the kernel's EROFS treats ``device=`` paths as
block devices too.  Calling mount(2) directly gives a file-backed EROFS mount (Linux >= 6.12) whose extra devices
are regular files: the way to mount a RAFS v6 bootstrap with its uncompressed blobs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

MS_RDONLY = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str, options: str = "", flags: int = MS_RDONLY) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, options.encode() or None):
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} {source} on {target} ({options}): {os.strerror(e)}")


def umount(target: str, lazy: bool = False) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0):
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")


def mount_erofs(image: str, target: str, devices: list[str] = ()) -> None:  # type: ignore[assignment]
    """File-backed read-only EROFS mount of ``image`` with ``devices`` bound to its device slots in order."""
    opts = ",".join(f"device={os.path.abspath(d)}" for d in devices)
    mount(os.path.abspath(image), target, "erofs", opts)
