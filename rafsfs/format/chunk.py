"""Chunk indexes of chunk-based inodes (8 B EROFS/Nydus view, 4 B EROFS block map) and the legacy chunk table
(kept packed: :class:`ChunkTable`)."""
from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ..blob import ChunkInfo
from ..errors import BadImage
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


_TABLE_KEYS = struct.Struct("<32xI36xI4x")  # (blob_index, index) of one table entry
_TABLE_UOFF = struct.Struct("<56xQ16x")  # uncompressed_offset of one table entry
_TABLE_ENTRY = ChunkTableEntry._layout()
assert _TABLE_KEYS.size == _TABLE_UOFF.size == _TABLE_ENTRY.size == 80


class ChunkTable(Mapping):
    """The bootstrap's chunk table as a read-only mapping (blob index, chunk-info index) -> :class:`ChunkTableEntry`.

    The entries stay packed (80 bytes each) and are decoded on access; the only other memory is one 4-byte
    position per chunk of each blob, built on first use.  Entries naming a blob or a chunk index the blob table
    does not have are never reachable, so they are left out."""

    def __init__(self, raw: bytes, chunk_counts: list[int]):
        if len(raw) % 80:
            raise BadImage("chunk table size is not a multiple of its entry size")
        self._raw = raw
        self._counts = chunk_counts
        self._pos: list[array] | None = None  # per blob: entry position + 1 by chunk-info index, 0 = none
        self._filled: list[int] = []
        self._lock = threading.Lock()

    def index(self) -> None:
        """Build the per-blob positions now (they are otherwise built on first use)."""
        self._positions()

    def _positions(self) -> list[array]:
        pos = self._pos
        if pos is None:
            with self._lock:
                if self._pos is None:
                    pos = [array("I", bytes(4 * n)) for n in self._counts]
                    filled = [0] * len(pos)
                    for i, (b, ci) in enumerate(_TABLE_KEYS.iter_unpack(self._raw)):
                        if b < len(pos) and ci < len(pos[b]):
                            filled[b] += not pos[b][ci]
                            pos[b][ci] = i + 1  # a repeated key: the last one wins
                    self._filled = filled
                    self._pos = pos
                pos = self._pos
        return pos

    def entry(self, blob_index: int, ci: int) -> ChunkTableEntry | None:
        pos = self._positions()
        if not (0 <= blob_index < len(pos) and 0 <= ci < len(pos[blob_index])):
            return None
        p = pos[blob_index][ci]
        return ChunkTableEntry.unpack_from(self._raw, (p - 1) * 80) if p else None

    def chunk(self, blob_index: int, ci: int) -> tuple[ChunkInfo, bytes] | None:
        """(location, digest) of one chunk, or None if the table does not list it (the hot path of every read:
        one struct unpack, no record object)."""
        pos = self._pos if self._pos is not None else self._positions()
        if not (0 <= blob_index < len(pos) and 0 <= ci < len(pos[blob_index])):
            return None
        p = pos[blob_index][ci]
        if not p:
            return None
        dg, _b, flags, csize, usize, coff, uoff, _foff, _i, _crc = _TABLE_ENTRY.unpack_from(self._raw, (p - 1) * 80)
        return ChunkInfo(coff, csize, uoff, usize, bool(flags & CHUNK_FLAG_COMPRESSED)), dg

    def uncompressed_offsets(self, blob_index: int) -> Iterator[int]:
        """The uncompressed offset of each chunk of a blob the table covers (:meth:`covers`), by chunk index."""
        raw = self._raw
        for p in self._positions()[blob_index]:
            yield _TABLE_UOFF.unpack_from(raw, (p - 1) * 80)[0]

    def covers(self, blob_index: int) -> bool:
        """Every chunk of the blob is listed: its locations need no blob I/O."""
        self._positions()
        return 0 <= blob_index < len(self._counts) and self._counts[blob_index] > 0 \
            and self._filled[blob_index] == self._counts[blob_index]

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, key: tuple[int, int]) -> ChunkTableEntry:
        e = self.entry(*key)
        if e is None:
            raise KeyError(key)
        return e

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for b, arr in enumerate(self._positions()):
            for ci, p in enumerate(arr):
                if p:
                    yield b, ci

    def __len__(self) -> int:
        self._positions()
        return sum(self._filled)
