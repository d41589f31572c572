"""Opening /dev/cachefiles and bringing an on-demand cache online; probing the kernel for support."""
from __future__ import annotations

import errno
import gzip
import os
import stat

from . import protocol
from .errors import FscacheError, Unsupported, device_error


def open_device() -> int:
    try:
        st = os.stat(protocol.DEVICE)
    except FileNotFoundError:
        raise Unsupported("no /dev/cachefiles: the kernel has no cachefiles support") from None
    if not stat.S_ISCHR(st.st_mode):
        raise Unsupported(f"{protocol.DEVICE} is not a character device")
    try:
        return os.open(protocol.DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise device_error(e, f"cannot open {protocol.DEVICE}") from None


def bind(devfd: int, cache_dir: str, tag: str | None) -> None:
    """``dir``, ``tag`` (unless None), ``bind ondemand``: the cache is online in on-demand mode afterwards."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise FscacheError(f"cannot create cache directory {cache_dir}: {e.strerror}") from None
    for cmd in (f"dir {cache_dir}", *([f"tag {tag}"] if tag else []), "bind ondemand"):
        try:
            protocol.command(devfd, cmd)
        except OSError as e:
            if cmd == "bind ondemand" and e.errno == errno.EINVAL:
                raise Unsupported("the kernel has no on-demand cachefiles (CONFIG_CACHEFILES_ONDEMAND)") from None
            raise device_error(e, f"cachefiles '{cmd}' failed (cache directory {cache_dir})") from None


def _kernel_config() -> dict[str, str] | None:
    paths = ["/proc/config.gz", f"/boot/config-{os.uname().release}"]
    for p in paths:
        try:
            opener = gzip.open if p.endswith(".gz") else open
            with opener(p, "rt") as f:
                out = {}
                for line in f:
                    if line.startswith("CONFIG_") and "=" in line:
                        k, v = line.strip().split("=", 1)
                        out[k] = v
                return out
        except OSError:
            continue
    return None


# filesystems cachefiles can keep its cache files on (it needs xattrs and SEEK_DATA/SEEK_HOLE on regular files);
# on others (tmpfs, overlayfs, 9p, NFS...) `bind` fails with EOPNOTSUPP only after a daemon has started
CACHE_FILESYSTEMS = ("ext4", "ext3", "xfs", "btrfs", "f2fs")


def filesystem_of(path: str) -> str | None:
    """The type of the filesystem ``path`` (or its nearest existing ancestor) lives on, from mountinfo."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and path != "/":
        path = os.path.dirname(path)
    path = os.path.realpath(path)
    best, fstype = -1, None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].encode().decode("unicode_escape")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
                    best, fstype = len(mnt), right.split()[0]
    except (OSError, IndexError):
        return None
    return fstype


def cache_dir_problem(cache_dir: str) -> str | None:
    """Why ``cache_dir`` cannot hold cachefiles' cache, or None when its filesystem is one cachefiles supports."""
    fstype = filesystem_of(cache_dir)
    if fstype is None or fstype in CACHE_FILESYSTEMS:
        return None
    return (f"the fscache cache directory {cache_dir} is on {fstype}, which cachefiles cannot use "
            f"(set RAFSFS_FSCACHE_DIR to a directory on {'/'.join(CACHE_FILESYSTEMS[:3])})")


def probe() -> tuple[bool, str]:
    """(supported, why): can this kernel run EROFS over on-demand cachefiles?  Read from the kernel config when it
    is available, otherwise from /dev/cachefiles and /proc/filesystems (the bind itself is the final word)."""
    if not os.path.exists(protocol.DEVICE):
        return False, "the kernel has no /dev/cachefiles (cachefiles not built in or loaded)"
    cfg = _kernel_config()
    if cfg is not None:
        for opt in ("CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EROFS_FS_ONDEMAND"):
            if cfg.get(opt) != "y":
                return False, f"the kernel was built without {opt}"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["erofs"] for line in f):
                return False, "the kernel has no EROFS"
    except OSError:
        pass
    if cfg is None:
        return True, "the kernel has /dev/cachefiles and EROFS (its config is not readable to confirm on-demand)"
    return True, "the kernel has on-demand cachefiles and EROFS fscache support"
