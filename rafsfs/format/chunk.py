"""Chunk indexes of chunk-based inodes (8 B EROFS/Nydus view, 4 B EROFS block map) and the legacy chunk table."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .record import Record, field

CHUNK_INDEX_SIZE = 8
BLOCK_MAP_ENTRY_SIZE = 4
_INDEX = struct.Struct("<HHI")


@dataclass(frozen=True)
class ChunkIndex:
    """One 8-byte chunk index.  Nydus packs a 24-bit chunk-info index around the device id:
    ``lo`` = ci bits 0-15, ``hi`` low byte = device id (blob index + 1), ``hi`` high byte = ci bits 16-23."""

    lo: int
    hi: int
    blkaddr: int

    @classmethod
    def unpack_from(cls, buf, off: int) -> "ChunkIndex":
        return cls(*_INDEX.unpack_from(buf, off))

    def pack(self) -> bytes:
        return _INDEX.pack(self.lo, self.hi, self.blkaddr)

    @classmethod
    def nydus(cls, blob_index: int, ci_index: int, blkaddr: int) -> "ChunkIndex":
        return cls(ci_index & 0xFFFF, ((blob_index + 1) & 0xFF) | (((ci_index >> 16) & 0xFF) << 8), blkaddr)

    @property
    def nydus_blob_index(self) -> int:
        return (self.hi & 0xFF) - 1

    @property
    def nydus_ci_index(self) -> int:
        return ((self.hi >> 8) << 16) | self.lo

    def device_id(self, extra_devices: int) -> int:
        """The device id as the kernel sees it: masked to the next power of two above ``extra_devices``."""
        mask = (1 << (extra_devices).bit_length()) - 1 if extra_devices else 0
        return self.hi & mask


# legacy RafsV5ChunkInfo table in the bootstrap (80 B per entry)
CHUNK_FLAG_COMPRESSED = 0x1
CHUNK_FLAG_HOLE = 0x2
CHUNK_FLAG_ENCRYPTED = 0x4
CHUNK_FLAG_BATCH = 0x8
CHUNK_FLAG_HAS_CRC32 = 0x10


@dataclass
class ChunkTableEntry(Record):
    NAME = "chunk table entry"
    digest: bytes = field("32s", bytes(32))
    blob_index: int = field("I")
    flags: int = field("I")
    compressed_size: int = field("I")
    uncompressed_size: int = field("I")
    compressed_offset: int = field("Q")
    uncompressed_offset: int = field("Q")
    file_offset: int = field("Q")
    index: int = field("I")
    crc32: int = field("I")


assert ChunkTableEntry.rec_size() == 80
