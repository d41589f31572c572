"""The image builder: a directory or OCI layer tarball -> one RAFS v6 bootstrap + one data blob."""
from __future__ import annotations

import logging
import os

from ..errors import BuildError
from .blob_writer import BlobWriter
from .bootstrap_writer import BlobPart
from .options import BuildOptions, BuildResult
from .pipeline import FileChunker, check_codecs, write_bootstrap_checked
from .tree import scan_source

log = logging.getLogger(__name__)

__all__ = ["build", "BuildOptions", "BuildResult"]


def build(opts: BuildOptions) -> BuildResult:
    cs = opts.chunk_size
    compressor, digester = check_codecs(opts.compressor, opts.digester, cs)
    prefetch = []
    for p in opts.prefetch_list:
        if not p.startswith("/"):
            raise BuildError(f"prefetch path {p!r} must be absolute")
        prefetch.append(os.fsencode(os.path.normpath(p)).replace(b"//", b"/"))
    if not os.path.exists(opts.source):
        raise BuildError(f"source {opts.source} does not exist")

    # no total: walking a directory tree twice just to size it costs as much as a metadata scan
    writer = BlobWriter(opts.blob_dir, compressor, digester, cs)
    sink = FileChunker(writer, cs, on_file=(lambda node, n: opts.progress(sink.bytes, 0)) if opts.progress else None)

    try:
        root = scan_source(opts.source, sink)
        blob_id, blob_path, entry = writer.finish()
    except BaseException:
        writer.abort()
        raise
    inodes = write_bootstrap_checked(opts.bootstrap, root, chunk_size=cs, compressor=compressor,
                                     digester=digester, blobs=[BlobPart(entry, writer.chunks)] if entry else [],
                                     prefetch=prefetch)
    log.info("built %s: %d inodes, blob %s", opts.bootstrap, inodes, blob_id)
    return BuildResult(bootstrap=opts.bootstrap, blob_id=blob_id, blob_path=blob_path, inodes=inodes,
                       files=sink.files, data_bytes=sink.bytes, chunks=len(writer.chunks),
                       dedup_chunks=writer.dedup_hits, blob_size=entry.compressed_size if entry else 0)
