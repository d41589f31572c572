"""The image builder: a directory or OCI layer tarball -> one RAFS v6 bootstrap + one data blob."""
from __future__ import annotations

import logging
import os
from typing import BinaryIO

from ..compression import COMPRESSOR_BY_NAME, DIGESTER_BY_NAME
from ..errors import BuildError
from .blob_writer import BlobWriter
from .bootstrap_writer import BlobPart, write_bootstrap
from .options import BuildOptions, BuildResult
from .tree import Node, scan_source

log = logging.getLogger(__name__)

__all__ = ["build", "BuildOptions", "BuildResult"]


def _read_full(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    while data and len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


def build(opts: BuildOptions) -> BuildResult:
    compressor = COMPRESSOR_BY_NAME.get(opts.compressor)
    if compressor is None or opts.compressor == "gzip":
        raise BuildError(f"unknown compressor {opts.compressor!r} (zstd, lz4 or none)")
    digester = DIGESTER_BY_NAME.get(opts.digester)
    if digester is None:
        raise BuildError(f"unknown digester {opts.digester!r} (blake3 or sha256)")
    cs = opts.chunk_size
    if cs < 4096 or cs > 16 << 20 or cs & (cs - 1):
        raise BuildError(f"chunk size {cs} must be a power of two between 4 KiB and 16 MiB")
    prefetch = []
    for p in opts.prefetch_list:
        if not p.startswith("/"):
            raise BuildError(f"prefetch path {p!r} must be absolute")
        prefetch.append(os.fsencode(os.path.normpath(p)).replace(b"//", b"/"))
    if not os.path.exists(opts.source):
        raise BuildError(f"source {opts.source} does not exist")

    # no total: walking a directory tree twice just to size it costs as much as a metadata scan
    writer = BlobWriter(opts.blob_dir, compressor, digester, cs)
    stats = {"files": 0, "bytes": 0}

    def sink(node: Node, f: BinaryIO) -> None:
        stats["files"] += 1
        read = 0
        while True:
            data = _read_full(f, cs)  # chunk j must start at j * chunk size, so never accept a short read
            if not data:
                break
            read += len(data)
            writer.add_chunk(data, node.chunks)
        if read != node.size:
            raise BuildError(f"file changed while reading: expected {node.size} bytes, read {read}")
        stats["bytes"] += read
        if opts.progress:
            opts.progress(stats["bytes"], 0)

    try:
        root = scan_source(opts.source, sink)
        blob_id, blob_path, entry = writer.finish()
    except BaseException:
        writer.abort()
        raise
    try:
        inodes = write_bootstrap(opts.bootstrap, root, chunk_size=cs, compressor=compressor, digester=digester,
                                 blobs=[BlobPart(entry, writer.chunks)] if entry else [], prefetch=prefetch)
    except OSError as e:
        raise BuildError(f"cannot write bootstrap {opts.bootstrap}: {e.strerror}") from None
    except ValueError as e:
        raise BuildError(str(e)) from None
    log.info("built %s: %d inodes, blob %s", opts.bootstrap, inodes, blob_id)
    return BuildResult(bootstrap=opts.bootstrap, blob_id=blob_id, blob_path=blob_path, inodes=inodes,
                       files=stats["files"], data_bytes=stats["bytes"], chunks=len(writer.chunks),
                       dedup_chunks=writer.dedup_hits, blob_size=entry.compressed_size if entry else 0)
