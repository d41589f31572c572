"""``rafsfs cat``: a file's bytes to stdout."""
from __future__ import annotations

import argparse
import sys

from ..image import RafsImage
from ..tools import cat
from ._common import Parents, add_command, open_source


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "cat", run, "write a file's contents to stdout",
                    "Write the bytes of regular file PATH to standard output.  Every chunk read is verified "
                    "against its recorded digest.", parents.data)
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")
    p.add_argument("path", metavar="PATH", help="path of a regular file inside the image")


def run(args: argparse.Namespace) -> int:
    with RafsImage.open(args.bootstrap) as image, open_source(args, image) as source:
        cat(image, args.path, source, sys.stdout.buffer)
    return 0
