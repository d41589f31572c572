"""The FUSE mode's part of a mount session (:class:`rafsfs.daemon.Runner`): a preflight that needs no pyfuse3, and a
run that mounts the pyfuse3 operations over the session's image and source."""
from __future__ import annotations

import os

from rafsfs.daemon import MountError, ServedMount
from rafsfs.errors import require_module


def preflight(mountpoint: str) -> None:
    """Say in one line why a FUSE mount cannot start, before touching FUSE (or importing pyfuse3)."""
    if os.geteuid() != 0:
        raise MountError("FUSE mounts need root (or CAP_SYS_ADMIN)")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module or install fuse3")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is busy: something is already mounted there")
    require_module("pyfuse3")


class FuseRunner:
    name = "fuse"
    source_before_mount = False

    def __init__(self, debug: bool = False):
        self.debug = debug

    def preflight(self, mountpoint: str) -> None:
        preflight(mountpoint)

    def run(self, m: ServedMount) -> None:
        from .mount import run_fuse

        xattr = m.config.enable_xattr if m.config is not None else True
        run_fuse(m.image, m.source, m.mountpoint, fsname=m.fsname, ready=m.ready, debug=self.debug,
                 data_local=m.is_local, enable_xattr=xattr)
