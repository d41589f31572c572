"""A ChunkSource without a cache: ranged backend reads, merged, then decompressed and verified."""
from __future__ import annotations

from ..compression import decompress, digest
from ..errors import BlobUnavailable, CorruptChunk
from ..image import BlobInfo, ChunkRef, RafsImage
from .backend.base import BlobBackend

DEFAULT_MERGE_LIMIT = 1 << 20  # merge adjacent chunk reads into one backend request up to this size


def merge_ranges(chunks: list[ChunkRef], limit: int) -> list[list[ChunkRef]]:
    """Group chunks (sorted by compressed offset) whose compressed ranges are contiguous, up to ``limit`` bytes."""
    groups: list[list[ChunkRef]] = []
    for c in sorted(chunks, key=lambda c: c.info.compressed_offset):
        if groups:
            g = groups[-1]
            last = g[-1].info
            start = g[0].info.compressed_offset
            end = c.info.compressed_offset + c.info.compressed_size
            if c.info.compressed_offset == last.compressed_offset + last.compressed_size and end - start <= limit:
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


class DirectChunkSource:
    def __init__(self, backend: BlobBackend, verify: bool = True, merge_limit: int = DEFAULT_MERGE_LIMIT):
        self.backend = backend
        self.verify = verify
        self.merge_limit = merge_limit

    def read_raw(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self.backend.read(blob.ref, offset, size)

    def read_chunks(self, image: RafsImage, blob: BlobInfo, chunks: list[ChunkRef]) -> list[bytes]:
        out: dict[int, bytes] = {}
        for group in merge_ranges(chunks, self.merge_limit):
            start = group[0].info.compressed_offset
            end = group[-1].info.compressed_offset + group[-1].info.compressed_size
            raw = self.backend.read(blob.ref, start, end - start)
            for c in group:
                o = c.info.compressed_offset - start
                out[id(c)] = verify_chunk(blob, c, raw[o:o + c.info.compressed_size], self.verify)
        return [out[id(c)] for c in chunks]

    def close(self) -> None:
        self.backend.close()
