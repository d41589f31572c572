"""The source without a cache (cache type ``none``): merged ranged backend reads, decompressed and verified (see
:mod:`rafsfs.storage.fetch`), with a small memory of the chunks served last.

The kernel's read-ahead windows are not aligned to chunks (a ``cat`` asks for 256 KiB at 0, 512 KiB at 256 KiB,
1 MiB at 768 KiB, ...), so one chunk is often needed by two or three FUSE reads in a row.  Without a cache each of
them would read and verify the whole chunk again.  Keeping the last few verified chunks (bounded in bytes,
:class:`RecentChunks`) makes the second and third reads a slice of memory.  Chunks never change (the image is
immutable and every chunk was verified before it got here).  Callers that read every chunk once (the fscache
daemon, which keeps chunks in the kernel's cache file) leave it off.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from ...blob import BlobInfo, ChunkRef
from ...errors import RafsError
from ..backend.base import BlobBackend
from ..fetch import DEFAULT_AMPLIFY_IO, DEFAULT_WORKERS, ChunkFetcher
from ..meta import BlobMeta, MetaCache
from ..metrics import CacheMetrics
from ..source import ChunkSource

DEFAULT_RECENT_BYTES = 16 << 20  # what a FUSE mount without a cache remembers


class RecentChunks:
    """The last verified chunks served, up to ``max_bytes``, least recently used dropped first.  Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_RECENT_BYTES):
        self.max_bytes = max_bytes
        self._lru: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(blob: BlobInfo, c: ChunkRef) -> tuple[int, int, int]:
        return blob.index, c.info.compressed_offset, c.info.compressed_size

    def take(self, blob: BlobInfo, chunks: list[ChunkRef], found: dict) -> list[ChunkRef]:
        """Fill ``found`` (key -> bytes) with the chunks remembered; returns the others."""
        missing = []
        with self._lock:
            for c in chunks:
                k = self.key(blob, c)
                data = self._lru.get(k)
                if data is None:
                    missing.append(c)
                else:
                    self._lru.move_to_end(k)
                    found[k] = data
            self.hits += len(chunks) - len(missing)
            self.misses += len(missing)
        return missing

    def keep(self, blob: BlobInfo, chunks: list[ChunkRef], datas: list[bytes]) -> None:
        with self._lock:
            for c, data in zip(chunks, datas):
                k = self.key(blob, c)
                if k not in self._lru and len(data) <= self.max_bytes:
                    self._lru[k] = data
                    self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, old = self._lru.popitem(last=False)
                self._bytes -= len(old)


class DirectChunkSource(ChunkSource):
    """Reads chunks straight from the backend.  ``recent_bytes``: how much of the last chunks to remember
    (0: nothing)."""

    def __init__(self, backend: BlobBackend, verify: bool = True, merge_limit: int = DEFAULT_AMPLIFY_IO,
                 workers: int = DEFAULT_WORKERS, metrics: CacheMetrics | None = None, recent_bytes: int = 0):
        self.fetcher = ChunkFetcher(backend, verify=verify, amplify_io=merge_limit, workers=workers,
                                    metrics=metrics)
        self.backend = backend
        self.metrics = self.fetcher.metrics
        self.recent = RecentChunks(recent_bytes) if recent_bytes > 0 else None
        self._metas = MetaCache(self.read_raw)

    @property
    def is_local(self) -> bool:
        return self.backend.is_local

    def prepare(self) -> None:
        self.backend.prepare()

    def meta(self, blob: BlobInfo) -> BlobMeta:
        return self._metas.get(blob)

    def read_raw(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self.fetcher.read_range(blob, offset, size)

    def read_chunks(self, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
        found: dict[tuple[int, int, int], bytes] = {}
        missing = self.recent.take(blob, chunks, found) if self.recent is not None else chunks
        if missing:
            got = self._fetch(blob, missing)
            for c, data in zip(missing, got):
                found[RecentChunks.key(blob, c)] = data
            if self.recent is not None:
                self.recent.keep(blob, missing, got)
        return [found[RecentChunks.key(blob, c)] for c in chunks]

    def _fetch(self, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
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
