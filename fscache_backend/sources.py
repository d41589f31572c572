"""The chunk source behind fscache mounts: the configured backend without the chunk cache.  In fscache mode the
kernel's cache file is the uncompressed blob, so a second, persisting copy would only duplicate it."""
from __future__ import annotations

import os

from rafsfs.errors import BlobUnavailable
from rafsfs.storage.backend.localfs import LocalFsBackend
from rafsfs.storage.direct import DirectChunkSource


DEFAULT_AMPLIFY = 1 << 20


def open_source(blob_dir: str | None, devices: list[str],
                config: str | None) -> tuple[DirectChunkSource | None, int]:
    """(source, amplify_io): ``--config`` names the backend (its cache section is ignored) and how many bytes one
    fetch may grow to; ``--blob-dir``/``--device`` override it with local blobs.  No source when nothing was
    given."""
    if blob_dir is not None and not os.path.isdir(blob_dir):
        raise BlobUnavailable(f"blob directory {blob_dir} does not exist or is not a directory")
    if config is not None:
        from rafsfs.config import load_config  # (imports the HTTP stack: only when a config is given)
        from rafsfs.storage.open import backend_from_config

        cfg = load_config(config)
        if blob_dir is not None or devices:
            cfg.backend.type, cfg.backend.blob_dir, cfg.backend.devices = "localfs", blob_dir, list(devices)
        return DirectChunkSource(backend_from_config(cfg), cfg.digest_validate, cfg.amplify_io), cfg.amplify_io
    if blob_dir is None and not devices:
        return None, DEFAULT_AMPLIFY
    return DirectChunkSource(LocalFsBackend(blob_dir, list(devices))), DEFAULT_AMPLIFY
