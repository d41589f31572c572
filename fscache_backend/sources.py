"""The chunk source behind fscache mounts: the configured backend without the chunk cache.  In fscache mode the
kernel's cache file is the uncompressed blob, so a second, persisting copy would only duplicate it."""
from __future__ import annotations

from rafsfs.storage.metrics import CacheMetrics
from rafsfs.storage.cache.none import DirectChunkSource
from rafsfs.storage.factory import backend_from_config, config_from_args


def open_source(blob_dir: str | None, devices: list[str], config: str | None,
                metrics: CacheMetrics | None = None) -> tuple[DirectChunkSource | None, int]:
    """(source, amplify_io): the storage ``--config``/``--blob-dir``/``--device`` name (checked as every command
    checks them), read directly: the config's cache section is ignored.  No source when nothing was given."""
    cfg = config_from_args(blob_dir, devices, config)
    if cfg is None:
        return None, 1 << 20
    return (DirectChunkSource(backend_from_config(cfg), cfg.digest_validate, cfg.amplify_io, metrics=metrics),
            cfg.amplify_io)
