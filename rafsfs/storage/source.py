"""The one contract every chunk source keeps: the chunk cache, the source without a cache, the deferred source.

A source turns chunks of blobs into verified, decompressed bytes, and owns the blobs' metadata (:meth:`meta`: where
each chunk lives).  The reader maps a file range to chunk slices (:meth:`rafsfs.image.RafsImage.map_range`);
:meth:`ChunkSource.read` executes that list: slices of one blob go to the source together (so adjacent chunks merge
into one backend request), holes read as zeros, and data stored in the image itself comes from the caller.

Capabilities are methods with defaults here, never probed with ``getattr``/``isinstance``: a source that cannot
read parts of chunks slices whole ones (:meth:`read_slices`); one that keeps nothing is never
:meth:`fully_cached`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..blob import HOLE, BlobInfo, ChunkRef, ChunkSlice
from .metrics import CacheMetrics

if TYPE_CHECKING:
    from .meta import BlobMeta


class ChunkSource(ABC):
    """Verified chunk bytes and blob metadata for the blobs of any image.  Thread-safe."""

    metrics: CacheMetrics

    @property
    def is_local(self) -> bool:
        """Every read is served from local files: a small read never waits on the network."""
        return False

    @abstractmethod
    def meta(self, blob: BlobInfo) -> BlobMeta:
        """The blob's metadata (chunk locations and digests), loaded once."""

    @abstractmethod
    def read_chunks(self, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
        """The whole uncompressed bytes of each chunk of ``blob``, in order."""

    @abstractmethod
    def read_raw(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        """Stored bytes of a blob as they are (one backend request)."""

    @abstractmethod
    def close(self) -> None:
        """Stop background work and release files and connections."""

    def prepare(self) -> None:
        """Do now the one-time set-up the first backend read would do (imports, HTTP sessions); no network.  A
        daemon calls it off the path to "mounted", so that the first read does not pay for it."""

    @property
    def keeps_chunks(self) -> bool:
        """Chunks read once stay (a cache): prefetching fills it."""
        return False

    def fully_cached(self, blob: BlobInfo) -> bool:
        """Every chunk of ``blob`` is kept locally: reading it needs no backend."""
        return False

    def read_slices(self, blob: BlobInfo, slices: list[ChunkSlice]) -> list[bytes]:
        """Just the bytes each slice of ``blob`` asks for, in order (here: sliced out of whole chunks)."""
        chunks = list({_key(s.chunk): s.chunk for s in slices}.values())
        whole = dict(zip((_key(c) for c in chunks), self.read_chunks(blob, chunks)))
        return [whole[_key(s.chunk)][s.offset:s.offset + s.length] for s in slices]

    def read(self, blobs: Sequence[BlobInfo], slices: Sequence[ChunkSlice],
             local: Callable[[ChunkSlice], bytes]) -> bytes:
        """The bytes of ``slices`` (a file range from ``map_range``), joined: each blob's slices read together,
        holes as zeros, data stored in the image (blob index BOOTSTRAP) through ``local``."""
        by_blob: dict[int, list[int]] = {}
        for i, s in enumerate(slices):
            if s.chunk.blob_index >= 0:
                by_blob.setdefault(s.chunk.blob_index, []).append(i)
        pieces: dict[int, bytes] = {}
        for bidx, idx in by_blob.items():
            pieces.update(zip(idx, self.read_slices(blobs[bidx], [slices[i] for i in idx])))
        return b"".join(pieces[i] if i in pieces else bytes(s.length) if s.chunk.blob_index == HOLE else local(s)
                        for i, s in enumerate(slices))

    def __enter__(self) -> "ChunkSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key(c: ChunkRef) -> tuple[int, int]:
    return c.ci_index, c.info.uncompressed_offset
