"""A small memory of the chunks served last, in front of a chunk source that hands out whole chunks.

The kernel's read-ahead windows are not aligned to chunks (a ``cat`` asks for 256 KiB at 0, 512 KiB at 256 KiB,
1 MiB at 768 KiB, ...), so one chunk is often needed by two or three FUSE reads in a row.  Without a cache
(``--blob-dir``) each of them would read and verify the whole chunk again.  Keeping the last few verified chunks
(bounded in bytes) makes the second and third reads a slice of memory.  A source that reads parts of chunks itself
(the chunk cache's ``read_slices``) is passed straight through.  Chunks never change (the image is immutable and every chunk was verified before it got here).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from ..blob import BlobInfo, ChunkRef
from ..image import ChunkSource, RafsImage

DEFAULT_MAX_BYTES = 16 << 20


class RecentChunks:
    """A :class:`rafsfs.image.ChunkSource` in front of another, remembering up to ``max_bytes`` of chunks."""

    def __init__(self, inner: ChunkSource, max_bytes: int = DEFAULT_MAX_BYTES):
        self.inner = inner
        self.max_bytes = max_bytes
        self._lru: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        read_slices = getattr(inner, "read_slices", None)
        if read_slices is not None:
            self.read_slices = read_slices  # reads parts of chunks already: nothing to remember

    @staticmethod
    def _key(blob: BlobInfo, c: ChunkRef) -> tuple[int, int, int]:
        return blob.index, c.info.compressed_offset, c.info.compressed_size

    def read_raw(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self.inner.read_raw(blob, offset, size)

    def read_chunks(self, image: RafsImage, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
        found: dict[tuple[int, int, int], bytes] = {}
        missing: list[ChunkRef] = []
        with self._lock:
            for c in chunks:
                k = self._key(blob, c)
                data = self._lru.get(k)
                if data is None:
                    missing.append(c)
                else:
                    self._lru.move_to_end(k)
                    found[k] = data
            self.hits += len(chunks) - len(missing)
            self.misses += len(missing)
        if missing:
            got = self.inner.read_chunks(image, blob, missing)
            with self._lock:
                for c, data in zip(missing, got):
                    k = self._key(blob, c)
                    found[k] = data
                    if k not in self._lru and len(data) <= self.max_bytes:
                        self._lru[k] = data
                        self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, old = self._lru.popitem(last=False)
                    self._bytes -= len(old)
        return [found[self._key(blob, c)] for c in chunks]
