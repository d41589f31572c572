"""From a list of chunks to backend requests: adjacent chunks merged into one ranged read (up to ``amplify_io``
bytes), groups fetched in parallel by a bounded worker pool, each chunk decompressed and verified.

Both chunk sources use this one mechanism: :class:`rafsfs.storage.cache.none.DirectChunkSource` keeps the bytes it
gets, :class:`rafsfs.storage.cache.chunk_cache.ChunkCache` writes them into its cache file.  zstd, lz4, blake3 and hashlib
release the GIL, so worker threads decompress and hash in parallel.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..compression import decompress, digest
from ..errors import BlobUnavailable, CorruptChunk, RafsError
from ..blob import BlobInfo, ChunkRef
from .backend.base import BlobBackend
from .metrics import CacheMetrics

log = logging.getLogger(__name__)

DEFAULT_AMPLIFY_IO = 1 << 20  # Nydus's default: merge adjacent chunk reads up to 1 MiB per backend request
DEFAULT_WORKERS = 8
# chunks this close are fetched in one request, the bytes between them read and dropped: uncompressed blobs pad
# every chunk to 4 KiB so that the kernel can map it, which leaves a gap of up to 4 KiB - 1 after each
MERGE_GAP = 4095

# called once per chunk, from a worker thread, with the verified bytes or the error that chunk met
ChunkSink = Callable[[ChunkRef, "bytes | None", "RafsError | None"], None]
# gets the stored (compressed, unverified) bytes of a neighbour chunk that came with a request
RawSink = Callable[[ChunkRef, bytes], None]


def follows(end: int, offset: int) -> bool:
    """A chunk stored at ``offset`` can join a request that so far ends at ``end`` (at most MERGE_GAP apart)."""
    return 0 <= offset - end <= MERGE_GAP


def merge_ranges(chunks: list[ChunkRef], limit: int) -> list[list[ChunkRef]]:
    """Group chunks (sorted by compressed offset) whose compressed ranges are contiguous or at most
    :data:`MERGE_GAP` bytes apart, up to ``limit`` bytes per group."""
    groups: list[list[ChunkRef]] = []
    for c in sorted(chunks, key=lambda c: c.info.compressed_offset):
        if groups:
            g = groups[-1]
            last = g[-1].info
            start = g[0].info.compressed_offset
            end = c.info.compressed_offset + c.info.compressed_size
            if end - start <= limit and follows(last.compressed_offset + last.compressed_size,
                                                 c.info.compressed_offset):
                g.append(c)
                continue
        groups.append([c])
    return groups


def verify_chunk(blob: BlobInfo, chunk: ChunkRef, raw: bytes, verify: bool = True) -> bytes:
    """Decompress one chunk's stored bytes and check its digest (when the image records one)."""
    info = chunk.info
    if len(raw) != info.compressed_size:
        raise BlobUnavailable(f"blob {blob.ref.name}: short read at offset {info.compressed_offset}")
    data = decompress(blob.compressor, raw, info.uncompressed_size) if info.compressed else raw
    if not info.compressed and len(data) != info.uncompressed_size:
        raise CorruptChunk(f"blob {blob.ref.name}: chunk at {info.compressed_offset} has the wrong size")
    if verify and chunk.digest is not None and blob.nydus:
        if digest(blob.digester, data) != chunk.digest:
            raise CorruptChunk(f"blob {blob.ref.name}: chunk {chunk.ci_index} at offset {info.compressed_offset} "
                               "fails its digest check")
    return data


class ChunkFetcher:
    """Fetches chunks of blobs from one backend; thread-safe."""

    def __init__(self, backend: BlobBackend, *, verify: bool = True, amplify_io: int = DEFAULT_AMPLIFY_IO,
                 workers: int = DEFAULT_WORKERS, metrics: CacheMetrics | None = None):
        self.backend = backend
        self.verify = verify
        self.amplify_io = max(amplify_io, 1)
        self.metrics = metrics or CacheMetrics()
        self._workers = max(workers, 1)
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._closed = False
        self._pool_lock = threading.Lock()

    def read_range(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        """One backend request, timed and counted."""
        t0 = time.perf_counter()
        self.metrics.request_started()
        try:
            data = self.backend.read(blob.ref, offset, size)
        finally:
            self.metrics.request_done(time.perf_counter() - t0)
        self.metrics.fetched(len(data))
        return data

    def fetch(self, blob: BlobInfo, chunks: list[ChunkRef], sink: ChunkSink,
              merge_limit: int | None = None, neighbours: list[ChunkRef] = (),
              neighbour_sink: RawSink | None = None, background: bool = False) -> RafsError | None:
        """Fetch ``chunks``; ``sink`` gets every chunk exactly once.  Returns the first error met, if any.
        ``merge_limit`` overrides ``amplify_io`` (readahead asks for larger requests).  ``neighbours`` (the
        amplify_io neighbours of a small read) come with the request of a chunk next to them if there is one:
        ``neighbour_sink`` gets their stored bytes, undecoded.
        ``background`` work (readahead, prefetch) runs in pools of its own: a reader's requests never queue behind
        it."""
        neighbour_ids = {c.ci_index for c in neighbours} if neighbour_sink is not None else set()
        groups = merge_ranges([*chunks, *neighbours] if neighbour_ids else chunks, merge_limit or self.amplify_io)
        if neighbour_ids:  # a request for neighbours alone is not worth making
            groups = [g for g in groups if any(c.ci_index not in neighbour_ids for c in g)]
        if len(groups) <= 1 or self._workers == 1:
            errors = [self._fetch_group(blob, g, sink, neighbour_ids, neighbour_sink, background) for g in groups]
        else:
            pool = self._get_pool("fetch", background)
            errors = [f.result() for f in [pool.submit(self._fetch_group, blob, g, sink, neighbour_ids,
                                                       neighbour_sink, background) for g in groups]]
        return next((e for e in errors if e is not None), None)

    def decode(self, blob: BlobInfo, c: ChunkRef, raw: bytes | memoryview, sink: ChunkSink) -> RafsError | None:
        """Decompress and verify one chunk's stored bytes; ``sink`` gets the result either way."""
        try:
            data = verify_chunk(blob, c, raw, self.verify)
        except Exception as e:  # e.g. an unknown digester named by the image: the chunk fails, not the reader
            if not isinstance(e, RafsError):
                e = CorruptChunk(f"blob {blob.ref.name}: chunk {c.ci_index}: {e}")
            self.metrics.error()
            log.debug("%s", e)
            sink(c, None, e)
            return e
        sink(c, bytes(data), None)
        return None

    def _fetch_group(self, blob: BlobInfo, group: list[ChunkRef], sink: ChunkSink,
                     neighbour_ids: set[int] = frozenset(), neighbour_sink: RawSink | None = None,
                     background: bool = False) -> RafsError | None:
        start = group[0].info.compressed_offset
        end = group[-1].info.compressed_offset + group[-1].info.compressed_size
        try:
            raw = self.read_range(blob, start, end - start)
        except Exception as e:  # a backend bug must not leave the chunks' readers waiting forever
            if not isinstance(e, RafsError):
                log.exception("reading blob %s", blob.ref.name)
                e = BlobUnavailable(f"blob {blob.ref.name}: internal error: {e}")
            self.metrics.error()
            for c in group:
                if c.ci_index not in neighbour_ids:
                    sink(c, None, e)
            return e
        view = memoryview(raw)
        if neighbour_ids:
            for c in group:
                o = c.info.compressed_offset - start
                if c.ci_index in neighbour_ids and len(raw) >= o + c.info.compressed_size:
                    neighbour_sink(c, bytes(view[o:o + c.info.compressed_size]))
            group = [c for c in group if c.ci_index not in neighbour_ids]

        def decode(c: ChunkRef) -> RafsError | None:
            o = c.info.compressed_offset - start
            return self.decode(blob, c, view[o:o + c.info.compressed_size], sink)

        if len(group) > 1 and self._workers > 1:
            # one request brought several chunks: decompress and verify them on several cores, in order of need
            results = list(self._get_pool("decode", background).map(decode, group))
        else:
            results = [decode(c) for c in group]
        return next((e for e in results if e is not None), None)

    def _get_pool(self, kind: str, background: bool = False) -> ThreadPoolExecutor:
        """The worker pools: "fetch" runs whole groups (a request, then its chunks), "decode" the chunks of one
        group in parallel.  Two pools, so a group waiting for its chunks never waits for a free worker of its own;
        and the two again for background work."""
        if background:
            kind = "bg-" + kind
        with self._pool_lock:
            if self._closed:
                raise BlobUnavailable("the chunk source is closed")
            pool = self._pools.get(kind)
            if pool is None:
                pool = self._pools[kind] = ThreadPoolExecutor(self._workers, thread_name_prefix=f"rafsfs-{kind}")
            return pool

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True)
        self.backend.close()
