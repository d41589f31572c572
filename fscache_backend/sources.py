"""The chunk source behind fscache mounts: the configured backend without the chunk cache.  In fscache mode the
kernel's cache file is the uncompressed blob, so a second, persisting copy would only duplicate it."""
from __future__ import annotations

from dataclasses import dataclass

from rafsfs.config import PrefetchConfig
from rafsfs.storage.cache.none import DirectChunkSource
from rafsfs.storage.factory import backend_from_config, config_from_args
from rafsfs.storage.metrics import CacheMetrics


@dataclass
class ImageSource:
    """What an image reads its blobs through."""

    source: DirectChunkSource | None  # None: the image has no data blobs to read
    amplify: int  # bytes of blob one READ fetches at least
    prefetch: PrefetchConfig | None  # the config's prefetch section (None without a config)


def open_source(blob_dir: str | None, devices: list[str], config: str | None,
                metrics: CacheMetrics | None = None) -> ImageSource:
    """The storage ``--config``/``--blob-dir``/``--device`` name (checked as every command checks them), read
    directly: the config's cache section is ignored."""
    cfg = config_from_args(blob_dir, devices, config)
    if cfg is None:
        return ImageSource(None, 1 << 20, None)
    return ImageSource(DirectChunkSource(backend_from_config(cfg), cfg.digest_validate, cfg.amplify_io,
                                         metrics=metrics),
                       cfg.amplify_io, cfg.prefetch if config is not None else None)
