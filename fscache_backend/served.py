"""An image as the daemon serves it: the parsed bootstrap, its chunk source and an fd of the bootstrap file.
:func:`open_served` is also the preflight a mount request gets before any daemon starts."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from rafsfs.blob import BlobInfo
from rafsfs.config import PrefetchConfig
from rafsfs.image import RafsImage
from rafsfs.storage.cache.none import DirectChunkSource
from rafsfs.storage.metrics import CacheMetrics

from . import protocol
from .errors import FscacheError
from .sources import open_source
from .state import MountRecord


@dataclass(eq=False)  # identity
class ServedImage:
    rec: MountRecord
    image: RafsImage
    source: DirectChunkSource | None
    bootstrap_fd: int
    amplify: int  # bytes of blob one READ fetches at least (read-ahead of the chunks after the requested ones)
    prefetch: PrefetchConfig | None = None
    users: int = 0  # READs and read-aheads using it now: an unmounted image is closed only when this is 0
    closed: bool = False

    @property
    def backend_id(self) -> str:
        """Who serves the blobs (the backend's identity): images share a blob object only when this agrees."""
        return self.source.backend.identity if self.source is not None else ""

    def blob_identity(self, blob: BlobInfo) -> str:
        """What must agree for two images to share ``blob``'s cache object: the blob's table entry (chunk count,
        sizes, chunk-info location and digests), the bootstrap's chunk table for it, and the backend serving it.
        The kernel keeps one cache file per (domain, blob id): bytes fetched and verified for one image are served
        to every image of the domain that names the blob."""
        h = hashlib.sha256()
        fields = (blob.blob_id, blob.chunk_size, blob.chunk_count, blob.compressor, blob.digester, blob.features,
                  blob.compressed_size, blob.uncompressed_size, blob.ci_compressor, blob.ci_offset,
                  blob.ci_compressed_size, blob.ci_uncompressed_size, blob.toc_size, blob.toc_digest.hex(),
                  self.backend_id)
        h.update(repr(fields).encode())
        for (b, ci), e in sorted(self.image.chunk_table().items()):
            if b == blob.index:
                h.update(repr((ci, e.compressed_offset, e.compressed_size, e.uncompressed_offset,
                               e.uncompressed_size, bytes(e.digest).hex())).encode())
        return h.hexdigest()


def open_served(rec: MountRecord, metrics: CacheMetrics | None = None) -> ServedImage:
    """Open the image and its blob source (counting into ``metrics``); raises a one-line RafsError when fscache
    mode cannot serve it."""
    image = RafsImage.open(rec.bootstrap)
    try:
        if image.blksz != protocol.PAGE:
            raise FscacheError(f"{rec.bootstrap}: fscache mode needs 4096-byte blocks (the image has {image.blksz})")
        for b in image.blobs:
            if not b.blob_id:
                raise FscacheError(f"{rec.bootstrap}: device {b.index + 1} has no tag naming its blob; fscache mode "
                                   "needs one (Nydus images always have it)")
        src = open_source(rec.blob_dir, rec.devices, rec.config, metrics)
        if image.blobs and src.source is None:
            raise FscacheError(f"{rec.bootstrap}: the image's data is in blobs: give --blob-dir or --config")
        for p in rec.prefetch_files:
            image.resolve(p)  # a path not in the image is a one-line error now, not a silent no-op later
        fd = os.open(rec.bootstrap, os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        image.close()
        raise
    return ServedImage(rec, image, src.source, fd, src.amplify, src.prefetch)


def close_served(s: ServedImage) -> None:
    """Close it (again: nothing happens)."""
    if s.closed:
        return
    s.closed = True
    if s.bootstrap_fd >= 0:
        os.close(s.bootstrap_fd)
        s.bootstrap_fd = -1
    if s.source is not None:
        s.source.close()
    s.image.close()
