"""The chunk source behind fscache mounts: the configured backend without the chunk cache.  In fscache mode the
kernel's cache file is the uncompressed blob, so a second, persisting copy would only duplicate it."""
from __future__ import annotations

import os
from dataclasses import dataclass

from rafsfs.config import PrefetchConfig, RafsConfig
from rafsfs.storage.cache.metrics import CacheMetrics
from rafsfs.storage.direct import DirectChunkSource
from rafsfs.storage.open import backend_from_config, config_from_args


@dataclass
class ImageSource:
    """What an image reads its blobs through."""

    source: DirectChunkSource | None  # None: the image has no data blobs to read
    amplify: int  # bytes of blob one READ fetches at least
    prefetch: PrefetchConfig | None  # the config's prefetch section (None without a config)
    backend_id: str  # who serves the blobs: images share a blob object only when this agrees


def backend_identity(cfg: RafsConfig) -> str:
    """The backend a config reads blobs from, as a comparable string (credentials left out)."""
    b = cfg.backend
    if b.type == "registry" and b.registry is not None:
        r = b.registry
        return f"registry {r.scheme}://{r.host}/{r.repo}"
    return f"localfs {os.path.realpath(b.blob_dir) if b.blob_dir else ''} {[os.path.realpath(d) for d in b.devices]}"


def open_source(blob_dir: str | None, devices: list[str], config: str | None,
                metrics: CacheMetrics | None = None) -> ImageSource:
    """The storage ``--config``/``--blob-dir``/``--device`` name (checked as every command checks them), read
    directly: the config's cache section is ignored."""
    cfg = config_from_args(blob_dir, devices, config)
    if cfg is None:
        return ImageSource(None, 1 << 20, None, "")
    return ImageSource(DirectChunkSource(backend_from_config(cfg), cfg.digest_validate, cfg.amplify_io,
                                         metrics=metrics),
                       cfg.amplify_io, cfg.prefetch if config is not None else None, backend_identity(cfg))
