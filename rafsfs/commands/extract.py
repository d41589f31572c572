"""``rafsfs extract``: unpack the whole tree into a directory."""
from __future__ import annotations

import argparse
import logging

from ..image import RafsImage
from ..tools import Progress, format_bytes
from ._common import Parents, add_command, open_source, println

log = logging.getLogger("rafsfs")


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "extract", run, "unpack the whole tree into a directory",
                    "Recreate the image's tree under DEST: data (sparse where the image has holes or zero blocks), "
                    "directories, symlinks, device nodes, fifos, sockets, hard links, xattrs, owners (when run as "
                    "root), modes and mtimes.  Nothing is ever written outside DEST.", parents.data)
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")
    p.add_argument("dest", metavar="DEST",
                   help="destination directory: must not exist, or be empty, owned by you and not writable by "
                        "group or others")


def run(args: argparse.Namespace) -> int:
    from ..tools.extract import extract

    with RafsImage.open(args.bootstrap) as image, open_source(args, image) as source:
        with Progress("extract") as progress:
            s = extract(image, source, args.dest, progress=progress)
    println(f"extracted {s.files} files ({s.bytes} bytes, {format_bytes(s.bytes)}), {s.dirs} directories, "
            f"{s.symlinks} symlinks, {s.special} special files, {s.hardlinks} hard links to {args.dest}")
    if s.skipped or s.xattr_failures:
        log.warning("%d device nodes skipped, %d xattrs not set", s.skipped, s.xattr_failures)
    return 0
