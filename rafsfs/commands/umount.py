"""``rafsfs umount``: unmount a rafsfs mount (its daemon then exits)."""
from __future__ import annotations

import argparse
import os

from ._common import Parents, add_command


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "umount", run, "unmount a rafsfs mount",
                    "Unmount MOUNTPOINT; the daemon serving it then exits.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="a mount made by 'rafsfs mount'")
    p.add_argument("--lazy", action="store_true", help="detach now even if busy (MNT_DETACH)")


def run(args: argparse.Namespace) -> int:
    from ..sysmount import umount

    umount(os.path.realpath(args.mountpoint), lazy=args.lazy)
    return 0
