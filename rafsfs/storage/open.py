"""Build a ChunkSource from command-line style arguments (``--blob-dir``, ``--device``, later ``--config``)."""
from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import BlobUnavailable, RafsError
from .backend.localfs import LocalFsBackend
from .direct import DirectChunkSource


def chunk_source_from_args(blob_dir: str | None, devices: Sequence[str] | None,
                           config: str | None = None) -> DirectChunkSource | None:
    """A verifying chunk source over local files, or None when no data location was given.

    ``blob_dir`` holds blobs named by their id; ``devices`` are files bound to the image's device slots in order
    (like the kernel's ``-o device=``).  Both may be given: slots without a device file fall back to the directory.
    The caller closes the source with ``source.backend.close()``.
    """
    if config is not None:
        raise RafsError("--config is not supported yet (use --blob-dir or --device)")
    if blob_dir is not None and not os.path.isdir(blob_dir):
        why = "is not a directory" if os.path.exists(blob_dir) else "does not exist"
        raise BlobUnavailable(f"blob directory {blob_dir} {why}")
    for dev in devices or ():
        if not os.path.exists(dev):
            raise BlobUnavailable(f"device file {dev} does not exist")
        if os.path.isdir(dev):
            raise BlobUnavailable(f"device file {dev} is a directory")
    if blob_dir is None and not devices:
        return None
    return DirectChunkSource(LocalFsBackend(blob_dir, list(devices or ())))
