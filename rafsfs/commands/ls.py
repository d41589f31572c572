"""``rafsfs ls``: list a directory of the image."""
from __future__ import annotations

import argparse

from ..image import RafsImage
from ._common import Parents, add_command, println


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "ls", run, "list a directory of the image",
                    "List the entries of directory PATH (without . and ..), or PATH itself when it is not a "
                    "directory.  Symbolic links inside the image are not followed.")
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="path inside the image (default: /)")
    p.add_argument("-l", dest="long", action="store_true",
                   help="long format: mode, links, uid, gid, size (or major, minor), mtime, name, -> target")


def run(args: argparse.Namespace) -> int:
    from ..tools import listing

    with RafsImage.open(args.bootstrap) as image:
        for line in listing.list_path(image, args.path, long=args.long):
            println(line)
    return 0
