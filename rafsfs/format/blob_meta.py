"""Blob chunk-info ("ci") arrays, v1 (16 B) and v2 (24 B) entries, and the 4 KiB blob.meta header."""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..blob import MAX_CHUNK_SIZE, ChunkInfo  # noqa: F401  (decoded here; the value types live at the bottom)
from .record import Record, field

BLOB_META_MAGIC = 0xB10BB10B
BLOB_META_HEADER_SIZE = 4096
CI_V1_SIZE = 16
CI_V2_SIZE = 24

CI_V2_COMPRESSED = 0x01
CI_V2_ZRAN = 0x02
CI_V2_BATCH = 0x04
CI_V2_ENCRYPTED = 0x08
CI_V2_HAS_CRC32 = 0x10

_V1 = struct.Struct("<QQ")
_V2 = struct.Struct("<QQQ")
_V1_U = struct.Struct("<Q8x")  # the first word of an entry alone: it holds the uncompressed offset
_V2_U = struct.Struct("<Q16x")
_V1_UOFF = 0xFFF_FFFF_F000  # v1: the uncompressed offset is bits 12..43 of the first word, in place


def _v2_uoff(u: int) -> int:
    return (u & 0xFFFFFFFF) << 12  # v2: the low 32 bits of the first word, in pages


def decode_v1(buf, off: int) -> ChunkInfo:
    u, c = _V1.unpack_from(buf, off)
    usize = (((u & 0xF00) << 12) | (u >> 44)) + 1
    uoff = u & _V1_UOFF
    csize = ((((c >> 40) & 0xF) << 20) | (c >> 44)) + 1
    coff = c & 0xFF_FFFF_FFFF
    return ChunkInfo(coff, csize, uoff, usize, csize != usize)


def _check_encodable(ci: ChunkInfo, max_csize: int) -> None:
    if not (1 <= ci.uncompressed_size <= MAX_CHUNK_SIZE and 1 <= ci.compressed_size <= max_csize):
        raise ValueError(f"chunk sizes out of range: {ci}")
    if ci.uncompressed_offset % 4096 or not 0 <= ci.uncompressed_offset < 1 << 44:
        raise ValueError(f"uncompressed offset out of range or unaligned: {ci}")
    if not 0 <= ci.compressed_offset < 1 << 40:
        raise ValueError(f"compressed offset out of range: {ci}")


def encode_v1(ci: ChunkInfo) -> bytes:
    _check_encodable(ci, MAX_CHUNK_SIZE)
    us, cs = ci.uncompressed_size - 1, ci.compressed_size - 1
    u = ((us & 0xFFFFF) << 44) | (ci.uncompressed_offset & 0xFFF_FFFF_F000) | ((us & 0xF00000) >> 12)
    c = ((cs & 0xFFFFF) << 44) | ((cs & 0xF00000) << 20) | (ci.compressed_offset & 0xFF_FFFF_FFFF)
    return _V1.pack(u, c)


def decode_v2(buf, off: int) -> tuple[ChunkInfo, int]:
    """Returns the chunk info and its flag byte."""
    u, c, _data = _V2.unpack_from(buf, off)
    uoff = _v2_uoff(u)
    usize = ((u >> 32) & 0xFFFFFF) + 1
    flags = u >> 56
    coff = c & 0xFF_FFFF_FFFF
    csize = c >> 40
    return ChunkInfo(coff, csize, uoff, usize, bool(flags & CI_V2_COMPRESSED)), flags


def uncompressed_offsets(buf, v2: bool) -> Iterator[int]:
    """The uncompressed offset of every entry of a chunk-info array, in order: the field :func:`decode_v1` and
    :func:`decode_v2` give, without decoding the rest (a pass over a million entries)."""
    if v2:
        return (_v2_uoff(u) for (u,) in _V2_U.iter_unpack(buf))
    return (u & _V1_UOFF for (u,) in _V1_U.iter_unpack(buf))


def encode_v2(ci: ChunkInfo) -> bytes:
    _check_encodable(ci, (1 << 24) - 1)
    flags = CI_V2_COMPRESSED if ci.compressed else 0
    u = (ci.uncompressed_offset >> 12) | ((ci.uncompressed_size - 1) << 32) | (flags << 56)
    c = ci.compressed_offset | (ci.compressed_size << 40)
    return _V2.pack(u, c, 0)


@dataclass
class BlobMetaHeader(Record):
    NAME = "blob.meta header"
    magic: int = field("I", BLOB_META_MAGIC)
    features: int = field("I")
    ci_compressor: int = field("I")
    ci_entries: int = field("I")
    ci_offset: int = field("Q")
    ci_compressed_size: int = field("Q")
    ci_uncompressed_size: int = field("Q")
    ci_zran_offset: int = field("Q")
    ci_zran_size: int = field("Q")
    ci_zran_count: int = field("I")
    reserved: bytes = field("4032s", bytes(4032))
    magic2: int = field("I", BLOB_META_MAGIC)


assert BlobMetaHeader.rec_size() == BLOB_META_HEADER_SIZE
