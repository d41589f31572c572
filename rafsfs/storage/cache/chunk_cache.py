"""The chunk cache: one cache file per blob in the uncompressed layout plus a persistent per-chunk ready map.

A read asks for chunks; those already marked ready are read from the cache file, the rest are fetched from the
backend -- adjacent missing chunks merged into one ranged request up to ``amplify_io`` bytes --, decompressed,
verified against their digest, written into the cache file and only then marked ready.  Concurrent readers of
one chunk wait for a single fetch (single-flight).

Layout under ``work_dir``:
  ``<blob-id>.blob.data``   sparse file; chunk i's bytes at its uncompressed offset (what fscache wants too)
  ``<blob-id>.chunk_map``   one byte per chunk-info index: 1 = the data in ``.blob.data`` is verified

Crash safety: the data is written before its map byte, both through the page cache, so a daemon killed at any
point leaves either a ready chunk with its bytes in place or a chunk that is fetched again; never a ready chunk
with wrong bytes (``fsync`` on ``sync=True`` extends this to power loss).

The cache is synchronous and thread-safe; the daemons call it from worker threads.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from ...errors import BlobUnavailable, RafsError
from ...image import BlobInfo, ChunkRef, RafsImage
from ..backend.base import BlobBackend, check_blob_id
from ..direct import DirectChunkSource, merge_ranges, verify_chunk
from .metrics import CacheMetrics

log = logging.getLogger(__name__)

DEFAULT_AMPLIFY_IO = 1 << 20


@dataclass
class CacheOptions:
    work_dir: str
    verify: bool = True  # digest validation of fetched chunks
    amplify_io: int = DEFAULT_AMPLIFY_IO  # largest merged backend request, bytes
    sync: bool = False  # fsync data before marking chunks ready


class _BlobCache:
    """Cache file + ready map of one blob."""

    def __init__(self, work_dir: str, blob: BlobInfo):
        name = check_blob_id(blob.blob_id) if blob.blob_id else f"device{blob.index}"
        self.data_path = os.path.join(work_dir, name + ".blob.data")
        self.map_path = os.path.join(work_dir, name + ".chunk_map")
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        self.data_fd = os.open(self.data_path, flags, 0o600)
        self.map_fd = os.open(self.map_path, flags, 0o600)
        n = max(blob.chunk_count, 1)
        if os.fstat(self.map_fd).st_size != n:
            # a map of another size belongs to another layout: start over
            os.ftruncate(self.map_fd, 0)
            os.ftruncate(self.map_fd, n)
            os.ftruncate(self.data_fd, 0)
        if blob.uncompressed_size and os.fstat(self.data_fd).st_size < blob.uncompressed_size:
            os.ftruncate(self.data_fd, blob.uncompressed_size)
        self.ready = bytearray(os.pread(self.map_fd, n, 0))
        self.lock = threading.Lock()

    def is_ready(self, ci: int) -> bool:
        return ci < len(self.ready) and self.ready[ci] == 1

    def mark_ready(self, ci: int) -> None:
        os.pwrite(self.map_fd, b"\1", ci)
        self.ready[ci] = 1

    def close(self) -> None:
        os.close(self.data_fd)
        os.close(self.map_fd)


class ChunkCache:
    """A :class:`rafsfs.image.ChunkSource` backed by a persistent on-disk cache."""

    def __init__(self, backend: BlobBackend, options: CacheOptions, metrics: CacheMetrics | None = None):
        self.backend = backend
        self.opts = options
        self.metrics = metrics or CacheMetrics()
        os.makedirs(options.work_dir, exist_ok=True)
        self._blobs: dict[str, _BlobCache] = {}
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], Future] = {}
        # plain EROFS devices are uncompressed local files with no chunk ids: nothing to cache
        self._direct = DirectChunkSource(backend, options.verify, options.amplify_io)

    # ------------------------------------------------------------------ ChunkSource
    def read_raw(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self._backend_read(blob, offset, size)

    def read_chunks(self, image: RafsImage, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
        if not blob.nydus:
            return self._direct.read_chunks(image, blob, chunks)
        return [self._read_one(blob, c) for c in self.ensure(blob, chunks)]

    # ------------------------------------------------------------------ the mechanism
    def _blob(self, blob: BlobInfo) -> _BlobCache:
        key = blob.blob_id or f"device{blob.index}"
        with self._lock:
            bc = self._blobs.get(key)
            if bc is None:
                bc = self._blobs[key] = _BlobCache(self.opts.work_dir, blob)
            return bc

    def _read_one(self, blob: BlobInfo, c: ChunkRef) -> bytes:
        bc = self._blob(blob)
        data = os.pread(bc.data_fd, c.info.uncompressed_size, c.info.uncompressed_offset)
        if len(data) != c.info.uncompressed_size:
            raise BlobUnavailable(f"blob {blob.ref.name}: cache file is short")
        self.metrics.served(len(data))
        return data

    def ensure(self, blob: BlobInfo, chunks: list[ChunkRef]) -> list[ChunkRef]:
        """Make every chunk present and verified in the cache file; returns ``chunks``.  Chunks fetched by another
        thread right now are waited for instead of fetched again."""
        bc = self._blob(blob)
        mine: list[ChunkRef] = []
        waits: list[Future] = []
        with self._lock:
            for c in chunks:
                if bc.is_ready(c.ci_index):
                    self.metrics.hit()
                    continue
                key = (bc.data_path, c.ci_index)
                fut = self._inflight.get(key)
                if fut is not None:
                    waits.append(fut)
                    self.metrics.hit()
                    continue
                fut = Future()
                self._inflight[key] = fut
                mine.append(c)
                self.metrics.miss()
        error: BaseException | None = None
        if mine:
            error = self._fetch(blob, bc, mine)
        for f in waits:
            exc = f.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error
        return chunks

    def _fetch(self, blob: BlobInfo, bc: _BlobCache, chunks: list[ChunkRef]) -> BaseException | None:
        """Fetch ``chunks`` (all claimed by this thread) in merged requests; settle their futures either way."""
        first_error: BaseException | None = None
        for group in merge_ranges(chunks, self.opts.amplify_io):
            start = group[0].info.compressed_offset
            end = group[-1].info.compressed_offset + group[-1].info.compressed_size
            try:
                raw = self._backend_read(blob, start, end - start)
            except RafsError as e:
                for c in group:
                    self._settle(bc, c, e)
                first_error = first_error or e
                continue
            for c in group:
                o = c.info.compressed_offset - start
                try:
                    data = verify_chunk(blob, c, raw[o:o + c.info.compressed_size], self.opts.verify)
                    os.pwrite(bc.data_fd, data, c.info.uncompressed_offset)
                    if self.opts.sync:
                        os.fdatasync(bc.data_fd)
                    bc.mark_ready(c.ci_index)
                    self._settle(bc, c, None)
                except (RafsError, OSError) as e:
                    if isinstance(e, OSError):
                        e = BlobUnavailable(f"cache write failed: {e.strerror}")
                    self.metrics.error()
                    self._settle(bc, c, e)
                    first_error = first_error or e
        return first_error

    def _settle(self, bc: _BlobCache, c: ChunkRef, exc: BaseException | None) -> None:
        with self._lock:
            fut = self._inflight.pop((bc.data_path, c.ci_index))
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    def _backend_read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        t0 = time.perf_counter()
        self.metrics.request_started()
        try:
            data = self.backend.read(blob.ref, offset, size)
        finally:
            self.metrics.request_done(time.perf_counter() - t0)
        if len(data) != size:
            raise BlobUnavailable(f"blob {blob.ref.name}: backend returned {len(data)} of {size} bytes "
                                  f"at offset {offset}")
        self.metrics.fetched(len(data))
        return data

    def close(self) -> None:
        with self._lock:
            for bc in self._blobs.values():
                bc.close()
            self._blobs.clear()
        self.backend.close()
