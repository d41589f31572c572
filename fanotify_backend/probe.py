"""Can fanotify mode work here?  :func:`unavailable_reason` answers with the reason it cannot, in one line, or None.

Checks, in order: root; kernel version (pre-content events: 6.14); a pre-content group (``fanotify_init`` EINVAL:
no ``CONFIG_FANOTIFY_ACCESS_PERMISSIONS``); the cache directory's filesystem (tmpfs and overlayfs refuse
pre-content marks); a real mark on a scratch file in the cache directory (the final word: EOPNOTSUPP from the
filesystem, EINVAL from a kernel without ``FAN_PRE_ACCESS``); file-backed EROFS (``CONFIG_EROFS_FS_BACKED_BY_FILE``,
Linux 6.12).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gzip
import os
import platform
import re
import subprocess
import tempfile

from . import fanotify as fa

MIN_KERNEL = (6, 14)  # FAN_PRE_ACCESS with the mode decided at open
FILE_BACKED_EROFS = (6, 12)

_FS_NAMES = {0x01021994: "tmpfs", 0x794C7630: "overlayfs", 0x858458F6: "ramfs", 0xE0F5E1E2: "erofs",
             0x65735546: "fuse", 0x6969: "nfs"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


def fs_type(path: str) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return buf.f_type & 0xFFFFFFFF


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _kernel_config(option: str) -> str | None:
    """``y``/``m``/``n`` from /proc/config.gz or /boot/config-*, None if no config is readable."""
    for path in ("/proc/config.gz", f"/boot/config-{platform.release()}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(rf"^{option}=(\w+)", text, re.M)
        return m.group(1) if m else "n"
    return None


def _has_erofs() -> bool:
    def listed() -> bool:
        try:
            with open("/proc/filesystems") as f:
                return any(line.split()[-1] == "erofs" for line in f if line.strip())
        except OSError:
            return False

    if listed():
        return True
    subprocess.run(["modprobe", "erofs"], capture_output=True)
    return listed()


def file_backed_erofs_reason() -> str | None:
    if kernel_version() < FILE_BACKED_EROFS:
        return f"kernel {platform.release()} has no file-backed EROFS mounts (Linux >= 6.12)"
    if not _has_erofs():
        return "the kernel has no EROFS (CONFIG_EROFS_FS)"
    if _kernel_config("CONFIG_EROFS_FS_BACKED_BY_FILE") == "n":
        return "the kernel was built without file-backed EROFS (CONFIG_EROFS_FS_BACKED_BY_FILE)"
    return None


def mark_reason(cache_dir: str) -> str | None:
    """Why a pre-content mark cannot be placed on a file in ``cache_dir`` (None: it can)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        t = fs_type(cache_dir)
    except OSError as e:
        return f"cache directory {cache_dir}: {e.strerror}"
    if t in (0x01021994, 0x794C7630, 0x858458F6):
        return (f"cache directory {cache_dir} is on {_FS_NAMES[t]}, which refuses pre-content marks "
                "(use a directory on ext4, xfs or btrfs)")
    try:
        group = fa.init()
    except OSError as e:
        if e.errno == errno.EINVAL:
            return "the kernel has no pre-content fanotify groups (CONFIG_FANOTIFY_ACCESS_PERMISSIONS, Linux >= 6.14)"
        if e.errno == errno.ENOSYS:
            return "the kernel has no fanotify (CONFIG_FANOTIFY)"
        if e.errno == errno.EPERM:
            return "fanotify pre-content groups need CAP_SYS_ADMIN"
        return f"fanotify_init: {e.strerror}"
    try:
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".fanotify-probe-") as scratch:
            try:
                fa.add_mark(group, scratch.name)
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:
                    name = _FS_NAMES.get(fs_type(cache_dir), f"filesystem type 0x{fs_type(cache_dir):x}")
                    return f"cache directory {cache_dir} is on {name}, which refuses pre-content marks"
                if e.errno == errno.EINVAL:
                    return "the kernel has no FAN_PRE_ACCESS events (Linux >= 6.14)"
                return f"cannot mark a file in {cache_dir}: {e.strerror}"
    except OSError as e:
        return f"cannot create a file in cache directory {cache_dir}: {e.strerror}"
    finally:
        os.close(group)
    return None


def unavailable_reason(cache_dir: str) -> str | None:
    """Why fanotify mode cannot run with its chunk cache in ``cache_dir``, in one line; None when it can."""
    if os.geteuid() != 0:
        return "fanotify mode needs root (CAP_SYS_ADMIN for pre-content groups and mount(2))"
    if kernel_version() < MIN_KERNEL:
        return f"kernel {platform.release()} is too old: fanotify pre-content events need Linux >= 6.14"
    if _kernel_config("CONFIG_FANOTIFY_ACCESS_PERMISSIONS") == "n":
        return "the kernel was built without CONFIG_FANOTIFY_ACCESS_PERMISSIONS"
    return mark_reason(cache_dir) or file_backed_erofs_reason()
