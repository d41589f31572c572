"""``rafsfs convert``: an OCI image in a registry to a Nydus image."""
from __future__ import annotations

import argparse

from ..tools import Progress, format_bytes
from ._common import Parents, add_command, chunk_size, println, reference, registry_options


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "convert", run, "convert an OCI image in a registry to a Nydus RAFS v6 image",
                    "Read the OCI image SOURCE from its registry, build one RAFS v6 blob per layer and one bootstrap "
                    "merged over all layers (whiteouts and opaque directories applied), and push the Nydus image "
                    "(blob layers + bootstrap layer, as nydusify makes them) to TARGET.")
    p.add_argument("source", metavar="SOURCE", help="OCI image reference, e.g. 127.0.0.1:5000/app:1.0")
    p.add_argument("target", metavar="TARGET", help="where to push the Nydus image (a tag)")
    registry_options(p)
    p.add_argument("--compressor", choices=["zstd", "lz4", "none"], default="zstd",
                   help="chunk compression (default: %(default)s)")
    p.add_argument("--chunk-size", metavar="SIZE", type=chunk_size, default=1 << 20,
                   help="chunk size, a power of two from 4K to 16M (default: 1M)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="keep downloaded layers, blobs and the bootstrap here (default: a temporary directory, "
                        "removed afterwards); a rerun reuses downloaded layers")


def run(args: argparse.Namespace) -> int:
    from ..oci.convert import ConvertOptions, convert

    stages = {"download": Progress("download"), "build": Progress("build"), "push": Progress("push")}
    try:
        res = convert(ConvertOptions(
            source=reference(args, args.source), target=reference(args, args.target), platform=args.platform,
            compressor=args.compressor, chunk_size=args.chunk_size, work_dir=args.work_dir,
            progress=lambda stage, done, total: stages[stage].update(done, total=total or None)))
    finally:
        for pr in stages.values():
            pr.close()
    println(f"converted {args.source} ({res.layers} layers, {format_bytes(res.source_bytes)}) to {res.target}@"
            f"{res.manifest_digest}: {len(res.blob_ids)} blobs ({format_bytes(res.blob_bytes)}, "
            f"{res.pushed_blobs} uploaded), bootstrap layer {format_bytes(res.bootstrap_bytes)}")
    return 0
