"""``rafsfs build``: a RAFS v6 bootstrap and blob(s) from a directory or OCI layer tarballs."""
from __future__ import annotations

import argparse
import time

from ..errors import RafsError
from ..tools import Progress, format_bytes
from ._common import Parents, add_command, chunk_size, println


def register(sub, parents: Parents) -> None:
    p = add_command(sub, parents, "build", run,
                    "build a RAFS v6 image (bootstrap + one blob) from a directory or layer tar",
                    "Build a Nydus RAFS v6 bootstrap and one data blob from SOURCE.  The blob is written into "
                    "--blob-dir, named by its id.  Prints one summary line.")
    p.add_argument("source", metavar="SOURCE", nargs="+",
                   help="a directory, or an OCI layer tarball (.tar, .tar.gz/.tgz, .tar.zst); several tarballs "
                        "(bottom layer first) make one merged bootstrap with one blob per layer, whiteouts applied")
    p.add_argument("--bootstrap", metavar="FILE", required=True, help="bootstrap (metadata image) to write")
    p.add_argument("--blob-dir", metavar="DIR", required=True, help="directory the data blob is written to")
    p.add_argument("--compressor", choices=["zstd", "lz4", "none"], default="zstd",
                   help="chunk compression (default: %(default)s; lz4 means raw LZ4 blocks)")
    p.add_argument("--chunk-size", metavar="SIZE", type=chunk_size, default=1 << 20,
                   help="chunk size in bytes, or with a K/M suffix; a power of two from 4K to 16M (default: 1M)")
    p.add_argument("--digester", choices=["blake3", "sha256"], default="blake3",
                   help="chunk digest algorithm (default: %(default)s)")
    p.add_argument("--prefetch-list", metavar="FILE",
                   help="file listing paths to prefetch, one absolute path per line ('#' starts a comment line); "
                        "or the paths themselves, separated by commas")


def run(args: argparse.Namespace) -> int:
    from ..builder import BuildOptions, build
    from ..daemon import parse_prefetch_list

    if len(args.source) > 1:
        return _build_layers(args)
    source = args.source[0]
    prefetch = parse_prefetch_list(args.prefetch_list, "--prefetch-list")
    start = time.monotonic()
    with Progress("build") as progress:
        result = build(BuildOptions(
            source=source, bootstrap=args.bootstrap, blob_dir=args.blob_dir, compressor=args.compressor,
            chunk_size=args.chunk_size, digester=args.digester, prefetch_list=prefetch,
            progress=lambda done, total: progress.update(done, total=total)))
    elapsed = max(time.monotonic() - start, 1e-6)
    println(f"built {result.bootstrap}: blob {result.blob_id or '(none: no file data)'}, "
            f"{result.files} files, {result.data_bytes} bytes ({format_bytes(result.data_bytes)}), "
            f"{result.chunks} chunks, {result.dedup_chunks} deduplicated, blob {format_bytes(result.blob_size)}, "
            f"{format_bytes(result.data_bytes / elapsed)}/s in {elapsed:.2f}s")
    return 0


def _build_layers(args: argparse.Namespace) -> int:
    from ..builder.merge import build_layers

    if args.prefetch_list:
        raise RafsError("--prefetch-list is not supported for multi-layer builds yet")
    start = time.monotonic()
    with Progress("build") as progress:
        done = [0] * len(args.source)

        def step(layer: int, n: int, _total: int) -> None:
            done[layer] = n
            progress.update(sum(done))

        res = build_layers(args.source, args.bootstrap, args.blob_dir, compressor=args.compressor,
                           chunk_size=args.chunk_size, digester=args.digester, progress=step)
    data = sum(lr.data_bytes for lr in res.layers)
    println(f"built {res.bootstrap} from {len(res.layers)} layers: {len(res.blob_ids)} blobs "
            f"({' '.join(res.blob_ids) or 'none'}), {res.inodes} inodes, {data} bytes ({format_bytes(data)}), "
            f"blobs {format_bytes(sum(lr.blob_size for lr in res.layers))}, {time.monotonic() - start:.2f}s")
    return 0
