"""Errors of the fscache back end, and the one place where failures become errno values for the kernel."""
from __future__ import annotations

import errno

from rafsfs.errors import RafsError


class FscacheError(RafsError):
    """fscache mode cannot start or a mount cannot be made (one-line message for the user)."""


class Unsupported(FscacheError):
    """The kernel lacks on-demand cachefiles / EROFS fscache support."""


def open_errno(exc: BaseException) -> int:
    """The negative errno a refused OPEN is answered with (``copen <id>,-E``): the mount or the first read of that
    blob then fails with it."""
    if isinstance(exc, KeyError):
        return -errno.ENOENT  # a cookie we do not serve
    if isinstance(exc, OSError) and exc.errno:
        return -exc.errno
    if isinstance(exc, RafsError):
        return -exc.errno
    return -errno.EIO


def device_error(exc: OSError, what: str) -> FscacheError:
    """A failed open/command on /dev/cachefiles as a one-line reason, carrying the OS errno (``.errno``)."""
    e = exc.errno
    hints = {
        errno.ENOENT: "no /dev/cachefiles (the kernel has no cachefiles support)",
        errno.EPERM: "permission denied (needs root / CAP_SYS_ADMIN)",
        errno.EACCES: "permission denied (needs root / CAP_SYS_ADMIN)",
        errno.EBUSY: "/dev/cachefiles is in use by another cache daemon (cachefilesd or nydusd?)",
        errno.EINVAL: "the kernel has no on-demand cachefiles (CONFIG_CACHEFILES_ONDEMAND)",
        errno.EOPNOTSUPP: "the cache directory's filesystem cannot hold a cache (use ext4 or xfs, not tmpfs)",
        errno.EROFS: "the cache directory is on a read-only filesystem",
    }
    err = FscacheError(f"{what}: {hints.get(e, exc.strerror or str(exc))}")
    if e:
        err.errno = e
    return err
