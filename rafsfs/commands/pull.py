"""``rafsfs pull``: a Nydus image's bootstrap (and blobs) from a registry."""
from __future__ import annotations

import argparse

from ..tools import Progress, format_bytes
from ._common import Parents, add_command, println, reference, registry_options


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "pull", run, "fetch a Nydus image's bootstrap (and blobs) from a registry",
                    "Write DEST/image.boot and DEST/manifest.json from the Nydus image REF; with --blobs also every "
                    "data blob into DEST/blobs/ (then 'rafsfs extract DEST/image.boot X --blob-dir DEST/blobs' "
                    "works offline).  Every download is checked against its digest.")
    p.add_argument("ref", metavar="REF", help="Nydus image reference")
    p.add_argument("dest", metavar="DEST", help="destination directory (created)")
    registry_options(p)
    p.add_argument("--blobs", action="store_true", help="fetch the data blobs too")


def run(args: argparse.Namespace) -> int:
    from ..oci.pull import pull

    with Progress("pull") as progress:
        res = pull(reference(args, args.ref), args.dest, blobs=args.blobs, platform=args.platform,
                   progress=lambda done, total: progress.update(done, total=total))
    what = f", {len(res.blobs)} blobs in {res.blob_dir}" if res.blob_dir else f", {len(res.blobs)} blobs (not fetched)"
    println(f"pulled {res.reference}@{res.manifest_digest}: bootstrap {res.bootstrap}{what}; "
            f"{format_bytes(res.bytes_fetched)} fetched")
    return 0
