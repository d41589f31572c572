"""A ChunkSource without a cache: merged ranged backend reads, decompressed and verified (see fetch.py)."""
from __future__ import annotations

from ..errors import RafsError
from ..blob import BlobInfo, ChunkRef
from ..image import RafsImage
from .backend.base import BlobBackend
from .cache.metrics import CacheMetrics
from .fetch import DEFAULT_AMPLIFY_IO, DEFAULT_WORKERS, ChunkFetcher


class DirectChunkSource:
    def __init__(self, backend: BlobBackend, verify: bool = True, merge_limit: int = DEFAULT_AMPLIFY_IO,
                 workers: int = DEFAULT_WORKERS, metrics: CacheMetrics | None = None):
        self.fetcher = ChunkFetcher(backend, verify=verify, amplify_io=merge_limit, workers=workers,
                                    metrics=metrics)
        self.backend = backend
        self.metrics = self.fetcher.metrics

    def read_raw(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self.fetcher.read_range(blob, offset, size)

    def read_chunks(self, image: RafsImage, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
        out: dict[tuple[int, int], bytes] = {}

        def keep(c: ChunkRef, data: bytes | None, err: RafsError | None) -> None:
            if data is not None:
                out[(c.ci_index, c.info.compressed_offset)] = data

        err = self.fetcher.fetch(blob, chunks, keep)
        if err is not None:
            raise err
        for c in chunks:
            self.metrics.served(c.info.uncompressed_size)
        return [out[(c.ci_index, c.info.compressed_offset)] for c in chunks]

    def close(self) -> None:
        self.fetcher.close()
