"""``rafsfs inspect``: describe a bootstrap."""
from __future__ import annotations

import argparse
import json

from ..image import RafsImage
from ._common import Parents, add_command, println


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "inspect", run, "describe a bootstrap",
                    "Show the superblock, flavour (Nydus RAFS v6 or plain EROFS), block and chunk size, flags and "
                    "features by name, blobs, device slots, the prefetch table and counts from a walk of the tree.")
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from ..tools.inspect import format_inspect, inspect_image

    with RafsImage.open(args.bootstrap) as image:
        info = inspect_image(image)
    println(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0
