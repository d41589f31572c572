"""``rafsfs check``: verify metadata and every chunk of every file."""
from __future__ import annotations

import argparse

from ..image import RafsImage
from ..tools import Progress
from ._common import Parents, add_command, error, open_source, println

EXIT_BAD = 1


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "check", run, "verify metadata and every chunk of every file",
                    "Walk every inode (directories, symlinks, xattrs) and read every distinct chunk once, checking "
                    "its digest.  Prints each bad path with the reason, then a summary; exits 1 if anything is bad. "
                    "Chunks of images that record no digests (plain EROFS) are counted as unverified.", parents.data)
    p.add_argument("bootstrap", metavar="BOOTSTRAP", help="bootstrap or EROFS image file")


def run(args: argparse.Namespace) -> int:
    from ..tools.check import check_image

    def on_bad(path: str, reason: str) -> None:
        error(f"bad: {path}: {reason}")

    with RafsImage.open(args.bootstrap) as image, open_source(args, image) as source:
        with Progress("check") as progress:
            r = check_image(image, source, on_bad=on_bad, progress=progress)
    if r.metadata_error:
        error(f"bad: metadata: {r.metadata_error} (the walk stopped here)")
    unverified = ""
    if r.chunks_unverified or r.unverified_bytes:
        unverified = (f", {r.chunks_unverified} chunks and {r.unverified_bytes} bytes unverified "
                      "(the image records no digest for them)")
    println(f"checked {r.inodes} inodes, {r.files} files, {r.bytes} bytes: {r.chunks_verified} chunks verified"
            f"{unverified}; {len(r.bad) + bool(r.metadata_error)} bad")
    return 0 if r.ok else EXIT_BAD
