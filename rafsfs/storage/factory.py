"""Make the chunk source a configuration names: the backend, behind the chunk cache or without one.  Also reads
the command-line form: ``--config FILE`` or the ``--blob-dir`` / ``--device`` shorthand for local blobs."""
from __future__ import annotations

import os
from collections.abc import Sequence

from ..config import BackendConfig, CacheConfig, RafsConfig, load_config
from ..errors import BlobUnavailable
from .backend.base import BlobBackend, registry_identity
from .backend.lazy import LazyBackend
from .backend.localfs import LocalFsBackend
from .cache.chunk_cache import CacheOptions, ChunkCache
from .cache.none import DEFAULT_RECENT_BYTES, DirectChunkSource
from .metrics import CacheMetrics
from .source import ChunkSource


def backend_from_config(cfg: RafsConfig) -> BlobBackend:
    if cfg.backend.type == "registry":
        reg = cfg.backend.registry
        assert reg is not None

        def build() -> BlobBackend:
            from .backend.registry import RegistryBackend  # the HTTP stack: imported on first use (lazy.py)

            return RegistryBackend(reg)

        return LazyBackend(build, registry_identity(reg))
    return LocalFsBackend(cfg.backend.blob_dir, cfg.backend.devices)


def source_from_config(cfg: RafsConfig, metrics: CacheMetrics | None = None) -> ChunkSource:
    """The configured backend, behind the chunk cache unless the config says ``none`` (then with a memory of the
    last chunks served)."""
    backend = backend_from_config(cfg)
    if cfg.cache.type == "none":
        return DirectChunkSource(backend, cfg.digest_validate, cfg.amplify_io, metrics=metrics,
                                 recent_bytes=DEFAULT_RECENT_BYTES)
    return ChunkCache(backend, CacheOptions(work_dir=cfg.cache.work_dir, verify=cfg.digest_validate,
                                            amplify_io=cfg.amplify_io, max_size=cfg.cache.max_size),
                      metrics=metrics)


def config_from_args(blob_dir: str | None, devices: Sequence[str] | None,
                     config: str | None = None) -> RafsConfig | None:
    """The storage configuration named by command-line arguments, or None when no data location was given.

    ``blob_dir`` holds blobs named by their id; ``devices`` are files bound to the image's device slots in order
    (like the kernel's ``-o device=``).  Both may be given: slots without a device file fall back to the directory.
    ``config`` (nydusd JSON or the fscache shape) may name a registry and a cache; the shorthand options then
    override its local blob locations.  Local blobs without a config are read directly, without a cache.
    """
    if blob_dir is not None and not os.path.isdir(blob_dir):
        why = "is not a directory" if os.path.exists(blob_dir) else "does not exist"
        raise BlobUnavailable(f"blob directory {blob_dir} {why}")
    for dev in devices or ():
        if not os.path.exists(dev):
            raise BlobUnavailable(f"device file {dev} does not exist")
        if os.path.isdir(dev):
            raise BlobUnavailable(f"device file {dev} is a directory")
    if config is not None:
        cfg = load_config(config)
        if blob_dir is not None or devices:
            cfg.backend.type, cfg.backend.blob_dir, cfg.backend.devices = "localfs", blob_dir, list(devices or ())
        return cfg
    if blob_dir is None and not devices:
        return None
    return RafsConfig(backend=BackendConfig(type="localfs", blob_dir=blob_dir, devices=list(devices or ())),
                      cache=CacheConfig(type="none"))


def chunk_source_from_args(blob_dir: str | None, devices: Sequence[str] | None,
                           config: str | None = None) -> ChunkSource | None:
    """A verifying chunk source for :func:`config_from_args`, or None.  The caller closes it (``close()``)."""
    cfg = config_from_args(blob_dir, devices, config)
    return None if cfg is None else source_from_config(cfg)
