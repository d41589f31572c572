"""A mounted image as the daemon serves it: the parsed bootstrap, its chunk source and an fd of the bootstrap file.
:func:`open_served` is also the preflight a mount request gets before any daemon starts."""
from __future__ import annotations

import os
from dataclasses import dataclass

from rafsfs.image import RafsImage
from rafsfs.storage.metrics import CacheMetrics
from rafsfs.storage.cache.none import DirectChunkSource

from . import protocol
from .errors import FscacheError
from .sources import open_source
from .state import MountRecord


@dataclass(eq=False)  # identity
class Served:
    rec: MountRecord
    image: RafsImage
    source: DirectChunkSource | None
    bootstrap_fd: int
    amplify: int  # bytes of blob one READ fetches at least (read-ahead of the chunks after the requested ones)
    users: int = 0  # READs and read-aheads using it now: an unmounted image is closed only when this is 0
    closed: bool = False


def open_served(rec: MountRecord, metrics: CacheMetrics | None = None) -> Served:
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
        source, amplify = open_source(rec.blob_dir, rec.devices, rec.config, metrics)
        if image.blobs and source is None:
            raise FscacheError(f"{rec.bootstrap}: the image's data is in blobs: give --blob-dir or --config")
        fd = os.open(rec.bootstrap, os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        image.close()
        raise
    return Served(rec, image, source, fd, amplify)


def close_served(s: Served) -> None:
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
