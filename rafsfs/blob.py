"""Value types every layer shares: blobs, chunks and slices of chunks (the bottom floor).

The reader (:mod:`rafsfs.image`) makes them from a bootstrap, the on-disk formats (:mod:`rafsfs.format`) decode
into them, and storage (backends, caches, blob metadata) takes them as its arguments.  This module imports
nothing of rafsfs but its errors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import BadImage, BlobUnavailable

BOOTSTRAP = -1  # blob index of data that lives in the bootstrap / primary device itself
HOLE = -2  # blob index of a hole (reads as zeros)
MAX_CHUNK_SIZE = 16 << 20  # the largest chunk RAFS v6 can describe (chunk-info v1: 24-bit size)

_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_blob_id(blob_id: str) -> str:
    """The one blob-id rule.  A blob id becomes a file name or a URL path: accept only 64 lowercase hex digits."""
    if not _HEX64.fullmatch(blob_id):
        raise BlobUnavailable(f"invalid blob id {blob_id!r}")
    return blob_id


@dataclass(frozen=True)
class BlobRef:
    """Names one blob for a backend: its content id (hex sha256) or, for plain EROFS devices whose slot carries
    no id, its device index."""

    blob_id: str
    device_index: int

    @property
    def name(self) -> str:
        return self.blob_id or f"device #{self.device_index + 1}"


@dataclass(frozen=True)
class BlobInfo:
    """One data blob (Nydus blob table entry + device slot) or one plain EROFS extra device: what the bootstrap
    records about it."""

    index: int
    blob_id: str  # hex id, "" for an EROFS device slot without one
    chunk_size: int
    chunk_count: int
    compressor: int
    digester: int
    features: int
    compressed_size: int
    uncompressed_size: int
    ci_compressor: int = 0
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    toc_size: int = 0
    toc_digest: bytes = b""
    device_blocks: int = 0
    mapped_blkaddr: int = 0
    nydus: bool = True  # False: a plain EROFS device, uncompressed, chunk at blkaddr*blk
    ci_v2: bool = False  # the blob's chunk-info array has 24-byte (v2) entries
    # the bootstrap's legacy chunk table (rafsfs.format.chunk.ChunkTable), shared by the image's blobs: chunk
    # locations that need no blob I/O.  Not part of the blob's identity.
    chunk_table: Any = field(default=None, compare=False, repr=False)

    @property
    def ref(self) -> BlobRef:
        return BlobRef(self.blob_id, self.index)


@dataclass(frozen=True)
class ChunkInfo:
    """Where one chunk lives in its blob: compressed range in the blob file, uncompressed range in the blob's
    4K-aligned uncompressed view."""

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool


@dataclass(frozen=True)
class ChunkRef:
    """A chunk: where its bytes live.  ``blob_index`` is BOOTSTRAP for data in the image file, HOLE for zeros."""

    blob_index: int
    ci_index: int
    info: ChunkInfo
    digest: bytes | None = None


@dataclass(frozen=True)
class ChunkSlice:
    """Part of a file range served by one chunk: ``length`` bytes at ``offset`` inside the chunk's uncompressed data,
    which land at ``file_offset`` in the file."""

    file_offset: int
    chunk: ChunkRef
    offset: int
    length: int


def check_chunk_info(blob: BlobInfo, info: ChunkInfo) -> ChunkInfo:
    """A chunk location read from an image (chunk table or chunk-info array) must lie inside its blob."""
    if info.uncompressed_size > MAX_CHUNK_SIZE or info.compressed_size > MAX_CHUNK_SIZE:
        raise BadImage(f"blob {blob.blob_id}: chunk larger than 16 MiB")
    if blob.uncompressed_size and info.uncompressed_offset + info.uncompressed_size > \
            -(-blob.uncompressed_size // 4096) * 4096:
        raise BadImage(f"blob {blob.blob_id}: chunk beyond the blob's uncompressed size")
    if blob.compressed_size and info.compressed_offset + info.compressed_size > blob.compressed_size:
        raise BadImage(f"blob {blob.blob_id}: chunk beyond the blob's compressed size")
    if not info.compressed and info.compressed_size != info.uncompressed_size:
        raise BadImage(f"blob {blob.blob_id}: uncompressed chunk with mismatched sizes")
    return info
